"""The ``gpunet`` command: ``gpunet train``, ``gpunet sample``, ``gpunet parity``,
``gpunet info`` and ``gpunet bench``."""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from typing import Any, Sequence

import numpy as np


class _Parser(argparse.ArgumentParser):
    """argparse with gpunet's one-line errors: ``gpunet train: error: ...`` and exit status 2,
    without argparse's usage block (``--help`` shows it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_DEVICE_HELP = ("cpu, cuda, cuda:N, emulated (gpunet's CUDA kernels on the CPU emulator; needs "
                "a C++ compiler, $CXX or g++) or auto (default: cuda when CuPy sees a GPU, "
                "else cpu; $GPUNET_DEVICE overrides auto)")


def _count(text: str) -> int:
    """argparse type of a count (epochs, batch size, sequence length): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _models_epilog() -> str:
    """The models with their defaults and the datasets with their options, for ``gpunet
    train --help``: generated from :data:`gpunet.models.MODELS`, :data:`gpunet.gan.DEFAULTS`
    and :data:`gpunet.data.DATASETS`, so it cannot fall behind them."""
    from . import data, gan, models

    def entry(name: str, settings: dict[str, Any], description: str) -> str:
        options = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
        return textwrap.fill(f"{name:<12} {description.rstrip('.')}. Defaults: {options}",
                             width=92, initial_indent="  ", subsequent_indent=" " * 15)

    lines = ["models:"]
    for name, spec in sorted(models.MODELS.items()):
        lines.append(entry(name, spec.defaults, spec.description))
    lines.append(entry("gan", {**gan.DEFAULTS, "optimizer": "adam"},
                       "MLP generator and discriminator on digits or mnist (the gan only "
                       "options)"))
    lines.append("datasets:")
    for name, loader in sorted(data.DATASETS.items()):
        params = inspect.signature(loader).parameters
        notes = []
        if "path" in params:
            notes.append("--data-file FILE" if name == "text" else "--data-dir DIR")
        if "seq_len" in params:
            notes.append(f"--seq-len, default {params['seq_len'].default}")
        lines.append(f"  {name:<12} {'; '.join(notes)}".rstrip())
    return "\n".join(lines)


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a registered model on a dataset",
                       description="Train a registered model on a dataset and report its test "
                                   "metrics. Defaults come from the model's registry entry.",
                       epilog=_models_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="registered model name (listed below), e.g. mlp")
    p.add_argument("--data", required=True,
                   help="dataset: digits (embedded), mnist (with --data-dir), spirals, blobs, "
                        "shapes (segmentation), adding (regression; --seq-len), digits-rows "
                        "(sequences), reverse (token sequences to reverse), text (with "
                        "--data-file)")
    p.add_argument("--data-dir", help="directory of the dataset's files (mnist: the four IDX files)")
    p.add_argument("--data-file", help="the text file of --data text (character-level language "
                                       "modelling; test perplexity reported)")
    p.add_argument("--seq-len", type=_count,
                   help="sequence length: adding (default 50), reverse (8), text (64)")
    p.add_argument("--epochs", type=_count, help="number of epochs (model default)")
    p.add_argument("--batch-size", type=_count, help="mini-batch size (model default)")
    p.add_argument("--lr", type=float, help="learning rate (model default)")
    p.add_argument("--optimizer", choices=["sgd", "rmsprop", "adam"],
                   help="optimizer (model default)")
    p.add_argument("--momentum", type=float,
                   help="momentum of sgd (default 0.9) or rmsprop (default 0); adam has none")
    p.add_argument("--clip-norm", type=float,
                   help="clip the gradients' joint L2 norm at this (model default: lstm, gru 1.0)")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training set held out for validation (default 0.1)")
    p.add_argument("--save", metavar="PATH", help="save the trained model (.npz) here")
    p.add_argument("--checkpoint", metavar="PATH", help="write a checkpoint here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--early-stopping", type=_count, metavar="PATIENCE",
                   help="stop when the validation loss has not improved for PATIENCE epochs "
                        "and keep the best epoch's weights (needs --val-fraction > 0)")
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


