"""Issue 17, a new user's losses and files: targets of the wrong kind are refused (in the
loss, and by ``gpunet train`` before training), ``L1`` and ``Huber`` as PyTorch's, layer
constructors that reject bad argument types with gpunet's messages, and every broken model
file ends in CheckpointError."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

import gpunet
from gpunet import data, layers, losses, optim
from gpunet.errors import CheckpointError, DTypeError, ShapeError
from gpunet.layers import LAYERS, Dense, ReLU, Sequential
from gpunet.losses import (MSE, BinaryCrossEntropy, BinaryCrossEntropyWithLogits, DiceLoss,
                           FocalLoss, Huber, L1, SoftmaxCrossEntropy)
from helpers import analytic_grad, numeric_grad

R = np.random.default_rng(17)


# -- 1. targets of the wrong kind ----------------------------------------------------------
def test_softmax_ce_refuses_a_single_logit_column():
    """The issue's case: logits (2, 1) with float targets (2, 1) returned 0.0."""
    for target in (np.array([[0.3], [0.9]]), np.array([0, 0])):
        with pytest.raises(ShapeError, match=r"SoftmaxCrossEntropy: expected logits \(\.\.\., "
                           r"C\) of at least 2 classes, got shape \(2, 1\).*"
                           "BinaryCrossEntropyWithLogits"):
            SoftmaxCrossEntropy()(np.zeros((2, 1)), target)


def test_softmax_ce_float_targets_must_be_probabilities():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: expected class probabilities "
                       r">= 0, got -0\.5"):
        SoftmaxCrossEntropy()(x, np.array([[1.0, 0.0, 0.0], [0.5, -0.5, 1.0]]))
    with pytest.raises(DTypeError, match="SoftmaxCrossEntropy.*integers, got dtype float"):
        SoftmaxCrossEntropy()(x, np.array([0.0, 2.0]))  # float class indices


@pytest.mark.parametrize("make", [BinaryCrossEntropy, BinaryCrossEntropyWithLogits, FocalLoss,
                                  DiceLoss])
def test_binary_losses_refuse_targets_outside_0_1(make):
    """Class indices 0..9 given to a binary loss used to give some number without an error."""
    pred = np.full((2, 3), 0.5)
    with pytest.raises(ValueError, match=rf"{make.__name__}: expected targets in \[0, 1\], "
                       "got 3.0"):
        make()(pred, np.array([[0, 1, 3], [0, 0, 1]]))
    make()(pred, np.array([[0, 1, 0.25], [0, 0, 1]]))  # soft targets are fine


def test_bce_refuses_logits_for_probabilities():
    with pytest.raises(ValueError, match=r"BinaryCrossEntropy: expected probabilities as the "
                       r"prediction \(logits: use BinaryCrossEntropyWithLogits\), in \[0, 1\], "
                       "got 2.5"):
        BinaryCrossEntropy()(np.array([0.5, 2.5]), np.array([1.0, 0.0]))


def test_other_losses_refuse_mismatched_targets():
    with pytest.raises(ShapeError, match=r"MSE.*\(4, 1\).*got \(4,\)"):
        MSE()(np.zeros((4, 1)), np.zeros(4))
    with pytest.raises(ShapeError, match=r"BatchTripletLoss.*labels of shape \(4,\)"):
        losses.BatchTripletLoss()(np.zeros((4, 2)), np.zeros((4, 1), dtype=np.int64))
    with pytest.raises(DTypeError, match="BatchTripletLoss.*integer class labels"):
        losses.BatchTripletLoss()(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ShapeError, match=r"CosineEmbeddingLoss.*\(3,\)"):
        losses.CosineEmbeddingLoss()([np.ones((3, 2)), np.ones((3, 2))], np.ones((3, 1)))
    with pytest.raises(ShapeError, match="ContentLoss.*target of shape"):
        losses.ContentLoss()(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ShapeError, match="TripletLoss.*list"):
        losses.TripletLoss()(np.zeros((3, 2)))


def test_bad_targets_on_a_gpu_are_flagged_without_reading(standin):
    """On a GPU the range checks run on the device: the loss turns NaN, ``check()`` says why."""
    gpu = gpunet.device("cuda:0")
    counters = standin._standin.counters
    loss = BinaryCrossEntropyWithLogits()
    counters.reset()
    value = loss(gpu.asarray(np.zeros((2, 2), np.float32)), gpu.asarray(np.array([[0, 1], [7, 0]])))
    assert counters.host_reads == 0
    assert np.isnan(float(value))
    with pytest.raises(ValueError, match=r"BinaryCrossEntropyWithLogits: expected targets in "
                       r"\[0, 1\], got 7"):
        loss.check()


