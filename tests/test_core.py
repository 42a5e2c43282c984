"""Devices, import, seeding, initialisers, gradcheck itself, and the packaged kernel sources."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import gpunet
from gpunet import DeviceError, gradcheck, init, kernels
from gpunet.backends import Backend, CpuBackend, _cuda_available
from gpunet.layers import Dense, Layer

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_device():
    d = gpunet.device("cpu")
    assert d.name == "cpu" and d.xp is np and d is gpunet.device(" CPU ")
    a = gpunet.asarray([1.0, 2.0], d, dtype=np.float32)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    np.testing.assert_array_equal(gpunet.to_numpy(a), [1.0, 2.0])


@pytest.mark.parametrize("spec, match", [
    ("tpu", "unknown device 'tpu'"),
    ("cuda:x", "expected a device 'cuda:N' with N an integer, got 'cuda:x'"),
])
def test_bad_device_specs(spec, match):
    with pytest.raises(DeviceError, match=match):
        gpunet.device(spec)


def test_cuda_where_there_is_none_says_why():
    if _cuda_available():
        assert gpunet.device("cuda").type == "cuda"
        return
    with pytest.raises(DeviceError, match="CUDA device requested, but"):
        gpunet.device("cuda")


def test_gpus_of_the_standin(standin, monkeypatch):
    monkeypatch.delenv("GPUNET_DEVICE", raising=False)
    assert gpunet.device() == gpunet.device("cuda") == gpunet.device("cuda:0")
    assert [d.name for d in gpunet.available_devices()][-2:] == ["cuda:0", "cuda:1"]
    assert gpunet.device("cuda:1").label == "cuda:1 (CuPy stand-in)"
    assert "stand-in" in repr(gpunet.device("cuda:1"))
    with pytest.raises(DeviceError, match="CUDA device 2 requested, but 2 GPU"):
        gpunet.device("cuda:2")


def test_auto_device_and_environment_override(monkeypatch):
    monkeypatch.delenv("GPUNET_DEVICE", raising=False)
    assert gpunet.device().type == ("cuda" if _cuda_available() else "cpu")
    monkeypatch.setenv("GPUNET_DEVICE", "cpu")
    assert gpunet.device("auto").name == "cpu"
    monkeypatch.setenv("GPUNET_DEVICE", "tpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        gpunet.device()


def test_import_is_fast_and_does_not_import_cupy():
    code = ("import sys, time; t = time.perf_counter(); import gpunet; "
            "print(time.perf_counter() - t); print(any(m.split('.')[0] == 'cupy' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    assert float(out[0]) < 1.0
    assert out[1] == "False"


def test_seed_gives_the_same_weights():
    gpunet.seed(42)
    a = Dense(8, 4).weight.data.copy()
    gpunet.seed(42)
    b = Dense(8, 4).weight.data
    gpunet.seed(43)
    c = Dense(8, 4).weight.data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name, std", [
    ("he_normal", np.sqrt(2 / 200)), ("he_uniform", np.sqrt(2 / 200)),
    ("glorot_normal", np.sqrt(2 / 300)), ("glorot_uniform", np.sqrt(2 / 300)),
    ("lecun_normal", np.sqrt(1 / 200)), ("lecun_uniform", np.sqrt(1 / 200)),
])
def test_initialiser_scale(name, std):
    w = init.get(name)((100, 200))  # fan_in 200, fan_out 100
    assert w.shape == (100, 200)
    assert abs(w.std() / std - 1) < 0.03
    assert abs(w.mean()) < 0.1 * std
    if name.endswith("uniform"):
        assert np.abs(w).max() <= std * np.sqrt(3) + 1e-12


def test_fans_of_a_convolution_weight():
    assert init.fans((16, 3, 5, 5)) == (75, 400)
    assert init.fans((7,)) == (7, 7)


class _WrongBackward(Layer):
    """y = x^2 with the derivative off by a factor: gradcheck must catch it."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x, training=True):
        self.save_for_backward(x)
        return x * x

    def backward(self, dy):
        (x,) = self.saved()
        return dy * x * 1.9


def test_gradcheck_catches_a_wrong_backward():
    report = gradcheck(_WrongBackward(), np.linspace(0.5, 2, 6).reshape(2, 3))
    assert not report.ok
    assert report.errors["input"] > 0.04
    with pytest.raises(AssertionError, match="FAILED"):
        gradcheck(_WrongBackward(), np.ones((2, 2)), raise_on_failure=True)