def _device(spec: str, option: str = "--device") -> Any:
    """``get_device(spec)``, refusing the emulator where its C++ compiler is missing: it would
    otherwise fail at the first kernel launch, deep in training."""
    from .backends import get_device

    device = get_device(spec)
    cxx = os.environ.get("CXX", "g++")
    if device.type == "emulated" and shutil.which(cxx) is None:
        raise ValueError(f"{option} {spec}: the CUDA emulator needs a C++ compiler, and "
                         f"{cxx!r} ($CXX, default g++) was not found; install g++ or set CXX")
    return device


def _check_output(option: str, path: str | None) -> None:
    """Refuse an output path that cannot be written, before training rather than after it: its
    folder must exist and take a new file (tried with a scratch file, so a read-only file
    system is found too), and it must not be a folder."""
    if path is None:
        return
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a folder; expected a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    try:
        fd, scratch = tempfile.mkstemp(prefix=".gpunet-write-check.", dir=folder)
        os.close(fd)
        os.unlink(scratch)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write in the folder {folder} "
                         f"({e.strerror})") from None


def _check_train_args(args: argparse.Namespace) -> None:
    """What can be refused from the options alone, before any data is read or epoch run."""
    from . import data, models, optim

    if args.resume and args.checkpoint is None:
        raise ValueError("--resume needs --checkpoint PATH, the checkpoint to continue from")
    if args.resume and not os.path.isfile(args.checkpoint):
        raise ValueError(f"--resume: no checkpoint at {args.checkpoint} (a run with "
                         "--checkpoint PATH writes one after every epoch)")
    for option in ("save", "checkpoint", "metrics_out", "plot"):
        _check_output(f"--{option.replace('_', '-')}", getattr(args, option))
    if args.model == "gan":
        optimizer = "adam"
    elif args.model not in models.MODELS:
        raise ValueError(f"unknown model {args.model!r}; expected one of "
                         f"{sorted([*models.MODELS, 'gan'])}")
    else:
        optimizer = args.optimizer or models.get(args.model).defaults["optimizer"]
    takes = inspect.signature(optim.OPTIMIZERS[optimizer]).parameters
    if args.momentum is not None and "momentum" not in takes:  # as torch.optim.Adam
        raise ValueError(f"--momentum: the optimizer {optimizer} takes no momentum (its betas "
                         "play that part); use --optimizer sgd or rmsprop with --momentum")
    loader = data.DATASETS.get(args.data)
    if loader is None:
        raise ValueError(f"unknown dataset {args.data!r}; expected one of {sorted(data.DATASETS)}")
    reads_dir = "path" in inspect.signature(loader).parameters and args.data != "text"
    if reads_dir and args.data_dir is None:
        raise ValueError(f"--data {args.data} needs --data-dir DIR, the folder of its files "
                         "(nothing is downloaded)")
    if args.data_dir is not None and not reads_dir:
        hint = "; it reads --data-file" if args.data == "text" else ""
        raise ValueError(f"--data-dir: dataset {args.data!r} reads no folder{hint}")
    if args.early_stopping is not None and (args.model == "gan" or args.val_fraction == 0):
        raise ValueError("--early-stopping watches the validation loss: it needs "
                         "--val-fraction > 0 and a model other than gan")
    _device(args.device)


