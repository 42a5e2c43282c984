"""Training-step benchmarks of gpunet against PyTorch, each framework measured as users run it.

Each workload builds the same model in gpunet and, when PyTorch is installed, in PyTorch, with
the same float32 data. One training step is forward, backward and an SGD-with-momentum update;
inference is one forward pass in eval mode.

By default (``--isolate``) each framework runs alone in a fresh Python process, as a user runs
it: for each workload there are R rounds (``--rounds``, default 3); in each round gpunet and
PyTorch each get a new process that builds the model, runs 5 warm-up steps, times ``--steps``
training steps and inference passes and reports their median, min and max. The frameworks take
turns going first (gpunet in round 1, PyTorch in round 2, ...), so drifts of the machine hit
both alike. Each round's training ratio (gpunet median / PyTorch median) is reported, and the
median of those ratios is the result. No thread-pool settings are changed: each library runs
with its defaults, unless ``--threads`` says otherwise. ``--in-process`` keeps the older mode:
both frameworks in this one process, alternating step by step, with the command re-run under
OMP_WAIT_POLICY=PASSIVE and OPENBLAS_THREAD_TIMEOUT=4 (unless set) so that the idle
framework's threads sleep instead of spinning on the cores of the one being timed, an artefact
of two thread pools in one process that a user running one framework never meets.

Peak memory is measured in a fresh subprocess per framework and workload: on the CPU, the peak
resident set during training steps over the process's size before the model was built (Linux
only); on a GPU, device memory: for gpunet the bytes CuPy's memory pool holds after the steps
(its free blocks released after a first step, so what it holds is what the steps needed at
most), for PyTorch ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (its
caching allocator's ``max_memory_reserved``, the pool's counterpart, is recorded too).

On a GPU (``--device cuda`` or ``cuda:N``) PyTorch runs on the same GPU,
``torch.device("cuda", N)``, with its defaults (cuDNN enabled, ``cudnn.benchmark`` off), and
each timed step starts and ends with a synchronisation of that device, so a step's time is its
GPU work too. A PyTorch without CUDA is left out, with the reason in the results.

The scaling sweep (``--sweep``, implied by ``--plot``) times training steps of the same
workloads at other shapes: the LSTM over sequence length and over batch size, the conv workload
(``bn``) over batch size, with fewer steps (``--sweep-steps``); both frameworks share one
process there, alternating step by step (in isolate mode one child process with the idle
threads asleep). ``--plot FILE.png`` draws the gpunet/PyTorch ratios and the sweep; it needs
matplotlib (``pip install "gpunet[bench]"``).

``--threads N`` limits both frameworks to N threads: PyTorch through ``torch.set_num_threads``,
gpunet's BLAS (OpenBLAS, OpenMP or MKL under NumPy) and its CPU device's element-wise threads
through OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS and GPUNET_NUM_THREADS set to N,
since they are read only at start-up: in the child processes' environment in isolate mode, by
re-running the command in-process. Without it each library uses its own default.

``--busy N`` keeps N other processes spinning (``while True: pass``) while the frameworks are
timed, to measure a machine on which another program holds a core; they are stopped after, on
errors too. ``--isa avx2`` (isolate mode only) caps both frameworks' CPU kernels at AVX2 through
OPENBLAS_CORETYPE=Haswell, ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2 in the children's environment: on an AVX-512 machine an
approximation of an AVX2-only CPU, not one (caches, clocks and core counts stay the machine's).

The machine is recorded with the results: CPU model, vendor, family and model, its ISA flags
that matter here, cache sizes, the CPUs this process may use, the load average at start, the
BLAS each framework's process loaded and its core type (threadpoolctl, when installed),
PyTorch's CPU capability and parallel set-up, and the variables that steer them.

Run it as ``gpunet bench`` or ``python scripts/bench.py``.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

import gpunet
from gpunet import optim
from gpunet.layers import (LSTM, BatchNorm, Conv2D, Dense, Flatten, GlobalAvgPool2D, LastStep,
                           MaxPool2D, ReLU, Sequential, TimeMajor)
from gpunet.losses import MSE, SoftmaxCrossEntropy


@dataclass
class Workload:
    """``gpunet_model()`` and ``torch_model(torch)`` build the same network; ``x_shape`` is
    one batch's input; ``classes`` the number of labels, or None for an MSE target of shape
    ``target_shape``."""

    description: str
    gpunet_model: Callable[[], Any]
    torch_model: Callable[[Any], Any]
    x_shape: tuple[int, ...]
    classes: int | None = 10
    target_shape: tuple[int, ...] = ()


def _mlp() -> Any:
    return Sequential([Dense(784, 512), ReLU(), Dense(512, 512), ReLU(), Dense(512, 10)])


def _torch_mlp(torch: Any) -> Any:
    nn = torch.nn
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def _lenet() -> Any:
    return Sequential([Conv2D(1, 6, 5, padding=2), ReLU(), MaxPool2D(2), Conv2D(6, 16, 5),
                       ReLU(), MaxPool2D(2), Flatten(), Dense(400, 120), ReLU(),
                       Dense(120, 84), ReLU(), Dense(84, 10)])


def _torch_lenet(torch: Any) -> Any:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10))


def _lstm() -> Any:
    # data batch-major (N, T, F) as datasets store it; the LSTM runs time-major
    return Sequential([TimeMajor(), LSTM(64, 256), LastStep(), Dense(256, 1)])


class _TorchLSTM:
    def __new__(cls, torch: Any) -> Any:
        nn = torch.nn

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lstm, self.out = nn.LSTM(64, 256, batch_first=True), nn.Linear(256, 1)

            def forward(self, x: Any) -> Any:
                return self.out(self.lstm(x)[0][:, -1])

        return Model()


def _bn() -> Any:
    return Sequential([Conv2D(3, 32, 3, padding=1), BatchNorm(32), ReLU(),
                       Conv2D(32, 32, 3, padding=1), BatchNorm(32), ReLU(), GlobalAvgPool2D(),
                       Dense(32, 10)])


def _torch_bn(torch: Any) -> Any:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def workload(name: str, batch: int | None = None, seq: int | None = None) -> Workload:
    """The workload ``name`` at the shapes of issue 7 (those in ``WORKLOADS``), or with the
    batch size ``batch`` and, for ``lstm`` only, the sequence length ``seq`` in their place.
    The model is the same at every shape: only the data's shape changes."""
    if seq is not None and name != "lstm":
        raise ValueError(f"workload {name!r} has no sequence length")
    if name == "mlp":
        b = batch or 128
        return Workload(f"batch {b}, 784-512-512-10, ReLU, softmax cross-entropy",
                        _mlp, _torch_mlp, (b, 784))
    if name == "lenet":
        b = batch or 64
        return Workload(f"batch {b}, 1x28x28, LeNet-5 with ReLU and max pooling",
                        _lenet, _torch_lenet, (b, 1, 28, 28))
    if name == "lstm":
        b, t = batch or 32, seq or 50
        return Workload(f"batch {b}, {t} steps, input 64, hidden 256, last state to 1 output, "
                        "MSE", _lstm, _TorchLSTM, (b, t, 64), classes=None, target_shape=(b, 1))
    if name == "bn":
        b = batch or 128
        return Workload(f"batch {b}, 3x32x32, 2x (conv 3x3 to 32, BatchNorm, ReLU), global "
                        "pool, dense 10", _bn, _torch_bn, (b, 3, 32, 32))
    raise ValueError(f"unknown workload {name!r}; known: mlp, lenet, lstm, bn")