def test_gradcheck_leaves_the_layer_and_random_stream_alone():
    layer = Dense(3, 2)
    before = layer.weight.data.copy()
    gpunet.seed(9)
    expected_draw = np.random.Generator(np.random.PCG64(9)).random()
    gradcheck(layer, np.ones((2, 3)))
    assert layer.weight.data.dtype == np.float32
    np.testing.assert_array_equal(layer.weight.data, before)
    assert gpunet.rng.generator().random() == expected_draw


def test_kernel_sources_found_in_checkout():
    from gpunet.kernels import kernel_files, read_kernel
    names = [p.name for p in kernel_files()]
    assert "common.cuh" in names
    assert "gpunet_warp_sum" in read_kernel("common.cuh")


def test_installed_wheel_ships_the_kernels(tmp_path):
    """Build the wheel, install it outside the checkout, read the .cu sources from it and run
    a kernel from it on the emulator (its header ships in the wheel too)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("gpunet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpunet/_kernels/common.cuh" in names
    assert {f"gpunet/_kernels/{f}" for f in kernels.KERNELS} <= set(names)
    assert "gpunet/emulator/cuda_emu.h" in names
    assert "gpunet/datasets/digits.csv.gz" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    code = ("import gpunet, gpunet.kernels as k; from gpunet import data; import numpy as np; "
            "print(gpunet.__file__); print(k.kernel_dir()); print(len(k.read_kernel('common.cuh'))); "
            "print(len(data.digits()[0])); x = np.ones((4, 3)); "
            "print(float(gpunet.device('emulated').batchnorm_backward(x, x, x[0] * 0, x[0], x[0])[2].sum()))")
    env = {**os.environ, "PYTHONPATH": str(site), "GPUNET_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env=env).stdout.split("\n")
    assert out[0].startswith(str(site))
    assert out[1] == str(site / "gpunet" / "_kernels")
    assert int(out[2]) > 100
    assert int(out[3]) == 1797 - 360
    assert float(out[4]) == 12.0  # dbeta = sum(dy): the installed kernels ran on the emulator


# -- the CPU device's threads ----------------------------------------------------------------
def _threaded_cpu(threads: int = 3) -> CpuBackend:
    cpu = CpuBackend(np, "cpu-threads")
    cpu.threads, cpu.PARALLEL_MIN = threads, 1  # every array split, even tiny ones
    return cpu


def test_parallel_runs_the_parts_on_several_threads_in_order():
    seen = []
    parts = _threaded_cpu()._parallel(np.zeros((7, 2)), lambda s: seen.append(
        threading.current_thread().name) or (s.start, s.stop))
    assert parts == [(0, 2), (2, 4), (4, 7)]
    assert len(set(seen)) > 1  # the calling thread and the pool's


@pytest.mark.parametrize("shape", [(7, 4, 5, 3), (5, 6), (1, 3, 2, 2)])
def test_threaded_cpu_ops_equal_the_generic_ones(shape):
    """ReLU and the BatchNorm pieces split over threads give the one-thread results."""
    cpu, generic = _threaded_cpu(), Backend(np, "generic")
    r = np.random.default_rng(0)
    x, dy = r.normal(size=shape), r.normal(size=shape)
    mean, invstd, gamma, beta = r.normal(size=(4, shape[1]))
    invstd = np.abs(invstd) + 0.5
    for op, args in [("relu", (x,)), ("backprop_relu", (dy, x)), ("channel_sum", (x,)),
                     ("channel_sq_dev", (x, mean)), ("batchnorm_apply", (x, mean, invstd, beta)),
                     ("batchnorm_backward", (dy, x, mean, invstd, gamma))]:
        got, want = getattr(cpu, op)(*args), getattr(generic, op)(*args)
        for g, w in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, want))):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=op)


def test_bad_thread_count_is_refused(monkeypatch):
    monkeypatch.setenv("GPUNET_NUM_THREADS", "two")
    with pytest.raises(DeviceError, match="GPUNET_NUM_THREADS must be a positive integer"):
        CpuBackend(np, "cpu-bad")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_thread_pool():
    """The parent's pool threads do not exist in a child: the child must not wait on them."""
    cpu = _threaded_cpu(2)
    x = np.arange(-6.0, 6.0).reshape(6, 2)
    cpu.relu(x)  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if ReLU runs and is right
        os._exit(0 if np.array_equal(cpu.relu(x), np.maximum(x, 0)) else 1)
    for _ in range(200):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on its parent's thread pool")
