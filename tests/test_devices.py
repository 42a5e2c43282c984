"""Device placement on two GPUs: the real CudaBackend on the CuPy stand-in's cuda:0 and cuda:1.

CuPy puts every new array and loaded kernel module on the thread's *current* device. These
tests run everything on ``cuda:1`` while the thread's current device stays 0 (the default) and
then walk every array the model, optimizer and trainer hold: any work that escaped gpunet's
device scoping (``on_device``) shows up as an array on cuda:0, or as the stand-in's error for
reading another device's memory. Results are stand-in results, never GPU results.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import gpunet
from gpunet import Sequential, Trainer, data, gradcheck, optim, rng
from gpunet.backends import Backend
from gpunet.layers import (LSTM, BatchNorm, Conv2D, Dense, Dropout, Flatten, LastStep,
                           MaxPool2D, ReLU, TimeMajor)
from gpunet.layers.base import Layer
from gpunet.losses import SoftmaxCrossEntropy
from standin import standin_env


def device_arrays(root: object, name: str, cupy) -> list[tuple[str, int]]:
    """``(path, device id)`` of every CuPy array reachable from ``root`` through the attributes
    and slots of gpunet objects (and of their subclasses'), dicts, lists and tuples."""
    found: list[tuple[str, int]] = []
    seen: set[int] = set()

    def visit(obj: object, path: str) -> None:
        if id(obj) in seen or isinstance(obj, Backend):
            return
        seen.add(id(obj))
        if isinstance(obj, cupy.ndarray):
            found.append((path, obj.device.id))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{path}[{k!r}]")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{path}[{i}]")
        elif any(c.__module__.startswith("gpunet") for c in type(obj).__mro__):
            for k, v in getattr(obj, "__dict__", {}).items():
                visit(v, f"{path}.{k}")
            for slot in getattr(type(obj), "__slots__", ()):
                visit(getattr(obj, slot, None), f"{path}.{slot}")
    visit(root, name)
    return found


def assert_all_on(gpu: int, cupy, **roots: object) -> int:
    """Every array under ``roots`` lives on ``gpu``; returns how many there are."""
    arrays = [a for name, root in roots.items() for a in device_arrays(root, name, cupy)]
    astray = [path for path, dev in arrays if dev != gpu]
    assert not astray, f"arrays not on cuda:{gpu}: {astray}"
    return len(arrays)


MODELS = {  # small models that reach every kind of operation: GEMMs, kernels, dropout, slots
    "mlp": (lambda: Sequential([Dense(64, 32), BatchNorm(32), ReLU(), Dropout(0.2),
                                Dense(32, 10)]), data.digits),
    "conv": (lambda: Sequential([Conv2D(1, 4, 3, padding=1), BatchNorm(4), ReLU(),
                                 MaxPool2D(2), Flatten(), Dense(64, 10)]),
             lambda: data.digits(flat=False)),
    "lstm": (lambda: Sequential([TimeMajor(), LSTM(8, 12), LastStep(), Dense(12, 10)]),
             data.digits_rows),
}


def _subset(d: data.Dataset, n: int) -> data.Dataset:
    return data.Dataset(d.x[:n], d.y[:n], d.name, d.num_classes)


def _train(kind: str, device: str, tmp_path, epochs: int = 2, resume: bool = False):
    """Train a fresh ``MODELS[kind]`` on ``device`` with a checkpoint per device (``resume``
    continues from it)."""
    build, load = MODELS[kind]
    train, test = (_subset(d, 96) for d in load())
    gpunet.seed(0)
    model = build().to(dtype=np.float64)  # so CPU and GPU results agree beyond rounding
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.Adam(model.params(), lr=0.01),
                      device=device, clip_norm=1.0, progress=False)
    with rng.host_draws():  # the CPU's dropout masks on the GPU too
        history = trainer.fit(train, epochs, batch_size=32, val=test, seed=0, resume=resume,
                              checkpoint=tmp_path / f"{kind}-{device.replace(':', '')}.npz")
    return trainer, history, test


@pytest.mark.parametrize("kind", list(MODELS))
def test_training_on_cuda1_stays_on_cuda1_and_matches_the_cpu(kind, standin, tmp_path):
    trainer, history, test = _train(kind, "cuda:1", tmp_path)
    assert standin.cuda.runtime.getDevice() == 0  # nobody made GPU 1 current for the test
    assert standin._standin.counters.launches > 0  # gpunet's kernels ran (BatchNorm, conv, LSTM)
    scores = trainer.evaluate(test)
    pred = trainer.predict(test.x)
    gpunet.save(trainer.model, tmp_path / "model.npz")
    loaded = gpunet.load(tmp_path / "model.npz", device="cuda:1")
    resumed, resumed_history, _ = _train(kind, "cuda:1", tmp_path, epochs=3, resume=True)
    assert len(resumed_history) == 3
    count = assert_all_on(1, standin, model=trainer.model, optimizer=trainer.optimizer,
                          trainer=trainer, loaded=loaded, resumed=resumed)
    assert count > 3 * len(trainer.model.params())  # params, grads, slots, state were walked

    cpu_trainer, cpu_history, _ = _train(kind, "cpu", tmp_path)
    for got, want in zip(history, cpu_history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-9)
    # Adam's normalised steps carry the last bits of the kernels' other summation order along
    np.testing.assert_allclose(pred, cpu_trainer.predict(test.x), rtol=1e-6, atol=1e-9)
    assert scores["loss"] == pytest.approx(cpu_trainer.evaluate(test)["loss"], rel=1e-9)
    np.testing.assert_allclose(gpunet.to_numpy(loaded.forward(
        gpunet.asarray(test.x, "cuda:1", dtype=np.float64), training=False)), pred,
        rtol=1e-12, atol=1e-12)


