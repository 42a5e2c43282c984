"""Training-step benchmarks of gpunet against PyTorch, measured side by side in one run.

Each workload builds the same model in gpunet and, when PyTorch is installed, in PyTorch, with
the same float32 data. One training step is forward, backward and an SGD-with-momentum update;
inference is one forward pass in eval mode. After warm-up the two frameworks alternate step by
step, so drifts of the machine (clock, other load) hit both alike. Peak memory is measured in a
fresh subprocess per framework and workload: the peak resident set during training steps over
the process's size before the model was built (Linux only).

Run it as ``gpunet bench`` or ``python scripts/bench.py``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable

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


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("batch 128, 784-512-512-10, ReLU, softmax cross-entropy",
                    lambda: Sequential([Dense(784, 512), ReLU(), Dense(512, 512), ReLU(),
                                        Dense(512, 10)]),
                    _torch_mlp, (128, 784)),
    "lenet": Workload("batch 64, 1x28x28, LeNet-5 with ReLU and max pooling",
                      _lenet, _torch_lenet, (64, 1, 28, 28)),
    "lstm": Workload("batch 32, 50 steps, input 64, hidden 256, last state to 1 output, MSE",
                     _lstm, _TorchLSTM, (32, 50, 64), classes=None, target_shape=(32, 1)),
    "bn": Workload("batch 128, 3x32x32, 2x (conv 3x3 to 32, BatchNorm, ReLU), global pool, "
                   "dense 10", _bn, _torch_bn, (128, 3, 32, 32)),
}


def _data(w: Workload, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.standard_normal(w.x_shape).astype(np.float32)
    if w.classes is None:
        return x, g.standard_normal(w.target_shape).astype(np.float32)
    return x, g.integers(0, w.classes, w.x_shape[0]).astype(np.int64)


class _GpunetRunner:
    def __init__(self, w: Workload, device: str) -> None:
        self.dev = gpunet.device(device)
        gpunet.seed(0)
        self.model = w.gpunet_model().to(self.dev)
        self.loss = SoftmaxCrossEntropy() if w.classes else MSE()
        self.opt = optim.SGD(self.model.params(), lr=0.01, momentum=0.9)
        x, y = _data(w)
        self.x, self.y = gpunet.asarray(x, self.dev), gpunet.asarray(y, self.dev)

    def train_step(self) -> None:
        self.opt.zero_grad()
        self.loss.forward(self.model.forward(self.x, training=True), self.y)
        self.model.backward(self.loss.backward())
        self.opt.step()
        self.dev.synchronize()

    def infer(self) -> None:
        self.model.forward(self.x, training=False)
        self.dev.synchronize()


class _TorchRunner:
    def __init__(self, w: Workload, device: str, torch: Any) -> None:
        self.torch = torch
        self.dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
        torch.manual_seed(0)
        self.model = w.torch_model(torch).to(self.dev)
        self.loss = torch.nn.CrossEntropyLoss() if w.classes else torch.nn.MSELoss()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        x, y = _data(w)
        self.x, self.y = torch.from_numpy(x).to(self.dev), torch.from_numpy(y).to(self.dev)

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def train_step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=False)
        self.loss(self.model(self.x), self.y).backward()
        self.opt.step()
        self._sync()

    def infer(self) -> None:
        self.model.eval()
        with self.torch.no_grad():
            self.model(self.x)
        self._sync()


def _timed(fn: Callable[[], None]) -> float:
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


def measure(name: str, device: str = "cpu", steps: int = 30, warmup: int = 5,
            threads: int | None = None) -> dict[str, Any]:
    """Time ``steps`` alternating training steps and inference passes of both frameworks."""
    w = WORKLOADS[name]
    torch = _import_torch()
    runners: dict[str, Any] = {"gpunet": _GpunetRunner(w, device)}
    if torch is not None:
        if threads:
            torch.set_num_threads(threads)
        runners["torch"] = _TorchRunner(w, device, torch)
    for r in runners.values():
        for _ in range(warmup):
            r.train_step()
            r.infer()
    train: dict[str, list[float]] = {k: [] for k in runners}
    infer: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(steps):
        for k, r in runners.items():
            train[k].append(_timed(r.train_step))
            infer[k].append(_timed(r.infer))
    result: dict[str, Any] = {"workload": name, "description": w.description, "device": device}
    for k in runners:
        result[k] = {"train": _stats(train[k]), "infer": _stats(infer[k]),
                     "peak_mb": peak_memory(name, k, device)}
    if "torch" in runners:
        result["ratio_train"] = (result["gpunet"]["train"]["median_ms"]
                                 / result["torch"]["train"]["median_ms"])
        result["ratio_infer"] = (result["gpunet"]["infer"]["median_ms"]
                                 / result["torch"]["infer"]["median_ms"])
        result["ratio_memory"] = result["gpunet"]["peak_mb"] / max(result["torch"]["peak_mb"], 1e-9)
    return result


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(name: str, framework: str, device: str) -> None:
    """In a fresh process: the peak resident memory of training steps over what the process
    held before the model was built (libraries loaded and their first GEMM done), so both
    frameworks are charged for weights, optimizer state, activations and temporaries, and
    neither for its library's own start-up."""
    w = WORKLOADS[name]
    torch = _import_torch() if framework == "torch" else None
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


def peak_memory(name: str, framework: str, device: str) -> float:
    """Peak resident-memory growth (MiB) of training steps, measured in a subprocess."""
    code = (f"from gpunet.bench import _peak_child; "
            f"_peak_child({name!r}, {framework!r}, {device!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def environment() -> dict[str, Any]:
    torch = _import_torch()
    env = {"date": str(date.today()), "machine": platform.machine(), "cpus": os.cpu_count(),
           "cpu": _cpu_name(), "python": platform.python_version(), "numpy": np.__version__,
           "gpunet": gpunet.__version__, "torch": getattr(torch, "__version__", None),
           "command": " ".join(sys.argv)}
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'workload':<8} {'gpunet train ms (min-max)':>26} {'torch train ms':>15} "
             f"{'ratio':>6} {'infer ratio':>11} {'peak MiB g/t':>14} {'mem ratio':>9}"]
    for r in results:
        g, t = r["gpunet"], r.get("torch")
        gt = f"{g['train']['median_ms']:.2f} ({g['train']['min_ms']:.2f}-{g['train']['max_ms']:.2f})"
        if t is None:
            lines.append(f"{r['workload']:<8} {gt:>26} {'(no torch)':>15}")
            continue
        lines.append(f"{r['workload']:<8} {gt:>26} {t['train']['median_ms']:>15.2f} "
                     f"{r['ratio_train']:>6.2f} {r['ratio_infer']:>11.2f} "
                     f"{g['peak_mb']:>6.1f}/{t['peak_mb']:<7.1f} {r['ratio_memory']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="gpunet bench", description=__doc__.split("\n\n")[0])
    p.add_argument("workloads", nargs="*", help=f"default: all ({', '.join(WORKLOADS)})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, help="PyTorch threads (default: PyTorch's own)")
    p.add_argument("--json", metavar="FILE", help="write the results and environment as JSON")
    args = p.parse_args(argv)
    names = args.workloads or list(WORKLOADS)
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; known: {sorted(WORKLOADS)}")
    results = [measure(n, args.device, args.steps, threads=args.threads) for n in names]
    env = environment()
    print(f"# {env['date']} {env['cpu']} ({env['cpus']} cpus), numpy {env['numpy']}, "
          f"torch {env['torch']}, device {args.device}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
    return 0