def _trainer(model, loss):
    return gpunet.Trainer(model, loss, optim.SGD(model.params(), lr=0.1), progress=False)


def test_fit_refuses_a_model_that_does_not_fit_before_any_step():
    train, _ = data.adding(seq_len=5)
    model = Sequential([layers.Flatten(), Dense(10, 1)])
    before = {k: p.data.copy() for k, p in model.params().items()}
    trainer = _trainer(model, SoftmaxCrossEntropy())
    with pytest.raises(ShapeError, match="SoftmaxCrossEntropy.*at least 2 classes"):
        trainer.fit(train, epochs=1)
    assert trainer.history == []
    for k, p in model.params().items():
        np.testing.assert_array_equal(p.data, before[k])
    _trainer(model, MSE()).check_data(train)  # the right loss passes


def test_check_data_draws_nothing_and_changes_nothing():
    train, _ = data.spirals()
    model = Sequential([Dense(2, 8), layers.Dropout(0.5), ReLU(), Dense(8, 3)])
    trainer = _trainer(model, SoftmaxCrossEntropy())
    state = gpunet.rng.get_state()
    trainer.check_data(train)
    assert gpunet.rng.get_state() == state
    assert all(not p.grad.any() for p in model.params().values())


def _run(*args):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gpunet", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("model, dataset, says", [
    ("mlp", "adding", "SoftmaxCrossEntropy: expected logits (..., C) of at least 2 classes"),
    ("lenet", "shapes", "SoftmaxCrossEntropy: expected logits (..., C) of at least 2 classes"),
    ("embed", "adding", "BatchTripletLoss: expected labels of shape (2,)"),
    ("unet", "digits", "DiceLoss: expected the target of shape (2, 10, 8, 8)"),
])
def test_train_refuses_a_model_and_dataset_that_do_not_fit(model, dataset, says, tmp_path):
    done = _run("train", model, "--data", dataset, "--epochs", "3", "--device", "cpu",
                "--no-progress", "--checkpoint", str(tmp_path / "run.ckpt"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"gpunet train: error: model {model!r} does not fit dataset "
                               f"{dataset!r} (checked on two samples before training): ")
    assert says in lines[0]
    assert not (tmp_path / "run.ckpt").exists() and done.stdout == ""


# -- 2. L1 and Huber -----------------------------------------------------------------------
def test_l1_and_huber_by_hand():
    pred, target = np.array([0.0, 1.0, -3.0, 2.0]), np.array([0.5, 1.0, 0.0, -0.5])
    # |d| = 0.5, 0, 3, 2.5
    assert L1(reduction="sum")(pred, target) == pytest.approx(6.0)
    assert L1()(pred, target) == pytest.approx(1.5)
    # delta 1: 0.125, 0, 3 - 0.5, 2.5 - 0.5
    assert Huber(reduction="sum")(pred, target) == pytest.approx(0.125 + 2.5 + 2.0)
    # delta 2: 0.125, 0, 2 (3 - 1), 2 (2.5 - 1) * 2
    assert Huber(delta=2.0, reduction="sum")(pred, target) == pytest.approx(0.125 + 4 + 3)
    loss = Huber(delta=1.0, reduction="sum")
    loss(pred, target)
    np.testing.assert_array_equal(loss.backward(), [-0.5, 0.0, -1.0, 1.0])
    loss = L1(reduction="sum")
    loss(pred, target)
    np.testing.assert_array_equal(loss.backward(), [-1.0, 0.0, -1.0, 1.0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make", [L1, lambda **kw: Huber(0.7, **kw)])
def test_l1_and_huber_match_torch(make, reduction):
    torch = pytest.importorskip("torch")
    pred, target = R.normal(size=(4, 5)) * 2, R.normal(size=(4, 5))
    loss = make(reduction=reduction)
    value, grad = loss(pred, target), loss.backward()
    p = torch.tensor(pred, requires_grad=True)
    ref = (torch.nn.L1Loss(reduction=reduction) if isinstance(loss, L1)
           else torch.nn.HuberLoss(reduction=reduction, delta=0.7))(p, torch.tensor(target))
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("make", [L1, Huber, lambda **kw: Huber(0.3, **kw)])
def test_l1_and_huber_gradients_match_central_differences(make, reduction):
    # differences away from the kinks at d = 0 and |d| = delta (1 and 0.3), both quadratic
    # and linear pieces
    d = np.array([0.1, -0.2, 0.5, -0.8, 1.5, -2.0, 0.25, -0.05, 0.6, -1.2, 2.5, -0.4])
    target = R.normal(size=(3, 4))
    pred = target + d.reshape(3, 4)
    loss = make(reduction=reduction)
    np.testing.assert_allclose(analytic_grad(loss, pred, target),
                               numeric_grad(loss, pred, target), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("make", [L1, Huber])
def test_l1_and_huber_on_each_device(make, device):
    pred, target = R.normal(size=(3, 4)), R.normal(size=(3, 4))
    host = make()
    want, want_grad = host(pred, target), host.backward()
    loss = make()
    value = loss(device.asarray(pred, dtype=np.float32), device.asarray(target))
    grad = loss.backward()
    assert np.ndim(value) == 0 and (device.on_host or device.owns(value))
    assert device.owns(grad) and grad.dtype == np.float32
    assert float(value) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(gpunet.to_numpy(grad), want_grad, rtol=1e-5, atol=1e-6)


def test_l1_and_huber_bad_input():
    for bad in (0, -1.0, "1", None, True):
        with pytest.raises(ValueError, match=f"Huber: expected delta > 0, got {bad!r}"):
            Huber(delta=bad)
    with pytest.raises(ValueError, match="L1: expected reduction 'mean' or 'sum', got 'none'"):
        L1(reduction="none")
    for make in (L1, Huber):
        with pytest.raises(ShapeError, match=rf"{make.__name__}.*\(3, 1\).*got \(3,\)"):
            make()(np.zeros((3, 1)), np.zeros(3))
        with pytest.raises(DTypeError, match=f"{make.__name__}.*float32 or float64"):
            make()(np.zeros(3, dtype=np.int64), np.zeros(3))
    assert repr(Huber(2)) == "Huber(delta=2.0, reduction='mean')"


# -- 4. every broken file ends in CheckpointError ------------------------------------------
@pytest.fixture
def saved(tmp_path):
    gpunet.seed(3)
    model = Sequential([Dense(3, 4), ReLU(), Dense(4, 2)])
    path = tmp_path / "model.npz"
    gpunet.save(model, path)
    return model, path


def _refused(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        gpunet.load(path)
    assert "allow_pickle" not in str(info.value)  # NumPy's advice is not gpunet's switch


def test_files_that_are_not_models(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _refused(tmp_path / "objects.npy", r"not a gpunet file \(a single NumPy array \(\.npy\)\)")
    (tmp_path / "pickle.npz").write_bytes(__import__("pickle").dumps({"a": 1}))
    _refused(tmp_path / "pickle.npz", r"not a gpunet file \(not a \.npz archive\)")
    np.savez(tmp_path / "objects.npz", a=np.array([{"a": 1}], dtype=object))
    _refused(tmp_path / "objects.npz", "holds pickled \\(object\\) arrays, which gpunet neither")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    _refused(tmp_path / "plain.npz", "no gpunet header")
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    _refused(tmp_path / "random.npz", "not a .npz archive")
    (tmp_path / "empty.npz").write_bytes(b"")
    _refused(tmp_path / "empty.npz", r"not a gpunet file \(an empty file\)")
    _refused(tmp_path, "is a directory")
    with pytest.raises(FileNotFoundError):  # missing is not broken: the usual error
        gpunet.load(tmp_path / "missing.npz")


def test_truncated_files(saved):
    _, path = saved
    raw = path.read_bytes()
    for size in (2, 4, 30, len(raw) // 2, len(raw) - 22, len(raw) - 1):
        path.write_bytes(raw[:size])
        _refused(path, "not a")


def test_seeded_byte_flips_load_the_same_model_or_raise_checkpoint_error(saved):
    """Flip one bit at 300 seeded offsets of a small model file: each load either gives the
    same arrays (a flip in a byte nothing reads, such as a timestamp) or raises
    CheckpointError, never another exception (a garbled zip version field raised
    ``NotImplementedError: zip file version 7.5``)."""
    model, path = saved
    raw = path.read_bytes()
    want = {k: p.data for k, p in model.params().items()}
    g = np.random.default_rng(2024)
    loaded = refused = 0
    for offset, bit in zip(g.integers(0, len(raw), 300), g.integers(0, 8, 300)):
        damaged = bytearray(raw)
        damaged[offset] ^= 1 << int(bit)
        path.write_bytes(bytes(damaged))
        try:
            got = gpunet.load(path)
        except CheckpointError:
            refused += 1
            continue
        loaded += 1
        assert got.config() == model.config()
        for k, p in got.params().items():
            np.testing.assert_array_equal(p.data, want[k])
    assert refused > 200 and loaded  # both outcomes happen: the test sees both paths
    path.write_bytes(raw)
    gpunet.load(path)


def test_zip_version_field_garbled(saved):
    """The issue's case: the central directory's "version needed" field made absurd."""
    _, path = saved
    raw = bytearray(path.read_bytes())
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 6] = 75  # version needed to extract: 7.5
    raw[central + 7] = 0
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="NotImplementedError: zip file version 7.5"):
        gpunet.load(path)


def test_cli_reports_a_broken_model_in_one_line(saved):
    _, path = saved
    path.write_bytes(path.read_bytes()[:100])
    done = _run("sample", str(path), "--prompt", "a", "--device", "cpu")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"gpunet sample: error: {path}: not a readable gpunet file")


# -- 3. constructor arguments of the wrong type --------------------------------------------
def test_dense_names_a_wrong_argument_type():
    with pytest.raises(TypeError, match=r"^Dense: expected in_features to be an int, got str "
                       r"'64'$"):
        Dense("64", 5)
    with pytest.raises(TypeError, match="^Dense: expected out_features to be an int, got float"):
        Dense(3, 5.0)
    with pytest.raises(TypeError, match="^Dense: expected bias to be a bool, got str 'no'"):
        Dense(3, 4, bias="no")  # was taken silently, as a bias
    with pytest.raises(ValueError, match="^Dense: unknown initialiser 'he'"):
        Dense(3, 4, init="he")
    Dense(np.int64(3), np.int32(4))  # NumPy integers are ints
    layers.LeakyReLU(1)  # an int where a float is expected is fine, as in PyTorch


def _base_arguments():
    """Valid arguments for every layer of the registry (a new layer must be added here)."""
    return {
        "AdditiveAttention": dict(query_dim=4, key_dim=4, hidden_dim=4),
        "AvgPool2D": dict(kernel_size=2), "BatchNorm": dict(features=3),
        "Bidirectional": dict(layer=layers.LSTM(2, 3)),
        "Conv2D": dict(in_channels=1, out_channels=2, kernel_size=3),
        "ConvTranspose2D": dict(in_channels=1, out_channels=2, kernel_size=3),
        "Dense": dict(in_features=3, out_features=2),
        "Embedding": dict(num_embeddings=5, embedding_dim=3),
        "GRU": dict(input_size=2, hidden_size=3),
        "Graph": dict(inputs="x", nodes=[["fc", Dense(2, 2), "x"]]),
        "Inception": dict(in_channels=2, c1=1, c3r=1, c3=1, c5r=1, c5=1, pool_proj=1),
        "LSTM": dict(input_size=2, hidden_size=3), "LayerNorm": dict(normalized_shape=3),
        "MaxPool2D": dict(kernel_size=2), "MultiHeadAttention": dict(embed_dim=4, num_heads=2),
        "MultiplicativeRNN": dict(input_size=2, hidden_size=3),
        "NonlinearityGenerator": dict(features=3),
        "PositionEmbedding": dict(max_len=5, embedding_dim=3),
        "PositionalEncoding": dict(embedding_dim=4), "RNN": dict(input_size=2, hidden_size=3),
        "Recurrent2D": dict(input_size=2, hidden_size=3), "Reshape": dict(shape=(3,)),
        "ResidualBlock": dict(in_channels=2, out_channels=2),
        "Sequential": dict(layers=[Dense(2, 2)]), "SigmoidGenerator": dict(features=3),
        "Subsampling2D": dict(channels=2, kernel_size=2),
    }


def _gpunet_layers():
    return sorted(name for name, cls in LAYERS.items() if cls.__module__.startswith("gpunet."))


@pytest.mark.parametrize("name", _gpunet_layers())
def test_every_layer_names_itself_for_arguments_of_the_wrong_type(name):
    cls, base = LAYERS[name], _base_arguments().get(name, {})
    required = [p.name for p in inspect.signature(cls).parameters.values()
                if p.default is inspect.Parameter.empty]
    assert set(required) <= set(base), f"add valid arguments for {name} to the table"
    cls(**base)
    for arg in inspect.signature(cls).parameters:
        for bad in ("3", 2.5, object(), [1, "a"], {"a": 1}):
            try:
                cls(**{**base, arg: bad})
            except (TypeError, ValueError) as e:
                assert str(e).startswith(f"{name}: "), f"{name}({arg}={bad!r}): {e!r}"
            else:  # taken: only where the type fits the annotation (a float for a float)
                assert isinstance(bad, float), f"{name} took {arg}={bad!r}"


def test_checked_layers_still_rebuild_from_their_description():
    model = Sequential([layers.Conv2D(1, 2, (3, 3), padding="same"), layers.Flatten(),
                        layers.LayerNorm([18]), Dense(18, 2, init="he_normal")])
    assert gpunet.layers.from_config(model.config()).config() == model.config()