def train(args: argparse.Namespace) -> int:
    from . import data, distributed, models, optim, rng
    from .backends import get_device
    from .errors import TrainingDiverged
    from .layers import BatchNorm
    from .serialize import read_meta, save
    from .stopping import EarlyStopping
    from .trainer import Trainer
    from .augment import recipe

    from . import gan
    _check_train_args(args)
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
    device = _device(args.device)
    if args.distributed and device.type == "cuda":
        count = device.xp.cuda.runtime.getDeviceCount()
        device = get_device(f"cuda:{distributed.local_rank() % count}")
    comm = distributed.init(device) if args.distributed else distributed.Communicator()
    rng.seed(args.seed)
    loader = data.DATASETS[args.data]  # a known name: _check_train_args
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
    if args.early_stopping is not None and val_set is None:
        raise ValueError(f"--early-stopping: --val-fraction {args.val_fraction} of "
                         f"{len(train_set)} samples leaves no validation set to watch")
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
    opt_kwargs = {}  # an optimizer without momentum was refused with --momentum above
    if settings["optimizer"] == "sgd":
        opt_kwargs["momentum"] = 0.9 if args.momentum is None else args.momentum
    elif args.momentum is not None:
        opt_kwargs["momentum"] = args.momentum
    for layer in model.walk():
        if isinstance(layer, BatchNorm):
            layer.sync = args.sync_batchnorm
    model.to(device)
    optimizer = opt_cls(model.params(), lr=settings["lr"], **opt_kwargs)
    metric = {} if spec.metric is None else {"metric": spec.metric}  # default: accuracy
    trainer = Trainer(model, spec.make_loss(train_set.num_classes), optimizer,
                      clip_norm=settings.get("clip_norm"), progress=not args.no_progress,
                      comm=comm, **metric)
    try:  # fit checks this too; here the message can name the model and the dataset
        trainer.check_data(train_set)
    except (ValueError, TypeError) as e:
        raise ValueError(f"model {args.model!r} does not fit dataset {args.data!r} "
                         f"(checked on two samples before training): {e}") from e
    if comm.rank == 0:
        ranks = f" x {comm.size} ranks" if comm.size > 1 else ""
        print(f"gpunet: training {args.model} on {args.data} ({len(train_set)} train, "
              f"{0 if val_set is None else len(val_set)} validation, {len(test_set)} test) "
              f"on {device.label}{ranks}: {settings}", file=sys.stderr)
        if args.resume:
            done = read_meta(args.checkpoint).get("epoch")
            print(f"gpunet: resumed from epoch {done} of {settings['epochs']} "
                  f"({args.checkpoint})", file=sys.stderr)
    try:
        trainer.fit(train_set, settings["epochs"], settings["batch_size"], val=val_set,
                    checkpoint=args.checkpoint, resume=args.resume, seed=args.seed,
                    augment=augment, early_stopping=None if args.early_stopping is None
                    else EarlyStopping("val_loss", patience=args.early_stopping))
    except TrainingDiverged as e:
        print(f"gpunet: {e}", file=sys.stderr)
        return 1
    scores = trainer.evaluate(test_set)
    # seconds: the training of the whole run, the epochs before a --resume included
    metrics = {"test_accuracy": scores.get("accuracy"), "test_loss": scores["loss"],
               "epochs": settings["epochs"], "seconds": round(trainer.seconds, 3),
               "device": device.label}
    if spec.metric is not None:  # the model's own metric takes accuracy's place: test_dice
        metrics["test_accuracy"] = None
        metrics[f"test_{trainer.metric_name}"] = scores[trainer.metric_name]
    if language_model:
        metrics["test_perplexity"] = math.exp(scores["loss"])
    if comm.size > 1:
        metrics["ranks"] = comm.size
    if trainer.history and "stopped" in trainer.history[-1]:
        metrics["stopped_at_epoch"] = trainer.history[-1]["epoch"]
        if comm.rank == 0:
            print(f"gpunet: {trainer.history[-1]['stopped']}", file=sys.stderr)
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
    cxx = os.environ.get("CXX", "g++")
    found = shutil.which(cxx)
    print(f"emulator: C++ compiler {cxx} ({found})" if found else
          f"emulator: unavailable, no C++ compiler ({cxx!r} not found; install g++ or set CXX)")
    from . import threads
    from .backends import blas, native
    print(f"cpu loops: {native.status()}")
    if native.library() is not None:
        print("cpu gemm kernels: " + ("agree with NumPy" if native.gemm_kernels() else
                                      "DISAGREE with NumPy on a check problem: NumPy's BLAS "
                                      "runs their work"))
    print("cpu blas: " + (f"direct CBLAS calls into {blas.BLAS.path}" if blas.BLAS is not None
                          else "NumPy's matmul (no 64-bit CBLAS symbols found, or "
                               "GPUNET_CPU_BLAS=numpy)"))
    policy = os.environ.get("GPUNET_THREAD_POLICY", "").strip() or "adaptive"
    print(f"cpu threads: {threads.get_num_threads()} of at most {threads.env_maximum()} "
          f"({policy} policy)")
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
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)


