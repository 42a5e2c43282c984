"""GANs (gpunet.gan): the algorithm on a problem with a known answer, which model each step
updates, the generator losses against their formulas, checkpoints, NaNs, and
`gpunet train gan` end to end."""
from __future__ import annotations

import importlib.util
import io
import math

import numpy as np
import pytest

import gpunet
from gpunet import cli, optim
from gpunet.data import Dataset
from gpunet.errors import TrainingDiverged
from gpunet.gan import GANTrainer, mlp_discriminator, mlp_generator
from gpunet.layers import Dense, LeakyReLU, Sequential
from gpunet.progress import ProgressBar
from helpers import train_command

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _gaussian(n: int = 2048, mean: float = 3.0, std: float = 0.5) -> Dataset:
    x = np.random.default_rng(0).normal(mean, std, (n, 1)).astype(np.float32)
    return Dataset(x, np.zeros(n, np.int64))


def _gan_1d(k: int = 2, lr: float = 1e-3, dtype=np.float32, **kwargs) -> GANTrainer:
    """Noise of 4 dimensions to one number; D with two hidden layers of 32."""
    G = Sequential([Dense(4, 16), LeakyReLU(0.2), Dense(16, 1)]).to(dtype=dtype)
    D = Sequential([Dense(1, 32), LeakyReLU(0.2), Dense(32, 32), LeakyReLU(0.2),
                    Dense(32, 1)]).to(dtype=dtype)
    adam = lambda m: optim.Adam(m.params(), lr, (0.5, 0.999))
    return GANTrainer(G, D, adam(G), adam(D), noise_dim=4, k=k, progress=False, **kwargs)


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.array(p.data) for k, p in model.params().items()}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_on_a_gaussian_the_generator_matches_it_and_d_goes_to_one_half():
    """Data N(3, 0.5^2): G's samples take its mean and standard deviation, and D, which
    for a fixed G is best at p_r / (p_r + p_g), is near 1/2 across the data."""
    gpunet.seed(0)
    gan = _gan_1d()
    history = gan.fit(_gaussian(), epochs=100, batch_size=64, seed=0)
    samples = gan.sample(5000)
    assert samples.shape == (5000, 1)
    assert abs(samples.mean() - 3.0) < 0.1
    assert abs(samples.std() - 0.5) < 0.075  # 15%
    grid = np.linspace(2.0, 4.0, 9, dtype=np.float32)[:, None]  # mean +- 2 std
    d = _sigmoid(gan.discriminator.forward(grid, training=False))
    assert np.abs(d - 0.5).max() < 0.05, d.ravel()
    # the notes' value at the optimum: L_D = 2 log 2 (they write the maximised -2 log 2)
    assert history[-1]["d_loss"] == pytest.approx(2 * math.log(2), abs=0.05)
    assert history[-1]["d_real"] == pytest.approx(0.5, abs=0.05)
    assert history[-1]["d_fake"] == pytest.approx(0.5, abs=0.05)


def test_each_step_updates_only_its_own_model_and_d_steps_k_times_per_g_step():
    gpunet.seed(0)
    gan = _gan_1d(k=3)
    order = []

    def spy(optimizer, mine, other, tag):
        real = optimizer.step

        def step():
            before_mine, before_other = _params(mine), _params(other)
            real()
            after_mine, after_other = _params(mine), _params(other)
            for name in before_other:
                np.testing.assert_array_equal(after_other[name], before_other[name])
            assert any(not np.array_equal(after_mine[n], before_mine[n]) for n in before_mine)
            order.append(tag)
        optimizer.step = step

    spy(gan.d_optimizer, gan.discriminator, gan.generator, "D")
    spy(gan.g_optimizer, gan.generator, gan.discriminator, "G")
    data = _gaussian(n=64 * 7)
    # D's parameter gradients filled by the generator step are not what D's step applies
    gan.fit(data, epochs=1, batch_size=64, seed=0)
    assert "".join(order) == "DDDGDDDGD"
    # after a generator step D's input gradient is off again (the data need none)
    assert gan.discriminator[0].input_grad is False


def test_the_discriminator_step_applies_its_own_gradient_not_the_generator_steps():
    """D's step clears what the generator step's backward left in D's gradients."""
    gpunet.seed(0)
    gan = _gan_1d()
    real = gan.device.asarray(_gaussian(n=16).x)
    gan.generator_step(16)  # fills D's gradients too
    gpunet.seed(5)
    gan.discriminator_step(real)
    dirty = {k: np.array(p.grad) for k, p in gan.discriminator.params().items()}
    gan.discriminator.zero_grad()
    gpunet.seed(5)
    gan.discriminator_step(real)
    for k, p in gan.discriminator.params().items():
        np.testing.assert_array_equal(p.grad, dirty[k])


