"""The ``gpunet`` command: ``gpunet train``, ``gpunet sample``, ``gpunet parity``,
``gpunet info`` and ``gpunet bench``."""
from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import sys
import time
from typing import Any, Sequence

import numpy as np


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a registered model on a dataset",
                       description="Train a registered model on a dataset and report its test "
                                   "metrics. Defaults come from the model's registry entry.")
    p.add_argument("model", help="registered model name (see `gpunet info`), e.g. mlp")
    p.add_argument("--data", required=True,
                   help="dataset: digits (embedded), mnist (with --data-dir), spirals, blobs, "
                        "shapes (segmentation), adding (regression; --seq-len), digits-rows "
                        "(sequences), reverse (token sequences to reverse), text (with "
                        "--data-file)")
    p.add_argument("--data-dir", help="directory of the dataset's files (mnist: the four IDX files)")
    p.add_argument("--data-file", help="the text file of --data text (character-level language "
                                       "modelling; test perplexity reported)")
    p.add_argument("--seq-len", type=int,
                   help="sequence length: adding (default 50), reverse (8), text (64)")
    p.add_argument("--epochs", type=int, help="number of epochs (model default)")
    p.add_argument("--batch-size", type=int, help="mini-batch size (model default)")
    p.add_argument("--lr", type=float, help="learning rate (model default)")
    p.add_argument("--optimizer", choices=["sgd", "rmsprop", "adam"],
                   help="optimizer (model default)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--clip-norm", type=float,
                   help="clip the gradients' joint L2 norm at this (model default: lstm, gru 1.0)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default; $GPUNET_DEVICE overrides auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training set held out for validation (default 0.1)")
    p.add_argument("--save", metavar="PATH", help="save the trained model (.npz) here")
    p.add_argument("--checkpoint", metavar="PATH", help="write a checkpoint here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--metrics-out", metavar="FILE", help="write the final metrics as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks of `mpirun -np N` (MPI; NCCL between "
                        "GPUs, one GPU per rank); --batch-size is per rank")
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="with --distributed: BatchNorm statistics over all ranks' samples "
                        "(default: per rank)")
    p.add_argument("--augment", nargs="?", const="crop,flip", metavar="crop,flip",
                   help="augment the training images (N, C, H, W), never the validation or "
                        "test ones: crop = random crop back to H x W after zero padding of "
                        "max(1, min(H, W) // 8) pixels (random shifts: 1 on digits, 3 on "
                        "mnist), flip = random horizontal flip (p 0.5); a bare --augment is "
                        "both. Digits are not mirror-symmetric: use --augment crop for them. "
                        "Segmentation masks (shapes) get their image's crop and flip")
    gan = p.add_argument_group("gan only", "options of `gpunet train gan` (--data digits or "
                               "mnist; defaults: 400 epochs, batch 64, Adam lr 2e-4)")
    gan.add_argument("--k", type=int, help="discriminator steps per generator step (default 1)")
    gan.add_argument("--noise-dim", type=int, help="length of the generator's noise input "
                                                   "(default 32)")
    gan.add_argument("--loss", choices=["non-saturating", "minimax"],
                     help="generator loss: -log D(G(z)) (non-saturating, default) or "
                          "log(1 - D(G(z))) (minimax)")
    gan.add_argument("--label-smoothing", action="store_true", default=None,
                     help="one-sided label smoothing: real samples labelled 0.9")
    gan.add_argument("--samples-dir", metavar="DIR",
                     help="write a PNG grid of samples from fixed noise after every epoch and "
                          "the loss curves (losses.png) here (matplotlib: the bench extra)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="embed: draw the test embeddings projected to 2-D (PCA), coloured by "
                        'class; needs matplotlib: pip install "gpunet[bench]"')