def sample(args: argparse.Namespace) -> int:
    from .backends import to_numpy
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
    device = _device(args.device)
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
    p.add_argument("--dtypes", default="float32,float64",
                   help="comma-separated dtypes, float32 and/or float64 (the default: both)")
    p.add_argument("--cases", help="comma-separated case names (default: all)")


def parity(args: argparse.Namespace) -> int:
    from . import parity as suite
    from .backends import available_devices

    dtypes = args.dtypes.split(",")
    wrong = [d for d in dtypes if d not in suite.TOLERANCES]
    if wrong:  # layers compute in float32 or float64 only: every case would fail
        raise ValueError(f"--dtypes: expected {' and/or '.join(suite.TOLERANCES)}, got "
                         f"{', '.join(map(repr, wrong))}")
    devices = available_devices()
    if args.devices:
        devices = []
        for spec in args.devices.split(","):
            if not spec.strip():  # get_device would take it for "auto"
                raise ValueError(f"--devices: an empty entry in {args.devices!r}; expected "
                                 "devices such as cpu,emulated,cuda:0")
            try:
                devices.append(_device(spec, "--devices"))
            except ValueError as e:
                raise ValueError(e if str(e).startswith("--devices") else
                                 f"--devices: {e}") from None
    cases = args.cases.split(",") if args.cases else None
    unknown = set(cases or ()) - set(suite.CASES)
    if unknown:
        raise ValueError(f"unknown parity cases {sorted(unknown)}; known: {sorted(suite.CASES)}")
    results = suite.run(devices, dtypes, cases)
    print(suite.table(results))
    return 0 if all(r.ok for r in results) else 1


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="gpunet", description="gpunet: train and inspect neural networks on "
                     "NumPy (CPU) or CuPy (NVIDIA GPU).")
    parser.add_argument("--version", action="version", version=f"gpunet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sample_parser(sub)
    _parity_parser(sub)
    sub.add_parser("info", help="versions, the chosen device and what is usable",
                   description="Print versions, the device 'auto' picks, the GPU name when "
                               "there is one, and whether CuPy, the emulator's C++ compiler "
                               "and the kernels are usable.")
    sub.add_parser("bench", help="training-step benchmarks against PyTorch (see "
                   "`gpunet bench --help`)", add_help=False)
    return parser


def _interrupted(argv: list[str], started: float) -> str:
    """The one line for Ctrl-C; for ``gpunet train`` with a checkpoint written by this run (or
    resumed from), the command that continues it."""
    if argv[:1] != ["train"]:
        return " ".join(["gpunet", *argv[:1]]) + ": interrupted"
    try:
        args = _parser().parse_args(argv)
    except SystemExit:  # interrupted while the options were read
        return "gpunet train: interrupted"
    path = args.checkpoint
    if path is None or not os.path.isfile(path) or (
            not args.resume and os.path.getmtime(path) < started - 2):  # an older run's file
        # (the 2 s of slack: file systems that keep coarse modification times)
        return "gpunet train: interrupted; no checkpoint was written (--checkpoint PATH)"
    from .serialize import read_meta
    try:
        held = f" holds epoch {read_meta(path)['epoch']}"
    except (ValueError, KeyError):
        held = ""
    again = shlex.join(["gpunet", *argv, *([] if args.resume else ["--resume"])])
    return f"gpunet train: interrupted; the checkpoint {path}{held}: resume with {again}"


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        from .bench import main as bench_main
        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return {"train": train, "sample": sample, "info": info,
                "parity": parity}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"gpunet {args.command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gpunet ARGV`` (default ``sys.argv[1:]``) and return its exit status: 0, 1 (training
    diverged, a parity case failed, or standard output was closed early), 2 (a usage error,
    printed as one line ``gpunet CMD: error: ...``) or 130 (Ctrl-C, one line).

    >>> main(["train", "mlp", "--data", "digits", "--epochs", "1"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.time()
    try:
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        # The reader left (`gpunet info | head -2`): the Python docs' recipe (signal module,
        # "Note on SIGPIPE"): point stdout at devnull so that the exit's flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        newline = "\n" if sys.stderr.isatty() else ""  # off a progress bar's line
        print(f"{newline}{_interrupted(argv, started)}", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