WORKLOADS: dict[str, Workload] = {name: workload(name) for name in ("mlp", "lenet", "lstm", "bn")}


@dataclass(frozen=True)
class Sweep:
    """Training steps of ``workload`` with its ``param`` (``"batch"`` or ``"seq"``) set to each
    of ``sizes`` in turn, its other shapes at their defaults; ``title`` names it in the plot."""

    workload: str
    param: str
    sizes: tuple[int, ...]
    title: str


SWEEPS: dict[str, Sweep] = {
    "lstm-seq": Sweep("lstm", "seq", (25, 50, 100, 200), "LSTM (batch 32) over sequence length"),
    "lstm-batch": Sweep("lstm", "batch", (32, 64, 128, 256), "LSTM (50 steps) over batch size"),
    "bn-batch": Sweep("bn", "batch", (16, 32, 64, 128), "conv + BatchNorm (bn) over batch size"),
}


def _data(w: Workload, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.standard_normal(w.x_shape).astype(np.float32)
    if w.classes is None:
        return x, g.standard_normal(w.target_shape).astype(np.float32)
    return x, g.integers(0, w.classes, w.x_shape[0]).astype(np.int64)


def cuda_index(device: str) -> int | None:
    """The GPU that gpunet's ``device`` names: N for ``cuda:N``, 0 for ``cuda``; None for a
    device that is no GPU (``cpu``, ``emulated``). ``auto`` is resolved as gpunet resolves it."""
    spec = device.strip().lower()
    if spec in ("auto", ""):
        dev = gpunet.device(spec or "auto")
        return getattr(dev, "index", None) if dev.type == "cuda" else None
    if spec == "cuda":
        return 0
    if spec.startswith("cuda:"):
        try:
            return int(spec[5:])
        except ValueError:
            raise gpunet.DeviceError(f"expected a device 'cuda:N' with N an integer, "
                                     f"got {device!r}") from None
    return None


def torch_device(torch: Any, device: str) -> Any:
    """PyTorch's device for gpunet's ``device``: ``cuda:N`` is ``torch.device("cuda", N)``
    (the same GPU, not PyTorch's current one), anything else PyTorch's CPU."""
    index = cuda_index(device)
    return torch.device("cpu") if index is None else torch.device("cuda", index)


class _GpunetRunner:
    def __init__(self, w: Workload, device: str) -> None:
        self.dev = gpunet.device(device)
        gpunet.seed(0)
        self.model = w.gpunet_model().to(self.dev).set_input_grad(False)  # as in PyTorch
        self.loss = SoftmaxCrossEntropy() if w.classes else MSE()
        self.opt = optim.SGD(self.model.params(), lr=0.01, momentum=0.9)
        x, y = _data(w)
        self.x, self.y = gpunet.asarray(x, self.dev), gpunet.asarray(y, self.dev)

    def sync(self) -> None:
        self.dev.synchronize()

    def train_step(self) -> None:
        self.opt.zero_grad()
        self.loss.forward(self.model.forward(self.x, training=True), self.y)
        self.model.backward(self.loss.backward())
        self.opt.step()
        self.sync()

    def infer(self) -> None:
        self.model.forward(self.x, training=False)
        self.sync()


class _TorchRunner:
    def __init__(self, w: Workload, device: str, torch: Any) -> None:
        self.torch = torch
        self.dev = torch_device(torch, device)
        torch.manual_seed(0)
        self.model = w.torch_model(torch).to(self.dev)
        self.loss = torch.nn.CrossEntropyLoss() if w.classes else torch.nn.MSELoss()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        x, y = _data(w)
        self.x, self.y = torch.from_numpy(x).to(self.dev), torch.from_numpy(y).to(self.dev)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def train_step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=False)
        self.loss(self.model(self.x), self.y).backward()
        self.opt.step()
        self.sync()

    def infer(self) -> None:
        self.model.eval()
        with self.torch.no_grad():
            self.model(self.x)
        self.sync()