def test_gradcheck_on_cuda1(standin):
    layer = Sequential([Conv2D(2, 3, 3, padding=1), BatchNorm(3), ReLU()]).to("cuda:1",
                                                                              np.float64)
    x = gpunet.asarray(np.random.default_rng(0).normal(size=(2, 2, 4, 4)), "cuda:1",
                       dtype=np.float64)
    report = gradcheck(layer, x, max_entries=20)
    assert report.ok, str(report)
    assert_all_on(1, standin, layer=layer)


def test_every_backend_operation_lands_on_its_gpu(standin):
    gpu1 = gpunet.device("cuda:1")
    on0 = gpunet.asarray(np.arange(6.0).reshape(2, 3), "cuda:0")
    moved = gpu1.asarray(on0)
    assert moved.device.id == 1 and on0.device.id == 0
    for made in (gpu1.zeros((2, 3)), gpu1.zeros_like(moved), gpu1.empty((2,)),
                 gpu1.exp(moved), gpu1.sum(moved, axis=0), gpu1.gemm(moved, moved, trans_b=True),
                 gpu1.relu(moved), gpu1.dropout_mask((4, 4), 0.5, np.float32)):
        assert made.device.id == 1
    assert standin.cuda.runtime.getDevice() == 0


def test_dropout_masks_are_drawn_on_the_gpu(standin):
    gpu1, counters = gpunet.device("cuda:1"), standin._standin.counters
    gpunet.seed(3)
    counters.reset()
    first = gpu1.dropout_mask((64, 32), 0.25, np.float32)
    assert counters.uploads == 0 and first.device.id == 1
    kept = gpunet.to_numpy(first)
    assert set(np.unique(kept)) == {0.0, np.float32(1 / 0.75)}
    assert 0.6 < (kept > 0).mean() < 0.9
    gpunet.seed(3)  # a seed fixes the device's draws too
    np.testing.assert_array_equal(gpunet.to_numpy(gpu1.dropout_mask((64, 32), 0.25, np.float32)),
                                  kept)
    gpunet.seed(3)
    with rng.host_draws():  # the host stream's masks: the CPU's, uploaded
        host = gpunet.to_numpy(gpu1.dropout_mask((64, 32), 0.25, np.float32))
    gpunet.seed(3)
    np.testing.assert_array_equal(host, gpunet.device("cpu").dropout_mask((64, 32), 0.25,
                                                                          np.float32))


def test_a_layer_moved_between_gpus_keeps_working(standin):
    layer = Dense(3, 2).to("cuda:0")
    x0 = gpunet.asarray(np.ones((4, 3), np.float32), "cuda:0")
    y0 = gpunet.to_numpy(layer.forward(x0))
    layer.to("cuda:1")
    assert_all_on(1, standin, layer=layer)
    y1 = layer.forward(gpunet.asarray(np.ones((4, 3), np.float32), "cuda:1"))
    np.testing.assert_array_equal(gpunet.to_numpy(y1), y0)


class _Planted(Layer):
    """A layer with a helper outside the protocol that allocates on whatever device is current
    (the kind of code device scoping must not depend on being absent)."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = None

    def prepare(self, n: int) -> None:  # not forward/backward: runs unscoped
        self.cache = self.ops.xp.zeros((n, 1), dtype=self.dtype)

    def forward(self, x, training=True):
        return x + self.cache

    def backward(self, dy):
        return dy


def test_an_allocation_outside_the_mechanism_is_caught(standin):
    layer = _Planted().to("cuda:1")
    layer.prepare(2)  # the thread's current device is 0: the cache lands there
    with pytest.raises(AssertionError, match=r"not on cuda:1: \['layer.cache'\]"):
        assert_all_on(1, standin, layer=layer)
    with pytest.raises(ValueError, match="device"):  # and reading it from GPU 1 fails
        layer.forward(gpunet.asarray(np.ones((2, 3), np.float32), "cuda:1"))
    with standin.cuda.Device(1):  # made on the right device, both checks pass
        layer.prepare(2)
    assert_all_on(1, standin, layer=layer)
    assert layer.forward(gpunet.asarray(np.ones((2, 3), np.float32), "cuda:1")).device.id == 1


def test_command_line_on_cuda1_says_it_is_the_standin(tmp_path):
    """As a user would run it (in a fresh process, importing the stand-in as ``cupy``):
    ``gpunet info`` and ``gpunet train --device cuda:1`` name the stand-in, not a GPU."""
    env = standin_env()
    info = subprocess.run([sys.executable, "-m", "gpunet", "info"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "device: cuda:0 (CuPy stand-in)" in info.stdout and "not a GPU" in info.stdout
    out = tmp_path / "metrics.json"
    done = subprocess.run([sys.executable, "-m", "gpunet", "train", "mlp", "--data", "digits",
                           "--epochs", "2", "--device", "cuda:1", "--no-progress",
                           "--metrics-out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(out.read_text())
    assert metrics["device"] == "cuda:1 (CuPy stand-in)"
    assert metrics["test_accuracy"] > 0.9
