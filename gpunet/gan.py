"""Generative adversarial networks (Goodfellow et al. 2014) trained with gpunet's explicit
backward: a generator ``G`` maps noise ``z ~ N(0, I)`` to samples, a discriminator ``D`` maps
a sample to one logit, ``D(x) = sigmoid(logit)`` the probability that ``x`` is real.

The algorithm of the reference notes: for every generator step, ``k`` discriminator steps,
each on a minibatch of ``m`` real samples and ``m`` generated ones, descending

    L_D = -(1/m) sum_i [ log D(x_i) + log(1 - D(G(z_i))) ]

(binary cross-entropy on D's logits, real label 1, or 0.9 with one-sided label smoothing);
then one generator step on fresh noise, descending either

    minimax:         L_G = (1/m) sum_i log(1 - D(G(z_i)))     dL_G/dlogit = -sigmoid(l) / m
    non-saturating:  L_G = -(1/m) sum_i log D(G(z_i))         dL_G/dlogit = (sigmoid(l) - 1) / m

The gradient reaches G through D's input gradient: ``D.backward`` returns ``dL_G/dG(z)``,
which ``G.backward`` takes. D's optimizer does not step in the generator step (the parameter
gradients that backward leaves in D are cleared before D's next step), and G's optimizer does
not step in D's steps. For a fixed G the best D is ``D* = p_r / (p_r + p_g)``, 1/2 where G has
learnt the data.

Use::

    G, D = mlp_generator(32, (1, 8, 8)), mlp_discriminator((1, 8, 8))
    gan = GANTrainer(G, D, Adam(G.params(), 2e-4, (0.5, 0.999)),
                     Adam(D.params(), 2e-4, (0.5, 0.999)), noise_dim=32)
    gan.fit(train, epochs=200, batch_size=64, checkpoint="gan.ckpt")
    images = gan.sample(64)                      # (64, 1, 8, 8) NumPy, values in [0, 1]
"""
from __future__ import annotations

import math
import os
import time
from typing import IO, Any, Callable, Sequence

import numpy as np

from . import rng
from .backends import Backend, get_device, to_numpy
from .backends.base import on_device
from .data import DataLoader, Dataset
from .errors import TrainingDiverged
from .layers import Dense, Flatten, Graph, LeakyReLU, Reshape, Sequential, Sigmoid
from .layers.base import Layer
from .losses import BinaryCrossEntropyWithLogits
from .optim import Optimizer
from .progress import ProgressBar
from .serialize import load_checkpoint, save_checkpoint

GENERATOR_LOSSES = ("non-saturating", "minimax")


def mlp_generator(noise_dim: int, output_shape: Sequence[int],
                  hidden: Sequence[int] = (128, 256), slope: float = 0.2) -> Sequential:
    """``(N, noise_dim)`` noise to ``(N, *output_shape)`` samples in [0, 1]: Dense layers
    with LeakyReLU between them, a Sigmoid output, reshaped to the data's shape."""
    sizes = [noise_dim, *hidden]
    layers: list[Layer] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [Dense(a, b), LeakyReLU(slope)]
    layers += [Dense(sizes[-1], math.prod(output_shape)), Sigmoid(),
               Reshape(tuple(output_shape))]
    return Sequential(layers)


def mlp_discriminator(input_shape: Sequence[int], hidden: Sequence[int] = (256, 128),
                      slope: float = 0.2) -> Sequential:
    """``(N, *input_shape)`` samples to ``(N, 1)`` logits (no sigmoid: the loss takes
    logits): Dense layers with LeakyReLU between them."""
    sizes = [math.prod(input_shape), *hidden]
    layers: list[Layer] = [Flatten()]
    for a, b in zip(sizes, sizes[1:]):
        layers += [Dense(a, b), LeakyReLU(slope)]
    return Sequential([*layers, Dense(sizes[-1], 1)])