def _timed(fn: Callable[[], None], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds of ``fn()``, which ends with ``sync()``; ``sync()`` before the clock starts too,
    so that no earlier work on the device is counted."""
    sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stats(times: list[float]) -> dict[str, float]:
    ms = [t * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


#: What every figure measured on the CuPy stand-in is labelled with.
STANDIN_LABEL = ("CuPy stand-in (tests/cupy_standin), not a GPU: this figure means nothing "
                 "(kernels run on the CPU emulator, arrays are NumPy's)")


def _is_standin(device: str) -> bool:
    return bool(getattr(gpunet.device(device), "standin", False))


def torch_skipped(torch: Any, device: str, standin: bool = False) -> str | None:
    """Why PyTorch is not run next to gpunet on ``device``, or None when it is."""
    if standin:  # first: whether PyTorch is installed does not matter there
        return "the CuPy stand-in has no GPU for PyTorch to run on"
    if torch is None:
        return "PyTorch is not installed"
    if cuda_index(device) is not None and not torch.cuda.is_available():
        return f"this PyTorch ({torch.__version__}) has no CUDA"
    return None


def _refuse_standin(device: str, allow_standin: bool) -> bool:
    """Whether ``device`` is the CuPy stand-in; a DeviceError when it is and not
    ``allow_standin``."""
    standin = _is_standin(device)
    if standin and not allow_standin:
        raise gpunet.DeviceError(f"gpunet bench: {gpunet.device(device).label} is the test "
                                 "suite's CuPy stand-in, not a GPU: its timings mean nothing")
    return standin


def _runners(w: Workload, device: str, threads: int | None,
             allow_standin: bool = False) -> tuple[dict[str, Any], str | None]:
    """The frameworks to time on ``device`` and, when PyTorch is left out, why. The CuPy
    stand-in is refused unless ``allow_standin`` (``scripts/gpu_check.py --stand-in``, which
    runs the benchmark end to end before a GPU is seen and labels every figure)."""
    standin = _refuse_standin(device, allow_standin)
    torch = _import_torch()
    runners: dict[str, Any] = {"gpunet": _GpunetRunner(w, device)}
    skipped = torch_skipped(torch, device, standin)
    if skipped is None:
        if threads:
            torch.set_num_threads(threads)
        runners["torch"] = _TorchRunner(w, device, torch)
    return runners, skipped


def _alternate(runners: dict[str, Any], steps: int, warmup: int,
               phases: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """Seconds of each of the runners' ``phases`` (method names) in ``steps`` rounds after
    ``warmup`` untimed ones; within a round the frameworks take turns, so that drifts of the
    machine hit both alike."""
    for r in runners.values():
        for _ in range(warmup):
            for phase in phases:
                getattr(r, phase)()
    times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in phases} for k in runners}
    for _ in range(steps):
        for k, r in runners.items():
            for phase in phases:
                times[k][phase].append(_timed(getattr(r, phase), r.sync))
    return times


def peak_method(framework: str, device: str) -> str:
    """How ``peak_memory`` measures ``framework`` on ``device``."""
    if cuda_index(device) is None:
        return "resident-set growth (VmHWM over VmRSS before the model)"
    if framework == "torch":
        return "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
    return "CuPy memory pool: total_bytes after the steps, free_all_blocks before them"


def measure(name: str, device: str = "cpu", steps: int = 30, warmup: int = 5,
            threads: int | None = None, *, batch: int | None = None, seq: int | None = None,
            allow_standin: bool = False) -> dict[str, Any]:
    """Time ``steps`` alternating training steps and inference passes of both frameworks,
    on workload ``name`` at its shapes in ``WORKLOADS`` or with ``batch`` (and ``seq``) in
    their place. ``allow_standin``: see :func:`_runners`; the result then says
    ``"standin": true`` and carries :data:`STANDIN_LABEL`."""
    w = WORKLOADS[name] if batch is None and seq is None else workload(name, batch, seq)
    runners, skipped = _runners(w, device, threads, allow_standin)
    times = _alternate(runners, steps, warmup, ("train_step", "infer"))
    result: dict[str, Any] = {"workload": name, "description": w.description, "device": device}
    if _is_standin(device):
        result.update(standin=True, label=STANDIN_LABEL)
    if skipped:
        result["torch_skipped"] = skipped
    shapes = {} if batch is None and seq is None else {"batch": batch, "seq": seq}
    for k in runners:
        result[k] = {"train": _stats(times[k]["train_step"]), "infer": _stats(times[k]["infer"]),
                     **peak_memory(name, k, device, **shapes),
                     "peak_method": peak_method(k, device)}
    if "torch" in runners:
        result["ratio_train"] = (result["gpunet"]["train"]["median_ms"]
                                 / result["torch"]["train"]["median_ms"])
        result["ratio_infer"] = (result["gpunet"]["infer"]["median_ms"]
                                 / result["torch"]["infer"]["median_ms"])
        _memory_ratios(result)
    return result


def _memory_ratios(result: dict[str, Any]) -> None:
    result["ratio_memory"] = result["gpunet"]["peak_mb"] / max(result["torch"]["peak_mb"], 1e-9)
    if "reserved_peak_mb" in result["torch"]:  # a GPU: pool held against pool held
        result["ratio_memory_reserved"] = (result["gpunet"]["peak_mb"]
                                           / max(result["torch"]["reserved_peak_mb"], 1e-9))


def sweep(device: str = "cpu", steps: int = 5, warmup: int = 2,
          threads: int | None = None, *, allow_standin: bool = False,
          sweeps: Mapping[str, Sweep] | None = None) -> list[dict[str, Any]]:
    """Training-step time of both frameworks at every size of every sweep in ``sweeps``
    (default ``SWEEPS``): one row per size, with the stats of ``steps`` alternating training
    steps after ``warmup`` untimed ones (no inference, no peak memory), and gpunet/PyTorch
    median ratio when PyTorch is installed."""
    rows = []
    for label, s in (SWEEPS if sweeps is None else sweeps).items():
        for size in s.sizes:
            w = workload(s.workload, **{s.param: size})
            runners, skipped = _runners(w, device, threads, allow_standin)
            times = _alternate(runners, steps, warmup, ("train_step",))
            row: dict[str, Any] = {"sweep": label, "workload": s.workload, "param": s.param,
                                   "size": size, "description": w.description, "device": device}
            if _is_standin(device):
                row.update(standin=True, label=STANDIN_LABEL)
            for k in runners:
                row[k] = _stats(times[k]["train_step"])
            if "torch" in runners:
                row["ratio"] = row["gpunet"]["median_ms"] / row["torch"]["median_ms"]
            rows.append(row)
    return rows


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


_MB = 1024 * 1024


def _gpu_peak_gpunet(w: Workload, device: str, steps: int = 5) -> dict[str, float]:
    """Device memory of gpunet's training steps: what CuPy's memory pool holds after
    ``steps`` steps (its free blocks released after a first one, so it then held only live
    arrays: the pool grows only as far as the steps need), over what it held in use before
    the model was built."""
    dev = gpunet.device(device)
    pool = dev.xp.get_default_memory_pool()
    with dev.scope():  # the pool answers for the current device
        base = pool.used_bytes()
    runner = _GpunetRunner(w, device)
    runner.train_step()
    with dev.scope():
        pool.free_all_blocks()
    for _ in range(steps):
        runner.train_step()
    with dev.scope():
        held, used = pool.total_bytes(), pool.used_bytes()
    return {"peak_mb": max(held - base, 0) / _MB, "pool_used_after_mb": (used - base) / _MB}


def _gpu_peak_torch(w: Workload, device: str, torch: Any, steps: int = 5) -> dict[str, float]:
    """Device memory of PyTorch's training steps on the same GPU: the peak of its
    allocations during ``steps`` steps (peak statistics reset after a first step) over what
    was allocated before the model was built; the peak its caching allocator reserved, too."""
    dev = torch_device(torch, device)
    base = torch.cuda.memory_allocated(dev)
    runner = _TorchRunner(w, device, torch)
    runner.train_step()
    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps):
        runner.train_step()
    return {"peak_mb": max(torch.cuda.max_memory_allocated(dev) - base, 0) / _MB,
            "reserved_peak_mb": torch.cuda.max_memory_reserved(dev) / _MB}


def _peak_child(name: str, framework: str, device: str, batch: int | None = None,
                seq: int | None = None) -> None:
    """In a fresh process: the peak memory of training steps over what the process held
    before the model was built, so both frameworks are charged for weights, optimizer state,
    activations and temporaries, and neither for its library's own start-up. On the CPU the
    resident set (libraries loaded and their first GEMM done before the baseline); on a GPU
    device memory (:func:`_gpu_peak_gpunet`, :func:`_gpu_peak_torch`)."""
    w = WORKLOADS[name] if batch is None and seq is None else workload(name, batch, seq)
    torch = _import_torch() if framework == "torch" else None
    if cuda_index(device) is not None:
        peak = (_gpu_peak_torch(w, device, torch) if torch is not None
                else _gpu_peak_gpunet(w, device))
        print(json.dumps(peak))
        return
    a = np.ones((64, 64), np.float32)
    (torch.from_numpy(a) @ torch.from_numpy(a)) if torch is not None else a @ a
    base = _status_mb("VmRSS")
    runner = _GpunetRunner(w, device) if torch is None else _TorchRunner(w, device, torch)
    runner.train_step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current size
    for _ in range(5):
        runner.train_step()
    print(json.dumps({"peak_mb": max(_status_mb("VmHWM") - base, 0.0)}))


def peak_memory(name: str, framework: str, device: str, batch: int | None = None,
                seq: int | None = None, *, env: Mapping[str, str] | None = None
                ) -> dict[str, float]:
    """Peak memory growth of training steps, measured in a subprocess (with environment
    ``env``, default this process's): ``{"peak_mb": MiB}``, resident memory on the CPU,
    device memory on a GPU (see :func:`peak_method`), where PyTorch adds ``reserved_peak_mb``
    and gpunet ``pool_used_after_mb``."""
    code = (f"from gpunet.bench import _peak_child; "
            f"_peak_child({name!r}, {framework!r}, {device!r}, {batch!r}, {seq!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=None if env is None else dict(env))
    if out.returncode != 0:
        raise RuntimeError(f"gpunet bench: measuring the peak memory of {framework} on {name} "
                           f"failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- isolate mode: each framework alone in a fresh process, as users run it -----------------

#: What ``--isa`` sets in the children's environment: each library's own cap on its kernels.
ISA_VARS: dict[str, dict[str, str]] = {
    "avx2": {"OPENBLAS_CORETYPE": "Haswell",      # NumPy's OpenBLAS (a DYNAMIC_ARCH build)
             "ATEN_CPU_CAPABILITY": "avx2",       # PyTorch's ATen kernels
             "ONEDNN_MAX_CPU_ISA": "AVX2",        # oneDNN (PyTorch's convolutions)
             "MKL_ENABLE_INSTRUCTIONS": "AVX2",   # MKL (PyTorch's GEMMs on x86)
             "GPUNET_CPU_ARCH": "haswell"},       # gpunet's compiled loops (-march=haswell)
}
#: How results measured under ``--isa`` are labelled.
ISA_LABELS = {"avx2": "AVX2 kernels forced on an AVX-512 machine (an approximation of an "
                      "AVX2-only CPU, not one)"}


def child_environment(threads: int | None = None, isa: str | None = None,
                      environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of isolate mode's child processes: ``environ`` (default this
    process's) with the thread counts of :data:`_THREAD_VARS` set to ``threads`` when given
    and the kernel caps of ``ISA_VARS[isa]`` when ``isa`` is given. The idle-thread policy is
    left as the caller has it: one framework per process, as users run them."""
    env = dict(os.environ if environ is None else environ)
    if threads is not None:
        env.update(dict.fromkeys(_THREAD_VARS, str(threads)))
    if isa is not None:
        env.update(ISA_VARS[isa])
    return env


def round_orders(frameworks: Sequence[str], rounds: int) -> list[list[str]]:
    """The order in which ``frameworks`` run in each of ``rounds`` rounds: as given in the
    first round, reversed in the second, as given in the third, and so on."""
    return [list(frameworks) if i % 2 == 0 else list(reversed(frameworks))
            for i in range(rounds)]


_POOL_KEYS = ("user_api", "internal_api", "version", "architecture", "num_threads",
              "threading_layer", "prefix")


def runtime_info(torch: Any = None) -> dict[str, Any]:
    """What this process computes with: the BLAS and OpenMP libraries it has loaded as
    threadpoolctl sees them (``threadpools``; None without threadpoolctl) and, given
    ``torch``, PyTorch's CPU capability, number of threads and the first lines of its
    parallel set-up."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pools = None
    else:
        pools = [{k: p.get(k) for k in _POOL_KEYS} for p in threadpool_info()]
    info: dict[str, Any] = {"threadpools": pools}
    if torch is not None:
        cpu = getattr(torch.backends, "cpu", None)
        info["torch_cpu_capability"] = (cpu.get_cpu_capability()
                                        if hasattr(cpu, "get_cpu_capability") else None)
        lines = [line.strip() for line in torch.__config__.parallel_info().splitlines()]
        info["torch_parallel_info"] = [line for line in lines if line][:4]
        info["torch_threads"] = torch.get_num_threads()
    return info


def _time_child(name: str, framework: str, device: str, steps: int, warmup: int,
                threads: int | None, batch: int | None = None, seq: int | None = None) -> None:
    """In a fresh process: ``warmup`` untimed, then ``steps`` timed training steps and
    inference passes of ``framework`` alone on workload ``name``; prints their stats and
    :func:`runtime_info` as one line of JSON."""
    w = WORKLOADS[name] if batch is None and seq is None else workload(name, batch, seq)
    torch = None
    if framework == "torch":
        torch = _import_torch()
        if threads:
            torch.set_num_threads(threads)
        runner: Any = _TorchRunner(w, device, torch)
    else:
        runner = _GpunetRunner(w, device)
    times = _alternate({framework: runner}, steps, warmup, ("train_step", "infer"))[framework]
    print(json.dumps({"train": _stats(times["train_step"]), "infer": _stats(times["infer"]),
                      "runtime": runtime_info(torch)}))


def _child(code: str, env: Mapping[str, str], what: str) -> Any:
    """The last line of what ``python -c code`` prints, read as JSON."""
    out = subprocess.run([sys.executable, "-c", code], env=dict(env), capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"gpunet bench: {what} failed in its child process:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pooled(stats: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Rounds' stats as one: the median of their medians, the least minimum, the most
    maximum."""
    return {"median_ms": statistics.median(s["median_ms"] for s in stats),
            "min_ms": min(s["min_ms"] for s in stats), "max_ms": max(s["max_ms"] for s in stats)}


def measure_isolated(name: str, device: str = "cpu", steps: int = 30, warmup: int = 5,
                     threads: int | None = None, rounds: int = 3, isa: str | None = None, *,
                     batch: int | None = None, seq: int | None = None,
                     allow_standin: bool = False) -> dict[str, Any]:
    """Time workload ``name`` as users run it: in each of ``rounds`` rounds every framework
    runs in a fresh process (environment :func:`child_environment`), which builds the model
    and times ``steps`` training steps and inference passes after ``warmup`` untimed ones;
    the order alternates between rounds (:func:`round_orders`). The result has what
    :func:`measure` gives, with ``rounds`` (each round's order, per-framework stats and
    ratios), ``ratios_train``/``ratios_infer`` (per round) and ``ratio_train``/``ratio_infer``
    their medians; a framework's ``train``/``infer`` stats are the rounds' pooled
    (:func:`_pooled`), and ``runtime`` is what its first child computed with."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    w = WORKLOADS[name] if batch is None and seq is None else workload(name, batch, seq)
    standin = _refuse_standin(device, allow_standin)
    skipped = torch_skipped(_import_torch(), device, standin)
    frameworks = ["gpunet"] if skipped else ["gpunet", "torch"]
    env = child_environment(threads, isa)
    result: dict[str, Any] = {"workload": name, "description": w.description, "device": device,
                              "mode": "isolate", "steps": steps, "warmup": warmup}
    if standin:
        result.update(standin=True, label=STANDIN_LABEL)
    if skipped:
        result["torch_skipped"] = skipped
    if isa is not None:
        result.update(isa=isa, isa_label=ISA_LABELS[isa])
    per_round: list[dict[str, Any]] = []
    runtime: dict[str, Any] = {}
    for i, order in enumerate(round_orders(frameworks, rounds), 1):
        r: dict[str, Any] = {"round": i, "order": order}
        for k in order:
            code = (f"from gpunet.bench import _time_child; _time_child({name!r}, {k!r}, "
                    f"{device!r}, {steps!r}, {warmup!r}, {threads!r}, {batch!r}, {seq!r})")
            r[k] = _child(code, env, f"timing {k} on {name} (round {i})")
            runtime.setdefault(k, r[k].pop("runtime"))
            r[k].pop("runtime", None)
        if "torch" in r:
            r["ratio_train"] = r["gpunet"]["train"]["median_ms"] / r["torch"]["train"]["median_ms"]
            r["ratio_infer"] = r["gpunet"]["infer"]["median_ms"] / r["torch"]["infer"]["median_ms"]
        per_round.append(r)
    result["rounds"] = per_round
    result["runtime"] = runtime
    shapes = {} if batch is None and seq is None else {"batch": batch, "seq": seq}
    for k in frameworks:
        result[k] = {"train": _pooled([r[k]["train"] for r in per_round]),
                     "infer": _pooled([r[k]["infer"] for r in per_round]),
                     **peak_memory(name, k, device, **shapes, env=env),
                     "peak_method": peak_method(k, device)}
    if "torch" in frameworks:
        for phase in ("train", "infer"):
            ratios = [r[f"ratio_{phase}"] for r in per_round]
            result[f"ratios_{phase}"] = ratios
            result[f"ratio_{phase}"] = statistics.median(ratios)
        _memory_ratios(result)
    return result


def _sweep_child(device: str, steps: int, threads: int | None, sweeps_json: str) -> None:
    """In a child process: :func:`sweep` of the sweeps in ``sweeps_json``, printed as JSON."""
    sweeps = {label: Sweep(workload_, param, tuple(sizes), title)
              for label, (workload_, param, sizes, title) in json.loads(sweeps_json).items()}
    print(json.dumps(sweep(device, steps, threads=threads, sweeps=sweeps)))


def sweep_isolated(device: str = "cpu", steps: int = 5, threads: int | None = None,
                   isa: str | None = None) -> list[dict[str, Any]]:
    """:func:`sweep` of ``SWEEPS`` run in one child process with isolate mode's environment
    (:func:`child_environment`), both frameworks sharing it as in ``--in-process``, so with
    :data:`_IDLE_VARS` where the caller has not set them."""
    env = {**_IDLE_VARS, **child_environment(threads, isa)}
    sweeps_json = json.dumps({label: [s.workload, s.param, list(s.sizes), s.title]
                              for label, s in SWEEPS.items()})
    code = (f"from gpunet.bench import _sweep_child; "
            f"_sweep_child({device!r}, {steps!r}, {threads!r}, {sweeps_json!r})")
    return _child(code, env, "the sweep")


@contextlib.contextmanager
def busy_neighbours(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` other processes spinning (``while True: pass``) for the duration of the
    ``with`` block, each holding a core as another program would; killed and reaped after,
    on errors and interruptions too."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


# -- the machine ----------------------------------------------------------------------------

#: The CPU flags that matter to the kernels of either framework, recorded when present.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile")
#: The variables that steer the libraries' kernels and threads, recorded with the results.
RECORDED_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                 "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GPUNET_NUM_THREADS",
                 "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                 "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")


def _caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, str]:
    """cpu0's caches from sysfs: ``{"L1d": "48K", "L1i": "32K", "L2": "2048K", ...}``."""
    caches = {}
    for index in sorted(glob.glob(os.path.join(root, "index*"))):
        try:
            level, kind, size = (open(os.path.join(index, f)).read().strip()
                                 for f in ("level", "type", "size"))
        except OSError:
            continue
        caches[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = size
    return caches


def cpu_record() -> dict[str, Any]:
    """The CPU: model name, vendor, family and model number (from the first processor of
    /proc/cpuinfo), which of :data:`ISA_FLAGS` it has, its caches (:func:`_caches`) and the
    number of CPUs this process may run on."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count())
    return {"cpu": fields.get("model name") or platform.processor(),
            "cpu_vendor": fields.get("vendor_id"), "cpu_family": fields.get("cpu family"),
            "cpu_model": fields.get("model"), "cpu_flags": [f for f in ISA_FLAGS if f in flags],
            "caches": _caches(), "cpus_usable": usable}


def loadavg() -> str | None:
    """The 1, 5 and 15-minute load averages from /proc/loadavg, None where there is none."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def machine_summary(env: Mapping[str, Any]) -> str:
    """One line of ``environment()``: CPU, flags, L2/L3, usable CPUs, load and the BLAS."""
    caches = env.get("caches") or {}
    blas = env.get("blas") or {}
    parts = [f"{env['cpu']} ({env.get('cpu_vendor')} family {env.get('cpu_family')} model "
             f"{env.get('cpu_model')})", " ".join(env.get("cpu_flags") or ["no x86 flags"]),
             f"L2 {caches.get('L2', '?')}, L3 {caches.get('L3', '?')}",
             f"{env.get('cpus_usable')} usable cpus, load {env.get('loadavg')} at start",
             (f"BLAS {blas.get('internal_api')} {blas.get('version')} core "
              f"{blas.get('architecture')}" if blas else "BLAS unknown (no threadpoolctl)")]
    if env.get("torch_cpu_capability"):
        parts.append(f"torch CPU {env['torch_cpu_capability']}")
    return ", ".join(parts)


def environment(device: str = "cpu", *, runtime: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None,
                load: str | None = None) -> dict[str, Any]:
    """The machine (:func:`cpu_record`, the load average ``load`` at start, read now when not
    given), the versions, the command line, the frameworks' thread settings and the variables
    of :data:`RECORDED_VARS` as ``environ`` has them (default this process's environment; in
    isolate mode the children's), and what each framework computed with: ``runtime``
    (``{"gpunet": runtime_info(), "torch": runtime_info(torch)}`` as the child processes
    reported it; measured in this process when not given), of which ``blas`` is the BLAS
    gpunet's NumPy loaded, with its core type. On a GPU also the GPU, CuPy, the CUDA runtime
    and driver, and PyTorch's CUDA and cuDNN."""
    torch = _import_torch()
    environ = os.environ if environ is None else environ
    if runtime is None:
        runtime = {"gpunet": runtime_info()}
        if torch is not None:
            runtime["torch"] = runtime_info(torch)
    gpunet_pools = runtime.get("gpunet", {}).get("threadpools") or []
    torch_runtime = runtime.get("torch", {})
    env = {"date": str(date.today()), "machine": platform.machine(), "cpus": os.cpu_count(),
           **cpu_record(), "loadavg": loadavg() if load is None else load,
           "python": platform.python_version(), "numpy": np.__version__,
           "gpunet": gpunet.__version__, "torch": getattr(torch, "__version__", None),
           "command": " ".join(sys.argv),
           # what --threads set for gpunet's BLAS and CPU device (None: their default)
           "blas_threads": environ.get("OPENBLAS_NUM_THREADS"),
           "gpunet_threads": environ.get("GPUNET_NUM_THREADS"),
           "idle_threads": {k: environ.get(k) for k in _IDLE_VARS},
           "variables": {k: environ.get(k) for k in RECORDED_VARS},
           "blas": next((p for p in gpunet_pools if p.get("user_api") == "blas"), None),
           "runtime": dict(runtime)}
    if torch is not None:
        env["torch_threads"] = torch_runtime.get("torch_threads", torch.get_num_threads())
        env["torch_cpu_capability"] = torch_runtime.get("torch_cpu_capability")
        env["torch_parallel_info"] = torch_runtime.get("torch_parallel_info")
    index = cuda_index(device)
    if index is not None:
        dev = gpunet.device(f"cuda:{index}")
        cupy = dev.xp
        runtime = cupy.cuda.runtime
        name = runtime.getDeviceProperties(index)["name"]
        env.update(device=dev.label, gpu=name.decode() if isinstance(name, bytes) else name,
                   cupy=cupy.__version__, cuda_runtime=runtime.runtimeGetVersion(),
                   cuda_driver=runtime.driverGetVersion(), standin=bool(dev.standin))
        if torch is not None:
            cudnn = torch.backends.cudnn
            env.update(torch_cuda=torch.version.cuda,
                       torch_cuda_available=torch.cuda.is_available(),
                       cudnn=cudnn.version() if cudnn.is_available() else None,
                       cudnn_enabled=cudnn.enabled, cudnn_benchmark=cudnn.benchmark)
    return env


def _spread(stats: dict[str, float]) -> str:
    return f"{stats['median_ms']:.2f} ({stats['min_ms']:.2f}-{stats['max_ms']:.2f})"


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'workload':<8} {'gpunet train ms (min-max)':>26} {'torch train ms':>15} "
             f"{'ratio':>6} {'infer ratio':>11} {'peak MiB g/t':>14} {'mem ratio':>9}"]
    if any("ratios_train" in r for r in results):  # isolate mode: ratio is their median
        lines[0] += "  train ratio per round"
    if any(r.get("standin") for r in results):
        lines.insert(0, f"# {STANDIN_LABEL}")
    for r in results:
        g, t = r["gpunet"], r.get("torch")
        gt = _spread(g["train"])
        if t is None:
            lines.append(f"{r['workload']:<8} {gt:>26} {'(no torch)':>15}  "
                         f"{r.get('torch_skipped', '')}")
            continue
        line = (f"{r['workload']:<8} {gt:>26} {t['train']['median_ms']:>15.2f} "
                f"{r['ratio_train']:>6.2f} {r['ratio_infer']:>11.2f} "
                f"{g['peak_mb']:>6.1f}/{t['peak_mb']:<7.1f} {r['ratio_memory']:>9.2f}")
        if "ratios_train" in r:
            line += "  " + " ".join(f"{x:.2f}" for x in r["ratios_train"])
        lines.append(line)
    return "\n".join(lines)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The rows of ``sweep`` as a text table: median (min-max) ms per training step."""
    lines = [f"{'sweep':<10} {'size':>5} {'gpunet train ms (min-max)':>26} {'torch train ms':>15} "
             f"{'ratio':>6}"]
    if any(r.get("standin") for r in rows):
        lines.insert(0, f"# {STANDIN_LABEL}")
    for r in rows:
        g, t = r["gpunet"], r.get("torch")
        gt = _spread(g)
        torch_part = (f"{'(no torch)':>15}" if t is None
                      else f"{t['median_ms']:>15.2f} {r['ratio']:>6.2f}")
        lines.append(f"{r['sweep']:<10} {r['size']:>5} {gt:>26} {torch_part}")
    return "\n".join(lines)


_NO_MATPLOTLIB = 'the plot needs matplotlib: pip install "gpunet[bench]"'


def _agg() -> tuple[Any, Any]:
    """matplotlib's Figure and its Agg canvas, imported only when a plot is asked for, since
    matplotlib is an optional dependency (the ``bench`` extra). The Agg canvas renders to a
    file without a display and leaves pyplot's global backend alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(_NO_MATPLOTLIB) from e
    return Figure, FigureCanvasAgg


def plot(results: list[dict[str, Any]], rows: list[dict[str, Any]], env: dict[str, Any],
         path: str) -> None:
    """Write to ``path`` a figure of the gpunet/PyTorch ratios per workload (training step,
    inference, peak memory; lines at parity and at the 1.5 target) and one panel per sweep of
    ``rows`` with both frameworks' median ms per training step on log-log axes."""
    Figure, FigureCanvasAgg = _agg()
    panels = 1 + len(SWEEPS)
    ncols = 2
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(6 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fig.suptitle(f"gpunet {env['gpunet']} vs PyTorch {env['torch'] or '(not installed)'}: "
                 + (f"GPU {env['gpu']}, " if env.get("gpu") else "")
                 + ("CuPy STAND-IN, NOT A GPU: numbers mean nothing, " if env.get("standin")
                    else "")
                 + f"{env['cpu']}, {env['cpus']} cpus, device {results[0]['device']}, "
                 f"BLAS threads {env['blas_threads'] or 'default'}, torch threads "
                 f"{env.get('torch_threads', '-')}, idle threads "
                 f"{'passive' if env.get('idle_threads', {}).get('OMP_WAIT_POLICY') else 'default'}"
                 + (f", isolate ({env.get('rounds')} rounds)" if env.get("mode") == "isolate"
                    else ", in-process")
                 + (f", busy neighbours {env['busy']}" if env.get("busy") else "")
                 + (f", {env['isa'].upper()} KERNELS FORCED (an approximation)"
                    if env.get("isa") else "")
                 + f", {env['date']}", fontsize=10)

    ax = axes[0]
    ax.set_title("gpunet / PyTorch (lower is better for gpunet)")
    compared = [r for r in results if "ratio_train" in r]
    if compared:
        width = 0.27
        for i, (key, label) in enumerate((("ratio_train", "training step"),
                                          ("ratio_infer", "inference"),
                                          ("ratio_memory", "peak memory"))):
            bars = ax.bar([j + (i - 1) * width for j in range(len(compared))],
                          [r[key] for r in compared], width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(compared)), [r["workload"] for r in compared])
        ax.axhline(1.0, color="black", linewidth=1, label="parity")
        ax.axhline(1.5, color="red", linestyle="--", linewidth=1, label="target 1.5")
        ax.set_ylabel("ratio")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "PyTorch not installed", ha="center", va="center",
                transform=ax.transAxes, fontsize=12)
        ax.set_axis_off()

    for ax, (label, s) in zip(axes[1:], SWEEPS.items()):
        mine = [r for r in rows if r["sweep"] == label]
        sizes = [r["size"] for r in mine]
        for framework, name in (("gpunet", "gpunet"), ("torch", "PyTorch")):
            if all(framework in r for r in mine):
                ax.plot(sizes, [r[framework]["median_ms"] for r in mine], marker="o", label=name)
        # cost proportional to size through gpunet's first point, to read the growth against
        first = mine[0]["gpunet"]["median_ms"]
        ax.plot(sizes, [first * n / sizes[0] for n in sizes], color="gray", linestyle=":",
                linewidth=1, label="proportional to size")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_title(s.title)
        ax.set_xlabel("sequence length" if s.param == "seq" else "batch size")
        ax.set_ylabel("ms per training step (median)")
        ax.legend(fontsize=8)
    for ax in axes[panels:]:
        ax.set_axis_off()
    fig.savefig(path, dpi=110)