@pytest.mark.parametrize("kind", ["non-saturating", "minimax"])
def test_generator_losses_and_gradients_follow_their_formulas(kind):
    gan = _gan_1d(generator_loss=kind, dtype=np.float64)
    logits = np.random.default_rng(1).normal(0, 3, (32, 1))
    d = _sigmoid(logits)
    loss, grad = gan.generator_loss_grad(logits)
    if kind == "minimax":  # L = mean log(1 - D), dL/dl = -sigmoid(l) / m
        want_loss, want_grad = np.log(1 - d).mean(), -d / 32
    else:  # L = -mean log D, dL/dl = (sigmoid(l) - 1) / m
        want_loss, want_grad = -np.log(d).mean(), (d - 1) / 32
    assert float(loss) == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)


def test_the_minimax_gradient_vanishes_where_d_rejects_the_samples():
    """Why non-saturating is the default: at D(G(z)) = sigmoid(-8) the minimax gradient is
    about 3e-4 of the non-saturating one."""
    logits = np.full((4, 1), -8.0)
    _, minimax = _gan_1d(generator_loss="minimax", dtype=np.float64).generator_loss_grad(logits)
    _, saturating = _gan_1d(dtype=np.float64).generator_loss_grad(logits)
    assert np.abs(minimax).max() < 1e-3 * np.abs(saturating).min()