def _split(train: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    from .data import Dataset
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    n_val = int(round(len(train) * fraction))
    if n_val == 0:
        return train, None
    order = np.random.default_rng(seed).permutation(len(train))
    pick = lambda idx: Dataset(train.x[idx], train.y[idx], name=train.name,
                               num_classes=train.num_classes, vocabulary=train.vocabulary,
                               tokens=train.tokens)
    return pick(order[n_val:]), pick(order[:n_val])


def train(args: argparse.Namespace) -> int:
    from . import data, distributed, models, optim, rng
    from .backends import get_device
    from .errors import TrainingDiverged
    from .layers import BatchNorm
    from .serialize import save
    from .trainer import Trainer
    from .augment import recipe

    from . import gan
    if args.model == "gan":  # two models and their own loop: gpunet.gan
        return gan.train_command(args)
    for option in gan.OPTIONS:
        if getattr(args, option) is not None:
            raise ValueError(f"--{option.replace('_', '-')}: only gpunet train gan takes it")
    spec = models.get(args.model)
    settings = {**spec.defaults, **{k: getattr(args, k) for k in
                                    ("epochs", "batch_size", "lr", "optimizer", "clip_norm")
                                    if getattr(args, k) is not None}}
    if args.plot is not None:  # fail before training, not after
        if spec.plot is None:
            raise ValueError(f"--plot: model {args.model!r} draws no plot (embed does)")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError('--plot needs matplotlib: pip install "gpunet[bench]"') from None
    device = get_device(args.device)
    if args.distributed and device.type == "cuda":
        count = device.xp.cuda.runtime.getDeviceCount()
        device = get_device(f"cuda:{distributed.local_rank() % count}")
    comm = distributed.init(device) if args.distributed else distributed.Communicator()
    rng.seed(args.seed)
    loader = data.DATASETS.get(args.data)
    if loader is None:
        raise ValueError(f"unknown dataset {args.data!r}; expected one of {sorted(data.DATASETS)}")
    kwargs = {}
    params = inspect.signature(loader).parameters
    if "flat" in params:
        kwargs["flat"] = False  # models flatten what they need; conv models want images
    if args.data_dir is not None:
        kwargs["path"] = args.data_dir
    if args.data_file is not None:
        if args.data != "text":
            raise ValueError(f"--data-file: dataset {args.data!r} reads no file (--data text does)")
        kwargs["path"] = args.data_file
    elif args.data == "text":
        raise ValueError("--data text needs --data-file PATH, the text to model")
    if args.seq_len is not None:
        if "seq_len" not in params:
            raise ValueError(f"--seq-len: dataset {args.data!r} has no sequence length to set")
        kwargs["seq_len"] = args.seq_len
    train_set, test_set = loader(**kwargs)
    train_set, val_set = _split(train_set, args.val_fraction, args.seed)
    augment = None
    if args.augment is not None:
        if len(train_set.input_shape) != 3 or train_set.tokens:
            raise ValueError(f"--augment: dataset {args.data!r} is not images (N, C, H, W) "
                             f"(its samples have shape {tuple(train_set.input_shape)}); "
                             "augmentation is for image data such as digits, mnist, shapes")
        augment = recipe(args.augment, train_set.input_shape)

    language_model = train_set.vocabulary is not None  # targets: the next tokens
    build_kwargs = {}
    if language_model:
        if "causal" not in inspect.signature(spec.build).parameters:
            raise ValueError(f"--data text: model {args.model!r} cannot be made causal (it "
                             "would see the characters it predicts); use transformer")
        build_kwargs["causal"] = True
    model = spec.build(train_set.input_shape, train_set.num_classes, **build_kwargs)
    opt_cls = optim.OPTIMIZERS[settings["optimizer"]]
    opt_kwargs = {"momentum": args.momentum} if settings["optimizer"] == "sgd" else {}
    for layer in model.walk():
        if isinstance(layer, BatchNorm):
            layer.sync = args.sync_batchnorm
    model.to(device)
    optimizer = opt_cls(model.params(), lr=settings["lr"], **opt_kwargs)
    metric = {} if spec.metric is None else {"metric": spec.metric}  # default: accuracy
    trainer = Trainer(model, spec.make_loss(train_set.num_classes), optimizer,
                      clip_norm=settings.get("clip_norm"), progress=not args.no_progress,
                      comm=comm, **metric)
    if comm.rank == 0:
        ranks = f" x {comm.size} ranks" if comm.size > 1 else ""
        print(f"gpunet: training {args.model} on {args.data} ({len(train_set)} train, "
              f"{0 if val_set is None else len(val_set)} validation, {len(test_set)} test) "
              f"on {device.label}{ranks}: {settings}", file=sys.stderr)
    started = time.perf_counter()
    try:
        trainer.fit(train_set, settings["epochs"], settings["batch_size"], val=val_set,
                    checkpoint=args.checkpoint, resume=args.resume, seed=args.seed,
                    augment=augment)
    except TrainingDiverged as e:
        print(f"gpunet: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    scores = trainer.evaluate(test_set)
    metrics = {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"],
               "epochs": settings["epochs"], "seconds": round(seconds, 3), "device": device.label}
    if spec.metric is not None:  # the model's own metric takes accuracy's place: test_dice
        metrics["test_accuracy"] = None
        metrics[f"test_{spec.metric.__name__}"] = scores["accuracy"]
    if language_model:
        metrics["test_perplexity"] = math.exp(scores["loss"])
    if comm.size > 1:
        metrics["ranks"] = comm.size
    if comm.rank != 0:
        return 0
    if spec.evaluate is not None:  # the model's own test metrics (embed: 1-NN accuracy)
        metrics.update(spec.evaluate(trainer, train_set, test_set))
    if args.plot is not None:
        spec.plot(trainer, test_set, args.plot)
        print(f"gpunet: wrote {args.plot}", file=sys.stderr)
    print(json.dumps(metrics))
    if args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(metrics, f, indent=2)
    if args.save:
        meta = ({"vocabulary": train_set.vocabulary, "seq_len": int(train_set.input_shape[0])}
                if language_model else None)
        save(model, args.save, meta)
    return 0


def info(args: argparse.Namespace) -> int:
    from . import __version__, models
    from .backends import get_device
    from .errors import DeviceError, KernelCompileError
    from .kernels import KERNELS, expanded_source, kernel_files, name_expressions
    from .nvrtc import compile_ptx
    from .nvrtc import version as nvrtc_version

    print(f"gpunet {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    print(f"numpy {np.__version__}")
    try:
        import cupy
        print(f"cupy {cupy.__version__}")
    except ImportError as e:
        print(f"cupy: not importable ({e})")
    try:
        device = get_device("auto")
        print(f"device: {device.label}")
        if device.type == "cuda":
            props = device.xp.cuda.runtime.getDeviceProperties(device.index)
            print(f"gpu: {props['name'].decode()}")
    except DeviceError as e:
        print(f"device: unavailable ({e})")
    files = kernel_files()
    print(f"kernels: {len(files)} file(s) in {files[0].parent if files else 'kernels/'}")
    try:
        for file in KERNELS:
            compile_ptx(expanded_source(file), file, name_expressions=name_expressions(file))
        print(f"kernels: compile under NVRTC {'.'.join(map(str, nvrtc_version()))}")
    except KernelCompileError as e:
        print(f"kernels: not compiled ({str(e).splitlines()[0]})")
    print(f"models: {', '.join(sorted(models.MODELS))}")
    return 0


def _sample_parser(sub: Any) -> None:
    p = sub.add_parser("sample", help="generate text from a saved character-level model",
                       description="Continue PROMPT by LENGTH characters with a model saved by "
                                   "`gpunet train transformer --data text --data-file FILE "
                                   "--save PATH`, one character at a time.")
    p.add_argument("model_file", metavar="MODEL_FILE", help="the saved model (.npz)")
    p.add_argument("--prompt", required=True, help="the text to continue (its characters must "
                                                   "be in the model's vocabulary)")
    p.add_argument("--length", type=int, default=200, help="characters to add (default 200)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 takes the likeliest character (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="device to run on (default auto)")


def sample(args: argparse.Namespace) -> int:
    from .backends import get_device, to_numpy
    from .serialize import load, read_meta

    if args.length < 0 or args.temperature < 0:
        raise ValueError(f"--length and --temperature must be >= 0, got {args.length} and "
                         f"{args.temperature}")
    meta = read_meta(args.model_file)
    vocabulary, window = meta.get("vocabulary"), meta.get("seq_len")
    if not isinstance(vocabulary, str) or not isinstance(window, int):
        raise ValueError(f"{args.model_file}: not a text model (no vocabulary saved with it); "
                         "save one with gpunet train transformer --data text --data-file FILE "
                         "--save PATH")
    unknown = sorted(set(args.prompt) - set(vocabulary))
    if not args.prompt or unknown:
        raise ValueError(f"--prompt: expected characters of the model's vocabulary, got "
                         f"{'an empty prompt' if not args.prompt else f'unknown {unknown}'}")
    device = get_device(args.device)
    model = load(args.model_file, device=device)
    ids = [vocabulary.index(c) for c in args.prompt]
    g = np.random.default_rng(args.seed)
    for _ in range(args.length):
        context = np.array([ids[-window:]], dtype=np.int64)
        logits = to_numpy(model.forward(device.asarray(context), training=False))[0, -1]
        if args.temperature == 0:
            ids.append(int(np.argmax(logits)))
            continue
        z = logits.astype(np.float64) / args.temperature
        p = np.exp(z - z.max())
        ids.append(int(g.choice(len(vocabulary), p=p / p.sum())))
    print("".join(vocabulary[i] for i in ids))
    return 0


def _parity_parser(sub: Any) -> None:
    p = sub.add_parser("parity", help="compare every layer on every available device",
                       description="Run every layer of the parity registry on every available "
                                   "device (cpu, emulated, cuda) against the float64 NumPy "
                                   "reference with identical weights, inputs and gradients. "
                                   "Exit status 1 on any failure.")
    p.add_argument("--devices", help="comma-separated devices (default: every available one)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated dtypes")
    p.add_argument("--cases", help="comma-separated case names (default: all)")


def parity(args: argparse.Namespace) -> int:
    from . import parity as suite
    from .backends import available_devices, get_device

    devices = ([get_device(d) for d in args.devices.split(",")] if args.devices
               else available_devices())
    cases = args.cases.split(",") if args.cases else None
    unknown = set(cases or ()) - set(suite.CASES)
    if unknown:
        raise ValueError(f"unknown parity cases {sorted(unknown)}; known: {sorted(suite.CASES)}")
    results = suite.run(devices, args.dtypes.split(","), cases)
    print(suite.table(results))
    return 0 if all(r.ok for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpunet", description="gpunet: train and inspect "
                                     "neural networks on NumPy (CPU) or CuPy (NVIDIA GPU).")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sample_parser(sub)
    _parity_parser(sub)
    sub.add_parser("info", help="versions, the chosen device and what is usable",
                   description="Print versions, the device 'auto' picks, the GPU name when "
                               "there is one, and whether CuPy and the kernels are usable.")
    sub.add_parser("bench", help="training-step benchmarks against PyTorch (see "
                   "`gpunet bench --help`)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        from .bench import main as bench_main
        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return {"train": train, "sample": sample, "info": info,
                "parity": parity}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"gpunet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