# gpunet's own element-wise threads too (gpunet.backends.CpuBackend)
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GPUNET_NUM_THREADS")
#: Set unless the caller set them: idle threads of either library sleep instead of spinning.
#: OpenBLAS's workers spin ~2^28 cycles after each call and OpenMP's a while after each
#: region, so in one process on few cores the framework not being timed held the cores of the
#: one being timed (LeNet, 2 cores: PyTorch 15 -> 7 ms with OpenBLAS's workers asleep).
_IDLE_VARS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


def reexec_environment(threads: int | None, environ: Mapping[str, str],
                       command: Sequence[str]) -> tuple[list[str], dict[str, str]] | None:
    """The argv and environment for ``os.execve(sys.executable, ...)`` that run ``command``
    (this process's ``sys.orig_argv``: ``python -m gpunet bench ...``, ``python
    scripts/bench.py ...`` or the ``gpunet`` script run by its interpreter) again with the
    variables that OpenBLAS, OpenMP, MKL and gpunet's CPU device read only at start-up: their
    thread counts limited to ``threads`` (when given) and :data:`_IDLE_VARS` where ``environ`` lacks them.
    None when ``environ`` already has them all, as in the re-run, which thus goes on."""
    want = {k: v for k, v in _IDLE_VARS.items() if k not in environ}
    if threads is not None:
        want.update(dict.fromkeys(_THREAD_VARS, str(threads)))
    if all(environ.get(k) == v for k, v in want.items()):
        return None
    return [sys.executable, *command[1:]], {**environ, **want}