class _OptimizerPair:
    """Both optimizers as one for :func:`~gpunet.serialize.save_checkpoint`: slot names take
    the prefixes ``generator.`` and ``discriminator.``, as the parameters do in the pair
    model the checkpoint stores."""

    def __init__(self, **optimizers: Optimizer) -> None:
        self.optimizers = optimizers

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slots": {}}
        for name, opt in self.optimizers.items():
            state = opt.state_dict()
            out["slots"].update({f"{name}.{k}": v for k, v in state.pop("slots").items()})
            out[name] = state
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            if not isinstance(state.get(name), dict):
                raise ValueError(f"no state for the {name}'s optimizer")
            prefix = f"{name}."
            slots = {k[len(prefix):]: v for k, v in state["slots"].items()
                     if k.startswith(prefix)}
            opt.load_state_dict({**state[name], "slots": slots})


class GANTrainer:
    """Trains ``generator`` and ``discriminator`` against each other (see the module's
    docstring for the losses and the algorithm).

    ``generator``: ``(N, noise_dim)`` to samples shaped like the data; ``discriminator``:
    samples to ``(N, 1)`` logits. ``k`` discriminator steps per generator step;
    ``generator_loss`` ``"non-saturating"`` (default) or ``"minimax"``; ``label_smoothing``
    makes the real label 0.9 (one-sided: generated samples keep label 0).

    The non-saturating loss is the default because early in training D rejects G's samples
    confidently (``D(G(z))`` near 0), where the minimax loss's gradient ``-sigmoid(l)``
    vanishes while ``sigmoid(l) - 1`` stays near -1: both push ``D(G(z))`` up, only one
    does so with a usable gradient.

    ``fit`` runs epochs of the real data in shuffled minibatches, one discriminator step per
    minibatch and a generator step after every ``k``-th; each epoch appends ``{"epoch",
    "d_loss", "g_loss", "d_real", "d_fake", "seconds"}`` (means over the epoch's steps;
    ``d_real``, ``d_fake``: D's mean probability on real and generated samples) to
    ``history`` and, given ``checkpoint``, saves both models, both optimizers, the random
    state and the history; ``resume=True`` continues to the result of an uninterrupted run.
    Noise comes from gpunet's host stream (:mod:`gpunet.rng`), so a seed gives the same
    samples on every device. A non-finite loss stops training with
    :class:`~gpunet.TrainingDiverged` and leaves the last checkpoint alone: on the host each
    step is checked before it is applied; on a GPU a step never waits for the host, and the
    loss sums, kept on the device, are checked when the progress bar or the epoch's end reads
    them.
    """

    def __init__(self, generator: Layer, discriminator: Layer, g_optimizer: Optimizer,
                 d_optimizer: Optimizer, noise_dim: int, k: int = 1,
                 generator_loss: str = "non-saturating", label_smoothing: bool = False,
                 device: str | Backend | None = None, progress: bool = True,
                 log: IO[str] | None = None) -> None:
        if generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"GANTrainer: generator_loss must be one of {GENERATOR_LOSSES}, "
                             f"got {generator_loss!r}")
        if int(k) != k or k < 1:
            raise ValueError(f"GANTrainer: k must be a positive integer, got {k!r}")
        if int(noise_dim) != noise_dim or noise_dim < 1:
            raise ValueError(f"GANTrainer: noise_dim must be a positive integer, got "
                             f"{noise_dim!r}")
        self.device = generator.ops if device is None else get_device(device)
        dtype = generator.dtype
        # one model and one optimizer for the checkpoint; the Graph is D(G(z)) (and takes
        # its layers to its own dtype: hence the move after)
        self.pair = Graph("z", [("generator", generator, "z"),
                                ("discriminator", discriminator, "generator")])
        self.pair.to(self.device, dtype)
        self.generator = generator.set_input_grad(False)  # its input is noise
        self.discriminator = discriminator.set_input_grad(False)  # on for G's step only
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.optimizers = _OptimizerPair(generator=g_optimizer, discriminator=d_optimizer)
        self.noise_dim, self.k, self.generator_loss = int(noise_dim), int(k), generator_loss
        self.real_label = 0.9 if label_smoothing else 1.0
        self.d_loss = BinaryCrossEntropyWithLogits(reduction="sum")
        self.g_loss = BinaryCrossEntropyWithLogits()
        self.progress, self.log = progress, log
        self.history: list[dict[str, Any]] = []
        self.d_steps = 0  # discriminator steps so far, over all epochs

    # -- the two steps ---------------------------------------------------------------------
    def noise(self, n: int) -> Any:
        """``(n, noise_dim)`` standard normal noise from gpunet's host stream, on the
        device."""
        z = rng.generator().standard_normal((n, self.noise_dim))
        return self.device.asarray(z, dtype=self.generator.dtype)

    def _full(self, n: int, value: float) -> Any:
        return self.device.xp.full((n, 1), value, dtype=self.generator.dtype)

    @on_device
    def discriminator_step(self, real: Any) -> tuple[Any, Any, Any]:
        """Gradients of ``L_D`` on ``m`` real samples and ``m`` generated ones in D's
        parameters (G is only run forward); returns ``(L_D, mean D(real), mean D(fake))``
        as 0-d arrays on the device. The caller applies D's optimizer."""
        m = len(real)
        fake = self.generator.forward(self.noise(m), training=True)
        x = self.device.concat([real, fake], axis=0)
        target = self.device.concat([self._full(m, self.real_label), self._full(m, 0.0)], 0)
        self.d_optimizer.zero_grad()
        logits = self.discriminator.forward(x, training=True)
        loss = self.d_loss.forward(logits, target) / m  # (1/m) sum over both halves
        self.discriminator.backward(self.d_loss.backward() / m)
        p = self.device.sigmoid(logits)
        return loss, p[:m].mean(), p[m:].mean()

    def generator_loss_grad(self, logits: Any) -> tuple[Any, Any]:
        """``(L_G, dL_G/dlogits)`` of the chosen generator loss for D's logits on generated
        samples (formulas in the module's docstring)."""
        n = len(logits)
        if self.generator_loss == "non-saturating":  # -log D = BCE(l, 1)
            loss = self.g_loss.forward(logits, self._full(n, 1.0))
            return loss, self.g_loss.backward()
        loss = self.g_loss.forward(logits, self._full(n, 0.0))  # log(1 - D) = -BCE(l, 0)
        return -loss, -self.g_loss.backward()

    @on_device
    def generator_step(self, m: int) -> Any:
        """Gradients of ``L_G`` on ``m`` noise samples in G's parameters, through D's input
        gradient; returns ``L_G``. D's parameter gradients filled on the way are never
        applied: D's next step clears them first. The caller applies G's optimizer."""
        self.g_optimizer.zero_grad()
        fake = self.generator.forward(self.noise(m), training=True)
        self.discriminator.set_input_grad(True)
        try:
            loss, dlogits = self.generator_loss_grad(
                self.discriminator.forward(fake, training=True))
            dfake = self.discriminator.backward(dlogits)
        finally:
            self.discriminator.set_input_grad(False)
        self.generator.backward(dfake)
        return loss

    # -- training --------------------------------------------------------------------------
    @on_device
    def fit(self, train: Dataset, epochs: int, batch_size: int = 64,
            checkpoint: str | os.PathLike | None = None, resume: bool = False,
            seed: int | None = None,
            on_epoch: Callable[["GANTrainer", dict[str, Any]], None] | None = None
            ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done in all (counting resumed ones); returns
        the history. ``on_epoch(trainer, row)`` runs after each epoch (sample grids)."""
        if len(train) < batch_size:
            raise ValueError(f"GANTrainer: {len(train)} samples are fewer than one batch of "
                             f"{batch_size}")
        loader = DataLoader(train, batch_size, shuffle=True, drop_last=True, seed=seed)
        start = 0
        if resume:
            if checkpoint is None or not os.path.exists(checkpoint):
                raise FileNotFoundError(f"GANTrainer: nothing to resume from at "
                                        f"{checkpoint!r}")
            meta = load_checkpoint(checkpoint, self.pair, self.optimizers)
            start, self.history, loader.seed = meta["epoch"], meta["history"], meta["loader_seed"]
            self.d_steps = meta["d_steps"]
            rng.set_state(meta["rng"])
        else:
            self.history, self.d_steps = [], 0
        for epoch in range(start, epochs):
            row = self._epoch(loader, epoch, epochs)
            if checkpoint is not None:
                self._save(checkpoint, epoch + 1, loader.seed)
            if on_epoch is not None:
                on_epoch(self, row)
        return self.history

    def _epoch(self, loader: DataLoader, epoch: int, epochs: int) -> dict[str, Any]:
        started = time.perf_counter()
        loader.set_epoch(epoch)
        xp = self.device.xp
        # sums of the epoch on the device, read in one copy: [L_D, D(real), D(fake)] per D
        # step and L_G per G step
        d_sums, g_sum, d_count, g_count = xp.zeros(3), xp.zeros(()), 0, 0
        every_step = self.device.on_host
        bar = ProgressBar(len(loader), f"epoch {epoch + 1}/{epochs}", file=self.log,
                          enabled=self.progress)

        def means() -> dict[str, float | None]:
            values = to_numpy(xp.concatenate([d_sums, xp.asarray(g_sum).reshape(1)])).tolist()
            self._check_finite(values[0], "discriminator", epoch)
            self._check_finite(values[3] if g_count else 0.0, "generator", epoch)
            return {"d_loss": values[0] / max(d_count, 1),
                    "g_loss": values[3] / g_count if g_count else None,
                    "d_real": values[1] / max(d_count, 1), "d_fake": values[2] / max(d_count, 1)}

        for xb, _ in loader:
            real = self.device.asarray(xb, dtype=self.generator.dtype)
            d_loss, d_real, d_fake = self.discriminator_step(real)
            if every_step:  # free on the host: a bad step is never applied
                self._check_finite(float(d_loss), "discriminator", epoch)
            self.d_optimizer.step()
            d_sums = d_sums + xp.stack([d_loss, d_real, d_fake]).astype(d_sums.dtype)
            d_count += 1
            self.d_steps += 1
            if self.d_steps % self.k == 0:
                g_loss = self.generator_step(len(xb))
                if every_step:
                    self._check_finite(float(g_loss), "generator", epoch)
                self.g_optimizer.step()
                g_sum = g_sum + g_loss
                g_count += 1
            bar.update(1, means)
        row = {"epoch": epoch + 1, **means(), "seconds": time.perf_counter() - started}
        self.history.append(row)
        bar.close(d_loss=row["d_loss"], g_loss=row["g_loss"], d_real=row["d_real"],
                  d_fake=row["d_fake"])
        return row

    def _check_finite(self, loss: float, which: str, epoch: int) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(f"GANTrainer: the {which}'s loss became {loss} at epoch "
                                   f"{epoch + 1}; the last checkpoint written (if any) is the "
                                   "last good one")

    def _save(self, path: str | os.PathLike, epochs_done: int, loader_seed: int) -> None:
        xp = self.device.xp
        params = self.pair.params()
        finite = to_numpy(xp.stack([xp.isfinite(p.data).all() for p in params.values()]))
        if not finite.all():  # one read for all parameters
            name = list(params)[int(np.argmin(finite))]
            raise TrainingDiverged(f"GANTrainer: parameter {name} is no longer finite after "
                                   f"epoch {epochs_done}; the last good checkpoint is kept")
        meta = {"epoch": epochs_done, "history": self.history, "loader_seed": loader_seed,
                "d_steps": self.d_steps, "rng": rng.get_state()}
        save_checkpoint(path, self.pair, self.optimizers, meta)

    @on_device
    def sample(self, n: int | None = None, z: Any = None) -> np.ndarray:
        """Generated samples in eval mode as a NumPy array: for the given noise ``z``
        ``(N, noise_dim)``, or for ``n`` fresh draws from gpunet's stream."""
        if z is None:
            if n is None:
                raise ValueError("GANTrainer.sample: give n or z")
            z = self.noise(n)
        else:
            z = self.device.asarray(z, dtype=self.generator.dtype)
        return to_numpy(self.generator.forward(z, training=False))


def save_grid(images: np.ndarray, path: str | os.PathLike, columns: int = 8,
              scale: int = 4) -> None:
    """Write images ``(N, C, H, W)`` or ``(N, H, W)`` with values in [0, 1] as one PNG
    grid (matplotlib, the ``bench`` extra), greyscale for one channel, each pixel drawn as
    ``scale x scale`` pixels so that 8x8 digits are visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    if images.ndim == 4:
        images = images.transpose(0, 2, 3, 1)
        if images.shape[-1] == 1:
            images = images[..., 0]
    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, *images.shape[3:]))
    for i, image in enumerate(images):  # one blank pixel between the images
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = image
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(path, np.clip(grid, 0, 1), cmap="gray_r" if grid.ndim == 2 else None,
               vmin=0, vmax=1)


def plot_losses(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write the discriminator's and the generator's loss per epoch as a PNG (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [row["d_loss"] for row in history], label="discriminator $L_D$")
    ax.plot(epochs, [row["g_loss"] for row in history], label="generator $L_G$")
    ax.axhline(2 * math.log(2), color="grey", lw=0.8, ls=":", label="$L_D$ at $D = 1/2$")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_quality(classifier: Layer, samples: np.ndarray, num_classes: int,
                   min_share: float = 0.01) -> dict[str, Any]:
    """How a classifier trained on the real data labels generated ``samples``: the classes
    it predicts for at least ``min_share`` of them (``classes_covered``, their count
    ``num_covered``), and its mean top-class softmax probability (``mean_confidence``)."""
    logits = to_numpy(classifier.forward(classifier.ops.asarray(samples, dtype=classifier.dtype),
                                         training=False)).astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    counts = np.bincount(p.argmax(axis=1), minlength=num_classes)
    covered = [int(c) for c in np.flatnonzero(counts >= min_share * len(samples))]
    return {"classes_covered": covered, "num_covered": len(covered),
            "mean_confidence": float(p.max(axis=1).mean()),
            "class_counts": counts.tolist()}


#: ``gpunet train gan`` defaults: recognisable 8x8 digits in about 20 s on a 2-core CPU
DEFAULTS = {"epochs": 400, "batch_size": 64, "lr": 2e-4, "k": 1, "noise_dim": 32,
            "loss": "non-saturating"}
#: options of ``gpunet train`` that only the GAN takes (default None: not given)
OPTIONS = ("k", "noise_dim", "loss", "samples_dir", "label_smoothing")
QUALITY_SAMPLES = 1000


def train_command(args: Any) -> int:
    """``gpunet train gan``: train an MLP GAN on ``--data digits`` or ``mnist``, report how a
    classifier trained on the real data labels 1000 samples, save the generator."""
    import json
    import sys

    from . import data, models
    from .losses import SoftmaxCrossEntropy
    from .optim import Adam
    from .serialize import read_meta, save
    from .trainer import Trainer

    for option in ("distributed", "sync_batchnorm"):
        if getattr(args, option):
            raise ValueError(f"--{option.replace('_', '-')}: not available for gan")
    for option in ("seq_len", "data_file", "clip_norm", "augment", "plot"):
        if getattr(args, option, None) is not None:
            raise ValueError(f"--{option.replace('_', '-')}: not available for gan")
    if args.optimizer not in (None, "adam"):
        raise ValueError(f"--optimizer {args.optimizer}: gan trains with Adam (beta1 0.5)")
    if args.data not in ("digits", "mnist"):
        raise ValueError(f"gan: expected --data digits or mnist, got {args.data!r}")
    settings = {**DEFAULTS, **{k: getattr(args, k) for k in
                               ("epochs", "batch_size", "lr", "k", "noise_dim", "loss")
                               if getattr(args, k) is not None}}
    for name in ("epochs", "batch_size", "k", "noise_dim"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got "
                             f"{settings[name]}")
    if args.samples_dir is not None:
        try:
            import matplotlib  # noqa: F401  (checked before training, not after it)
        except ImportError:
            raise ValueError("--samples-dir needs matplotlib: pip install -e '.[bench]'") \
                from None
        os.makedirs(args.samples_dir, exist_ok=True)
    device = get_device(args.device)
    rng.seed(args.seed)
    kwargs = {"flat": False} if args.data_dir is None else {"flat": False, "path": args.data_dir}
    train, test = data.DATASETS[args.data](**kwargs)
    features = math.prod(train.input_shape)
    hidden = (128, 256) if features <= 256 else (256, 512)  # MNIST's 784 pixels want more
    G = mlp_generator(settings["noise_dim"], train.input_shape, hidden).to(device)
    D = mlp_discriminator(train.input_shape, hidden[::-1]).to(device)
    adam = lambda model: Adam(model.params(), lr=settings["lr"], betas=(0.5, 0.999))
    gan = GANTrainer(G, D, adam(G), adam(D), settings["noise_dim"], k=settings["k"],
                     generator_loss=settings["loss"],
                     label_smoothing=bool(args.label_smoothing),
                     progress=not args.no_progress)
    fixed = np.random.default_rng([args.seed, 1]).standard_normal((64, settings["noise_dim"]))

    def on_epoch(trainer: GANTrainer, row: dict[str, Any]) -> None:
        if args.samples_dir is not None:
            save_grid(trainer.sample(z=fixed),
                      os.path.join(args.samples_dir, f"samples-{row['epoch']:04d}.png"))

    print(f"gpunet: training gan on {args.data} ({len(train)} samples) on {device.label}: "
          f"{settings}, label smoothing {bool(args.label_smoothing)}", file=sys.stderr)
    if args.resume:
        print(f"gpunet: resumed from epoch {read_meta(args.checkpoint).get('epoch')} of "
              f"{settings['epochs']} ({args.checkpoint})", file=sys.stderr)
    try:
        history = gan.fit(train, settings["epochs"], settings["batch_size"],
                          checkpoint=args.checkpoint, resume=args.resume, seed=args.seed,
                          on_epoch=on_epoch)
    except TrainingDiverged as e:
        print(f"gpunet: {e}", file=sys.stderr)
        return 1
    # the whole run's training time: the history (kept in the checkpoint) times every epoch
    seconds = sum(row["seconds"] for row in history)
    if args.samples_dir is not None:
        plot_losses(history, os.path.join(args.samples_dir, "losses.png"))
    # the judge: gpunet's mlp trained on the real training set (a few seconds)
    judge = models.mlp(train.input_shape, train.num_classes).to(device)
    judging = Trainer(judge, SoftmaxCrossEntropy(), Adam(judge.params(), lr=1e-3),
                      progress=False)
    judging.fit(train, 10, 64, seed=args.seed)
    judge_accuracy = judging.evaluate(test)["accuracy"]
    quality = sample_quality(judge, gan.sample(QUALITY_SAMPLES), int(train.num_classes or 0))
    last = history[-1]
    metrics = {"classes_covered": quality["num_covered"],
               "covered": quality["classes_covered"],
               "mean_confidence": round(quality["mean_confidence"], 4),
               "class_counts": quality["class_counts"],
               "coverage_rule": f"a class counts as covered when the classifier predicts it "
                                f"for at least 1% of {QUALITY_SAMPLES} samples",
               "classifier_test_accuracy": judge_accuracy,
               "d_loss": last["d_loss"], "g_loss": last["g_loss"],
               "d_real": last["d_real"], "d_fake": last["d_fake"],
               "epochs": settings["epochs"], "seconds": round(seconds, 3),
               "device": device.label}
    print(json.dumps(metrics))
    if args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(metrics, f, indent=2)
    if args.save:
        save(G, args.save, {"noise_dim": settings["noise_dim"]})
    return 0