@pytest.mark.parametrize("kind", ["non-saturating", "minimax"])
def test_the_generator_gradient_through_d_matches_central_differences(kind):
    """G's parameter gradients of the generator step (through D's input gradient) against
    central differences of L_G(theta_g) for fixed noise, in float64."""
    gpunet.seed(3)
    gan = _gan_1d(generator_loss=kind, dtype=np.float64)
    z = np.random.default_rng(2).normal(size=(8, 4))
    gan.noise = lambda n: z

    def loss() -> float:
        logits = gan.discriminator.forward(gan.generator.forward(z), training=True)
        return float(gan.generator_loss_grad(logits)[0])

    gan.generator_step(8)
    h = 1e-6
    for name, p in gan.generator.params().items():
        numeric = np.zeros_like(p.data)
        for i in np.ndindex(p.data.shape):
            keep = p.data[i]
            p.data[i] = keep + h
            up = loss()
            p.data[i] = keep - h
            down = loss()
            p.data[i] = keep
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(p.grad, numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    data = _gaussian(n=64 * 5)

    def run(epochs, checkpoint, resume=False):
        gpunet.seed(7)
        gan = _gan_1d(k=2, label_smoothing=True)
        gan.fit(data, epochs, batch_size=64, checkpoint=checkpoint, resume=resume, seed=3)
        return gan

    whole = run(4, tmp_path / "whole.ckpt")
    run(2, tmp_path / "part.ckpt")
    resumed = run(4, tmp_path / "part.ckpt", resume=True)
    for a, b in ((whole.generator, resumed.generator),
                 (whole.discriminator, resumed.discriminator)):
        for name, p in a.params().items():
            np.testing.assert_array_equal(p.data, b.params()[name].data)
    for opt in ("g_optimizer", "d_optimizer"):
        assert getattr(whole, opt).step_count == getattr(resumed, opt).step_count
    assert [r["d_loss"] for r in whole.history] == [r["d_loss"] for r in resumed.history]
    assert resumed.d_steps == whole.d_steps == 20
    np.testing.assert_array_equal(whole.sample(z=np.ones((2, 4))),
                                  resumed.sample(z=np.ones((2, 4))))


def test_a_nan_stops_training_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    data = _gaussian(n=64 * 3)
    checkpoint = tmp_path / "gan.ckpt"
    gpunet.seed(0)
    gan = _gan_1d()
    gan.fit(data, 2, batch_size=64, checkpoint=checkpoint, seed=0)
    saved = checkpoint.read_bytes()
    before = _params(gan.discriminator)
    data.x[:] = np.nan  # every real batch of epoch 3 is NaN
    with pytest.raises(TrainingDiverged, match="discriminator's loss became nan at epoch 3"):
        gan.fit(data, 4, batch_size=64, checkpoint=checkpoint, resume=True, seed=0)
    assert checkpoint.read_bytes() == saved
    after = _params(gan.discriminator)  # the bad step was not applied
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_gpu_an_epoch_reads_only_to_show_progress(standin, monkeypatch):
    """On the CuPy stand-in's cuda:0: one host read per progress redraw plus the epoch's
    end; nothing per step."""
    monkeypatch.setattr(ProgressBar, "INTERVAL", 0.0)  # redraw every step: the worst case
    gpunet.seed(0)
    G, D = mlp_generator(8, (1, 4, 4), (16,)), mlp_discriminator((1, 4, 4), (16,))
    gan = GANTrainer(G, D, optim.Adam(G.params()), optim.Adam(D.params()), 8,
                     device="cuda:0", log=_Terminal())
    data = Dataset(np.random.default_rng(0).random((64, 1, 4, 4), dtype=np.float32),
                   np.zeros(64, np.int64))
    gan.fit(data, 1, batch_size=16, seed=0)
    counters = standin._standin.counters
    counters.reset()
    gan.fit(data, 1, batch_size=16, seed=0)
    print(counters.as_dict())
    assert counters.host_reads <= 4 + 2, counters.as_dict()  # 4 redraws, the end, a spare
    # the noise of both steps and the real batch are the only uploads
    assert counters.uploads <= 4 * 3 + 2, counters.as_dict()


def test_gpunet_train_gan_on_digits_makes_recognisable_digits(tmp_path):
    """The command's defaults: a classifier trained on the real digits finds at least 8
    classes among 1000 samples, with mean confidence at least 0.8."""
    args = ["gan", "--data", "digits", "--save", "g.npz"]
    if HAVE_MATPLOTLIB:
        args += ["--samples-dir", "samples"]
    metrics = train_command(args, tmp_path)
    print(metrics)
    assert metrics["classes_covered"] >= 8
    assert metrics["mean_confidence"] >= 0.8
    G = gpunet.load(tmp_path / "g.npz")
    out = G.forward(np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32))
    assert out.shape == (5, 1, 8, 8)
    assert out.min() >= 0 and out.max() <= 1
    assert gpunet.serialize.read_meta(tmp_path / "g.npz") == {"noise_dim": 32}
    if HAVE_MATPLOTLIB:
        for name in ("samples-0001.png", f"samples-{metrics['epochs']:04d}.png", "losses.png"):
            assert (tmp_path / "samples" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpunet_train_gan_minimax_with_options_checkpoints_and_resumes(tmp_path, capsys):
    code = cli.main(["train", "gan", "--data", "digits", "--epochs", "2", "--k", "2",
                     "--loss", "minimax", "--noise-dim", "8", "--label-smoothing",
                     "--device", "cpu", "--no-progress", "--checkpoint",
                     str(tmp_path / "c.ckpt")])
    assert code == 0
    assert "classes_covered" in capsys.readouterr().out
    assert gpunet.serialize.read_meta(tmp_path / "c.ckpt")["epoch"] == 2
    code = cli.main(["train", "gan", "--data", "digits", "--epochs", "3", "--k", "2",
                     "--loss", "minimax", "--noise-dim", "8", "--label-smoothing",
                     "--device", "cpu", "--no-progress", "--checkpoint",
                     str(tmp_path / "c.ckpt"), "--resume"])
    assert code == 0
    meta = gpunet.serialize.read_meta(tmp_path / "c.ckpt")
    assert meta["epoch"] == 3 and [row["epoch"] for row in meta["history"]] == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["mlp", "--data", "digits", "--k", "2"], "--k: only gpunet train gan takes it"),
    (["lenet", "--data", "digits", "--samples-dir", "s"], "--samples-dir: only gpunet train"),
    (["gan", "--data", "spirals"], "gan: expected --data digits or mnist"),
    (["gan", "--data", "digits", "--k", "0"], "--k must be at least 1"),
    (["gan", "--data", "digits", "--distributed"], "--distributed: not available for gan"),
    (["gan", "--data", "digits", "--optimizer", "sgd"], "gan trains with Adam"),
    (["gan", "--data", "mnist", "--data-dir", "/nonexistent"], "nonexistent"),
])
def test_cli_mistakes_print_one_line_and_exit_2(args, message, capsys):
    assert cli.main(["train", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err


def test_samples_dir_without_matplotlib_fails_before_training(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    monkeypatch.setattr(GANTrainer, "fit", lambda *a, **k: pytest.fail("trained"))
    assert cli.main(["train", "gan", "--data", "digits", "--samples-dir", "s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("gpunet train: error: --samples-dir needs matplotlib: "
                   "pip install -e '.[bench]'")


def test_gpunet_train_gan_on_mnist_files_saves_a_28x28_generator(tmp_path, capsys):
    from test_data import _fake_mnist
    _fake_mnist(tmp_path, n_train=128, n_test=16)
    code = cli.main(["train", "gan", "--data", "mnist", "--data-dir", str(tmp_path),
                     "--epochs", "1", "--device", "cpu", "--no-progress",
                     "--save", str(tmp_path / "g.npz")])
    assert code == 0, capsys.readouterr().err
    G = gpunet.load(tmp_path / "g.npz")
    assert G.forward(np.zeros((2, 32), np.float32)).shape == (2, 1, 28, 28)