def _reexec(threads: int | None, argv: list[str] | None) -> None:
    """Re-run this process under ``reexec_environment``, or say why it cannot."""
    # only the process's own command line can be re-run; a caller of main() in-process
    # (tests, notebooks) would be replaced by the re-run, and keeps its environment
    if argv is not None and list(argv) != sys.argv[len(sys.argv) - len(argv):]:
        if threads is not None:
            print(f"gpunet bench: --threads {threads} limits PyTorch only when called "
                  f"in-process; set OPENBLAS_NUM_THREADS={threads} before start-up for "
                  "gpunet's BLAS", file=sys.stderr)
        return
    rerun = reexec_environment(threads, os.environ, sys.orig_argv)
    if rerun is None:
        return
    changed = {k: v for k, v in rerun[1].items() if os.environ.get(k) != v}
    print("gpunet bench: re-running with " + " ".join(f"{k}={v}" for k, v in changed.items()),
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, *rerun)


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(
        prog="gpunet bench", description=__doc__.split("\n\n")[0],
        epilog="Training step: forward, backward, SGD-with-momentum update. By default "
               "(--isolate) every framework runs alone in a fresh Python process per round, "
               "with its libraries' default settings, as a user runs it: the process builds "
               "the model, runs 5 warm-up steps and times --steps training steps and "
               "inference passes; the frameworks take turns going first from round to round, "
               "and the result is the median over rounds of each round's gpunet/PyTorch "
               "ratio (every round's ratio is shown). It is the default because two "
               "frameworks in one process share its cores and thread pools, which no user "
               "meets; --in-process keeps that older mode (both frameworks in this process, "
               "alternating step by step, re-run with OMP_WAIT_POLICY=PASSIVE and "
               "OPENBLAS_THREAD_TIMEOUT=4 unless they are set, so the idle framework's "
               "threads sleep). Peak memory, in a fresh subprocess per framework: on the CPU "
               "resident-set growth during training steps (Linux); on a GPU device memory, "
               "for gpunet what CuPy's memory pool holds after the steps, for PyTorch "
               "torch.cuda.max_memory_allocated. On a GPU PyTorch runs on the same GPU "
               "(cuda:N is torch.device('cuda', N)) with cuDNN at its defaults, and every "
               "timed step starts and ends with a device synchronisation. The test suite's "
               "CuPy stand-in is refused. Without --threads each library uses its own default "
               "number of threads. The header records the machine: CPU, ISA flags, caches, "
               "usable CPUs, load at start and the BLAS core type each child loaded. The "
               "sweep adds about a minute on an idle 2-core CPU.")
    p.add_argument("workloads", nargs="*", help=f"default: all ({', '.join(WORKLOADS)})")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:N (a GPU, PyTorch on the same one), "
                        "emulated or auto")
    p.add_argument("--steps", type=int, default=30, metavar="N",
                   help="timed steps per workload (per round and framework in isolate mode) "
                        "after 5 warm-up steps (default 30)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--isolate", dest="in_process", action="store_false",
                      help="the default: each framework alone in a fresh Python process per "
                           "round, with its libraries' defaults, as users run it; the "
                           "frameworks' order alternates between rounds")
    mode.add_argument("--in-process", dest="in_process", action="store_true",
                      help="the older mode: both frameworks in this process, alternating step "
                           "by step, the command re-run with OMP_WAIT_POLICY=PASSIVE and "
                           "OPENBLAS_THREAD_TIMEOUT=4 (unless set) so idle threads sleep")
    p.set_defaults(in_process=False)
    p.add_argument("--rounds", type=int, metavar="R",
                   help="isolate mode: rounds of one fresh process per framework; the result "
                        "is the median of the rounds' gpunet/PyTorch ratios (default 3)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="limit both frameworks to N threads: PyTorch via torch.set_num_threads, "
                        "gpunet's BLAS and element-wise threads via OPENBLAS_NUM_THREADS, "
                        "OMP_NUM_THREADS, MKL_NUM_THREADS and GPUNET_NUM_THREADS set to N in "
                        "the child processes, with --in-process by re-running the command "
                        "(default: each library's own default)")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="keep N other processes spinning (while True: pass) while the "
                        "frameworks are timed, as another program holding a core would; "
                        "stopped after (default 0)")
    p.add_argument("--isa", choices=sorted(ISA_VARS),
                   help="isolate mode only: cap both frameworks' CPU kernels at this ISA "
                        "(avx2: OPENBLAS_CORETYPE=Haswell, ATEN_CPU_CAPABILITY=avx2, "
                        "ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2 in the "
                        "children); on an AVX-512 machine an approximation of an AVX2-only "
                        "CPU, not one")
    p.add_argument("--json", metavar="FILE",
                   help="write the results (every round's in isolate mode), the sweep (if run) "
                        "and the environment as JSON")
    p.add_argument("--sweep", action="store_true",
                   help="also time training steps over shapes: "
                        + "; ".join(f"{s.workload} {s.param} {', '.join(map(str, s.sizes))}"
                                    for s in SWEEPS.values())
                        + " (both frameworks in one process, alternating step by step)")
    p.add_argument("--sweep-steps", type=int, default=5, metavar="N",
                   help="timed steps per sweep size after 2 warm-up steps (default 5)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the gpunet/PyTorch ratios and the sweep (implies --sweep); needs "
                        'matplotlib: pip install "gpunet[bench]"')
    args = p.parse_args(argv)
    names = args.workloads or list(WORKLOADS)
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; known: {sorted(WORKLOADS)}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.busy < 0:
        p.error("--busy must be at least 0")
    if args.steps < 1 or args.sweep_steps < 1:
        p.error("--steps and --sweep-steps must be at least 1")
    if args.in_process and args.isa:
        p.error("--isa works only in isolate mode (the default), not with --in-process")
    if args.in_process and args.rounds is not None:
        p.error("--rounds works only in isolate mode (the default), not with --in-process")
    rounds = 3 if args.rounds is None else args.rounds
    if rounds < 1:
        p.error("--rounds must be at least 1")
    if args.plot:
        try:  # fail before minutes of measuring, not after
            _agg()
        except ImportError as e:
            p.error(str(e))
    if args.in_process and args.device == "cpu":
        _reexec(args.threads, argv)
    load = loadavg()
    try:
        with busy_neighbours(args.busy):
            if args.in_process:
                results = [measure(n, args.device, args.steps, threads=args.threads)
                           for n in names]
                rows = (sweep(args.device, args.sweep_steps, threads=args.threads)
                        if args.sweep or args.plot else [])
            else:
                results = [measure_isolated(n, args.device, args.steps, threads=args.threads,
                                            rounds=rounds, isa=args.isa) for n in names]
                rows = (sweep_isolated(args.device, args.sweep_steps, args.threads, args.isa)
                        if args.sweep or args.plot else [])
    except gpunet.DeviceError as e:
        print(e if str(e).startswith("gpunet bench") else f"gpunet bench: {e}", file=sys.stderr)
        return 2
    if args.in_process:
        env = environment(args.device, load=load)
    else:
        runtime = next((r["runtime"] for r in results if "runtime" in r), None)
        env = environment(args.device, runtime=runtime, load=load,
                          environ=child_environment(args.threads, args.isa))
    env.update(mode="in-process" if args.in_process else "isolate", busy=args.busy,
               isa=args.isa)
    if not args.in_process:
        env["rounds"] = rounds
    if args.isa:
        env["isa_label"] = (ISA_LABELS[args.isa] if "avx512f" in env["cpu_flags"] else
                            f"{args.isa.upper()} kernels forced on a machine without AVX-512 "
                            "(it changes little there)")
    gpu = (f", GPU {env['gpu']} (CuPy {env['cupy']}, torch CUDA {env.get('torch_cuda')}, "
           f"cuDNN {env.get('cudnn')})" if "gpu" in env else "")
    print(f"# {env['date']} {env['cpu']} ({env['cpus']} cpus), numpy {env['numpy']}, "
          f"torch {env['torch']}, device {args.device}{gpu}, BLAS threads "
          f"{env['blas_threads'] or 'default'}, torch threads {env.get('torch_threads', '-')}, "
          f"busy neighbours {args.busy}")
    print(f"# machine: {machine_summary(env)}")
    if args.in_process:
        print("# in-process: both frameworks in this process, alternating step by step")
    else:
        print(f"# isolate: each framework in a fresh process per round, {rounds} rounds, order "
              "alternating; ratio = median over rounds of gpunet/torch training medians, "
              "train ms = median of the rounds' medians (min-max over all rounds)")
    if args.isa:
        print(f"# --isa {args.isa}: {env['isa_label']}")
    print(table(results))
    if rows:
        print()
        print(sweep_table(rows))
    if args.json:
        report: dict[str, Any] = {"environment": env, "results": results}
        if rows:
            report["sweep"] = rows
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(results, rows, env, args.plot)
        print(f"# plot: {args.plot}")
    return 0
