#!/usr/bin/env python3
"""One command for the day a GPU is there: what gpunet does on it, in under 8 minutes.

    PYTHONPATH=. python3 scripts/gpu_check.py [--device cuda:0] [--out-dir DIR] [--stages ...]

Runs from a plain checkout (no ``pip install``) with whatever Python, NumPy, CuPy and PyTorch
it finds, and records their versions. Each stage below runs in a subprocess of its own, under
its time limit; a stage that fails, crashes or runs out of time is recorded as such and the
next one runs. Progress is printed as it goes; everything is written to
``benchmarks/results/gpu-<device>-<date>.md`` and ``.json``.

``--stand-in`` runs the same stages end to end on the test suite's CuPy stand-in
(``tests/cupy_standin``: kernels on the CPU emulator, arrays NumPy's) with tiny shapes, so the
script is known to work before a GPU is seen. Its file names and every table say "stand-in",
and its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
STANDIN_PATH = REPO / "tests" / "cupy_standin"


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    budget_s: int  # the most this stage may take; it is stopped there


# -- the stages and their budgets (seconds, on an H200) -----------------------------------
STAGES: tuple[Stage, ...] = (
    Stage("device", "device, driver and versions", 20),
    Stage("parity", "parity suite on the GPU, float32 and float64", 140),
    Stage("bench", "gpunet bench --device cuda against PyTorch with cuDNN", 140),
    Stage("bandwidth", "BatchNorm backward GB/s against a device-to-device copy", 30),
    Stage("kernels", "registers and spills per kernel", 40),
    Stage("sanitizer", "compute-sanitizer memcheck and racecheck on small parity cases", 100),
)
#: The whole check must fit in this; the stage budgets add up to less (470 s).
TOTAL_BUDGET_S = 480
#: A stage is skipped when less than this is left of the total budget.
MIN_STAGE_S = 5

# -- what the stages measure, on a GPU and on the stand-in --------------------------------
PARITY_DTYPES = ("float32", "float64")
BENCH = {"steps": 20, "warmup": 3, "shapes": {}}  # the workloads at their benchmark shapes
STANDIN_BENCH = {"steps": 1, "warmup": 1,
                 "shapes": {"mlp": {"batch": 2}, "lenet": {"batch": 2},
                            "lstm": {"batch": 2, "seq": 3}, "bn": {"batch": 1}}}
#: BatchNorm backward inputs (N, C, H, W) and (N, C): the two reduction kernels' paths.
BN_SHAPES = ((64, 64, 56, 56), (8192, 1024))
STANDIN_BN_SHAPES = ((2, 3, 4, 5), (6, 4))
BN_REPEATS, BN_WARMUP = 100, 10
STANDIN_BN_REPEATS, STANDIN_BN_WARMUP = 2, 1
#: The BatchNorm-backward-to-copy bandwidth ratio the kernels aim at.
BN_TARGET_RATIO = 0.6
#: Tensors each kernel must read or write whole, in units of the input's size (``dy``, ``x``
#: and ``dx`` have one size each); kernels not listed move only per-channel data.
KERNEL_TRAFFIC = {"bn_reduce_nchw": 2, "bn_reduce_nc": 2, "bn_backward_dx": 3}
#: The least BatchNorm backward can move: read dy and x, write dx.
BN_MIN_TRAFFIC = 3
#: Parity cases under compute-sanitizer, float32: together they launch every gpunet kernel.
SANITIZER_CASES = ("BatchNorm-4d", "BatchNorm-2d", "Conv2D", "MaxPool2D", "LSTM", "LayerNorm",
                   "LayerNorm-long", "Embedding", "GELU")
SANITIZER_TOOLS = ("memcheck", "racecheck")

STANDIN_NOTE = ("CuPy stand-in (tests/cupy_standin), not a GPU: kernels run on the CPU "
                "emulator and arrays are NumPy's, so every timing, bandwidth and memory figure "
                "here means nothing")


# == running things ========================================================================
def _run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> tuple[int | None, str, str, float]:
    """``(returncode, stdout, stderr, seconds)`` of ``cmd``; returncode None when it ran past
    ``timeout`` seconds, after which its whole process group is killed (a stage's own
    subprocesses included)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd,
                                start_new_session=True, text=True)
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read(), seconds


def _tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def _which(tool: str) -> str | None:
    """``tool`` on PATH or in a CUDA toolkit's usual places."""
    found = shutil.which(tool)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not home:
            continue
        for sub in ("bin", "compute-sanitizer"):
            path = Path(home) / sub / tool
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def _tool_version(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else None


def _child_env(standin: bool) -> dict[str, str]:
    """The stages' environment: the repository (and with ``--stand-in`` the stand-in, first)
    on PYTHONPATH, so a plain checkout runs."""
    env = dict(os.environ)
    paths = ([str(STANDIN_PATH)] if standin else []) + [str(REPO)]
    if env.get("PYTHONPATH"):
        paths += [p for p in env["PYTHONPATH"].split(os.pathsep)
                  if p and (standin or Path(p).resolve() != STANDIN_PATH)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if standin:
        env.setdefault("GPUNET_STANDIN_GPUS", "2")
    return env


# == the stages (each runs in a child process: ``--child NAME``) ============================
class Skip(Exception):
    """The stage cannot run here; the message says why."""


def _cupy(standin: bool) -> Any:
    """CuPy, checked to be the stand-in exactly when ``--stand-in`` asked for it."""
    import cupy
    is_standin = bool(getattr(cupy, "GPUNET_STANDIN", False))
    if is_standin and not standin:
        raise RuntimeError(f"import cupy gave the test suite's stand-in ({cupy.__file__}): "
                           "take tests/cupy_standin off PYTHONPATH, or pass --stand-in")
    if standin and not is_standin:
        raise RuntimeError(f"--stand-in, but import cupy gave {cupy.__file__}")
    return cupy


def _device(args: argparse.Namespace) -> Any:
    import gpunet
    _cupy(args.stand_in)
    dev = gpunet.device(args.device)
    if dev.type != "cuda":
        raise RuntimeError(f"--device {args.device} is no CUDA device")
    return dev


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace").rstrip("\x00")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _cuda_version(v: int | None) -> str | None:
    return None if v is None else f"{v // 1000}.{(v % 1000) // 10}"


def _git() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "reason": head.stderr.strip() or "not a git checkout"}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "modified": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"commit": None, "reason": f"git not usable: {e}"}


def stage_device(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    import gpunet
    data: dict[str, Any] = {
        "python": platform.python_version(), "python_executable": sys.executable,
        "platform": platform.platform(), "numpy": np.__version__, "gpunet": gpunet.__version__,
        "git": _git(), "standin": args.stand_in}
    cupy = _cupy(args.stand_in)
    data["cupy"] = cupy.__version__
    data["cupy_file"] = cupy.__file__
    runtime = cupy.cuda.runtime
    data["cuda_runtime"] = _cuda_version(runtime.runtimeGetVersion())
    data["cuda_driver"] = _cuda_version(runtime.driverGetVersion())
    count = runtime.getDeviceCount()
    data["device_count"] = count
    dev = gpunet.device(args.device)
    props = _jsonable(runtime.getDeviceProperties(dev.index))
    data["device"] = {"spec": dev.name, "label": dev.label, "index": dev.index,
                      "name": props.get("name"),
                      "compute_capability": f"{props.get('major')}.{props.get('minor')}",
                      "memory_gib": round(props.get("totalGlobalMem", 0) / 2**30, 1),
                      "multiprocessors": props.get("multiProcessorCount"),
                      "properties": props}
    for label, get in (("nvrtc", _nvrtc_version), ("nccl", _nccl_version)):
        try:
            data[label] = _jsonable(get())
        except Exception as e:  # absent from this CuPy (or the stand-in)
            data[label] = f"unavailable ({type(e).__name__}: {e})"
    try:
        import torch
        cudnn = torch.backends.cudnn
        data["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": torch.cuda.is_available(),
                         "cudnn": cudnn.version() if cudnn.is_available() else None}
    except ImportError as e:
        data["torch"] = f"not importable ({e})"
    try:
        import mpi4py
        data["mpi4py"] = mpi4py.__version__
    except ImportError as e:
        data["mpi4py"] = f"not importable ({e})"
    tools = {}
    for tool in ("nvidia-smi", "ptxas", "compute-sanitizer", "nvcc"):
        path = _which(tool)
        tools[tool] = {"path": path,
                       "version": _tool_version(path) if tool != "nvidia-smi" else None}
    data["tools"] = tools
    smi = tools["nvidia-smi"]["path"]
    if smi:
        rc, out, err, _ = _run([smi], 15)
        data["nvidia_smi"] = out if rc == 0 else f"exit {rc}: {err}"
        rc, out, err, _ = _run([smi, "--query-gpu=index,name,driver_version,memory.total,"
                                "clocks.max.sm,clocks.max.memory,power.limit,pstate",
                                "--format=csv"], 15)
        data["nvidia_smi_query"] = out if rc == 0 else f"exit {rc}: {err}"
    else:
        data["nvidia_smi"] = "nvidia-smi not found"
    summary = (f"{data['device']['name']} ({dev.label}), compute capability "
               f"{data['device']['compute_capability']}, {data['device']['memory_gib']} GiB; "
               f"CUDA driver {data['cuda_driver']}, runtime {data['cuda_runtime']}; "
               f"CuPy {data['cupy']}; PyTorch "
               f"{data['torch']['version'] if isinstance(data['torch'], dict) else 'none'}")
    return {"status": "ok", "summary": summary, "data": data}


def _nvrtc_version() -> Any:
    from cupy.cuda import nvrtc
    return nvrtc.getVersion()


def _nccl_version() -> Any:
    from cupy.cuda import nccl
    if not getattr(nccl, "available", True):
        return "unavailable (cupy.cuda.nccl.available is False)"
    return nccl.get_version()


def stage_parity(args: argparse.Namespace) -> dict[str, Any]:
    from gpunet import parity
    dev = _device(args)
    start = time.perf_counter()
    results = parity.run([dev], PARITY_DTYPES)
    rows = [{"case": r.case, "device": r.device, "dtype": r.dtype, "ok": r.ok,
             "worst": max(r.errors.values(), default=None), "message": r.message}
            for r in results]
    per_dtype = {d: {"passed": sum(r["ok"] for r in rows if r["dtype"] == d),
                     "failed": sum(not r["ok"] for r in rows if r["dtype"] == d)}
                 for d in PARITY_DTYPES}
    failed = [r for r in rows if not r["ok"]]
    print(parity.table(results))
    summary = (f"{len(rows) - len(failed)} passed, {len(failed)} failed on {dev.label} ("
               + ", ".join(f"{d}: {c['passed']}/{c['passed'] + c['failed']}"
                           for d, c in per_dtype.items()) + ")")
    return {"status": "failed" if failed else "ok", "summary": summary,
            "data": {"per_dtype": per_dtype, "failed": failed, "rows": rows,
                     "seconds": time.perf_counter() - start}}


def stage_bench(args: argparse.Namespace) -> dict[str, Any]:
    from gpunet import bench
    dev = _device(args)
    settings = STANDIN_BENCH if args.stand_in else BENCH
    results, errors = [], {}
    for name in bench.WORKLOADS:
        try:
            results.append(bench.measure(name, dev.name, settings["steps"], settings["warmup"],
                                         allow_standin=args.stand_in,
                                         **settings["shapes"].get(name, {})))
        except Exception as e:  # one workload's failure is recorded; the others still run
            errors[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    print(bench.table(results))
    env = bench.environment(dev.name)
    ratios = ", ".join(f"{r['workload']} {r['ratio_train']:.2f}" for r in results
                       if "ratio_train" in r)
    skipped = {r.get("torch_skipped") for r in results} - {None}
    summary = (f"{len(results)} workloads" + (f", {len(errors)} failed" if errors else "")
               + (f"; gpunet/PyTorch training step: {ratios}" if ratios else "")
               + (f"; PyTorch not run: {'; '.join(sorted(skipped))}" if skipped else ""))
    return {"status": "failed" if errors else "ok", "summary": summary,
            "data": {"steps": settings["steps"], "warmup": settings["warmup"],
                     "shapes": settings["shapes"] or "the benchmark's own (gpunet.bench)",
                     "results": results, "errors": errors, "environment": env}}


_KERNELS: dict[str, Any] = {}
_SPIN = r"""extern "C" __global__ void gpu_check_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}"""


def _queue_ahead(cupy: Any, props: dict[str, Any], standin: bool) -> str:
    """Keep the GPU busy for about 100 ms with one spinning thread, so that the launches timed
    after it are all queued before the GPU reaches them: the events then time the GPU's work,
    not the host's Python between launches (a BatchNorm backward of 51 MB takes the GPU about
    65 us, gpunet's Python about as long to issue). Returns what it did."""
    import numpy as np
    if standin:
        return "no spin on the stand-in (its emulator has no clock64)"
    khz = props.get("clockRate") or 2_000_000  # kHz; CUDA 13 may leave it out
    cycles = int(khz * 1e3 * 0.1)
    if "spin" not in _KERNELS:
        _KERNELS["spin"] = cupy.RawKernel(_SPIN, "gpu_check_spin")
    try:
        _KERNELS["spin"]((1,), (1,), (np.int64(cycles),))
    except Exception as e:  # timed without it then: the host may be what is measured
        return f"no spin ({type(e).__name__}: {e}): the host's launch rate may be timed"
    return f"a one-thread kernel spinning {cycles} clock cycles (~100 ms) before each timed loop"


def _event_ms(cupy: Any, fn: Callable[[], None], repeats: int, before: Callable[[], Any]
              ) -> float:
    """Milliseconds per call of ``fn`` over ``repeats`` back-to-back calls, by CUDA events."""
    before()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / repeats


def _gbs(nbytes: float, ms: float) -> float | None:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else None


def stage_bandwidth(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    import gpunet
    dev = _device(args)
    cupy = dev.xp
    props = _jsonable(cupy.cuda.runtime.getDeviceProperties(dev.index))
    shapes = STANDIN_BN_SHAPES if args.stand_in else BN_SHAPES
    repeats, warmup = ((STANDIN_BN_REPEATS, STANDIN_BN_WARMUP) if args.stand_in
                       else (BN_REPEATS, BN_WARMUP))
    rows, findings, spin = [], [], ""
    g = np.random.default_rng(0)
    for shape in shapes:
        c = shape[1]
        with dev.scope():
            x = gpunet.asarray(g.standard_normal(shape).astype(np.float32), dev)
            dy = gpunet.asarray(g.standard_normal(shape).astype(np.float32), dev)
            axes = tuple(i for i in range(len(shape)) if i != 1)
            mean = x.mean(axis=axes)
            invstd = 1 / cupy.sqrt(x.var(axis=axes) + np.float32(1e-5))
            gamma = gpunet.asarray(g.standard_normal(c).astype(np.float32), dev)
            dst = cupy.empty_like(x)

            def op() -> None:
                dev.batchnorm_backward(dy, x, mean, invstd, gamma)

            def copy() -> None:
                cupy.copyto(dst, x)

            spin = _queue_ahead(cupy, props, args.stand_in)  # also compiles the spin kernel
            for _ in range(warmup):
                op()
                copy()
            dev.synchronize()
            before = lambda: _queue_ahead(cupy, props, args.stand_in)  # noqa: E731
            op_ms = _event_ms(cupy, op, repeats, before)
            copy_ms = _event_ms(cupy, copy, repeats, before)
            # each kernel on its own: events around every launch of the op, fewer calls so
            # that the launches and events stay within CUDA's queue while the spin runs
            kernel_repeats = min(repeats, 20)
            launches: list[tuple[str, Any, Any]] = []
            launch = dev.launch

            def timed_launch(kernel: str, *a: Any, **k: Any) -> None:
                s, e = cupy.cuda.Event(), cupy.cuda.Event()
                s.record()
                launch(kernel, *a, **k)
                e.record()
                launches.append((kernel, s, e))

            dev.launch = timed_launch
            try:
                before()
                for _ in range(kernel_repeats):
                    op()
                dev.synchronize()
            finally:
                del dev.launch
            kernel_ms: dict[str, float] = {}
            for kernel, s, e in launches:
                kernel_ms[kernel] = (kernel_ms.get(kernel, 0.0)
                                     + cupy.cuda.get_elapsed_time(s, e) / kernel_repeats)
        size = x.nbytes
        copy_gbs = _gbs(2 * size, copy_ms)
        launched = sum(KERNEL_TRAFFIC.get(k, 0) for k in kernel_ms)
        op_gbs = _gbs(BN_MIN_TRAFFIC * size, op_ms)
        ratio = op_gbs / copy_gbs if op_gbs and copy_gbs else None
        kernels = [{"kernel": k, "ms": ms, "traffic": KERNEL_TRAFFIC.get(k),
                    "gbs": _gbs(KERNEL_TRAFFIC[k] * size, ms) if k in KERNEL_TRAFFIC else None}
                   for k, ms in kernel_ms.items()]
        for k in kernels:
            k["ratio_to_copy"] = (k["gbs"] / copy_gbs if k["gbs"] and copy_gbs else None)
        row = {"shape": list(shape), "dtype": "float32", "tensor_mb": size / 1e6,
               "repeats": repeats, "bn_backward_ms": op_ms, "copy_ms": copy_ms,
               "bn_backward_gbs_min_traffic": op_gbs,
               "bn_backward_gbs_as_launched": _gbs(launched * size, op_ms),
               "launched_traffic": launched, "copy_gbs": copy_gbs, "ratio": ratio,
               "kernels": kernels}
        if args.stand_in:
            row["label"] = STANDIN_NOTE
        rows.append(row)
        if not args.stand_in and ratio is not None and ratio < BN_TARGET_RATIO:
            findings.append(f"BatchNorm backward on {tuple(shape)} reaches {ratio:.2f} of the "
                            f"copy's bandwidth, below the target {BN_TARGET_RATIO}")
    print(json.dumps(rows, indent=1))
    first = rows[0]
    summary = (f"{tuple(first['shape'])} float32: BatchNorm backward "
               f"{_f(first['bn_backward_gbs_min_traffic'], '.1f')} GB/s, copy "
               f"{_f(first['copy_gbs'], '.1f')} GB/s, ratio {_f(first['ratio'])} "
               f"(target >= {BN_TARGET_RATIO})")
    if args.stand_in:
        summary += " [stand-in: meaningless]"
    theoretical = None
    if props.get("memoryClockRate") and props.get("memoryBusWidth"):
        theoretical = 2 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8 / 1e9
    return {"status": "ok", "summary": summary, "findings": findings,
            "data": {"rows": rows, "timing": f"CUDA events over {repeats} back-to-back calls "
                                              f"after {warmup} untimed ones (each kernel: events "
                                              f"around its launches in {min(repeats, 20)} calls)"
                                              f"; {spin}",
                     "target_ratio": BN_TARGET_RATIO,
                     "theoretical_gbs": theoretical,
                     "bytes_counted": (
                         f"BatchNorm backward: {BN_MIN_TRAFFIC} tensors of the input's size, "
                         "the least it must move (read dy and x, write dx; per-channel "
                         "vectors ignored); 'as launched' counts each kernel's own whole-tensor "
                         f"reads and writes ({KERNEL_TRAFFIC}). Copy: read and write one "
                         "tensor (2 sizes). GB/s = bytes / time / 1e9; ratio = BatchNorm "
                         "backward GB/s (least traffic) / copy GB/s.")}}


def _cupy_kernel_attributes(dev: Any) -> list[dict[str, Any]]:
    """Registers and local memory of every kernel as CuPy compiled and loaded it for this GPU
    (``RawKernel.attributes``, from cuFuncGetAttribute)."""
    from gpunet import kernels
    rows = []
    with dev.scope():
        for file in kernels.KERNELS:
            # compiled as CudaBackend.launch compiles it (the same source, options and names)
            module = dev.xp.RawModule(code=kernels.expanded_source(file), options=("-std=c++17",),
                                      name_expressions=kernels.name_expressions(file))
            for expr in kernels.name_expressions(file):
                attrs = module.get_function(expr).attributes
                rows.append({"file": file, "kernel": expr, "registers": attrs["num_regs"],
                             "local_bytes": attrs["local_size_bytes"],
                             "shared_bytes": attrs["shared_size_bytes"],
                             "max_threads_per_block": attrs["max_threads_per_block"],
                             "binary_version": attrs.get("binary_version")})
    return rows


def stage_kernels(args: argparse.Namespace) -> dict[str, Any]:
    dev = _device(args)
    props = _jsonable(dev.xp.cuda.runtime.getDeviceProperties(dev.index))
    arch = f"sm_{props['major']}{props['minor']}"
    data: dict[str, Any] = {"arch": arch}
    reasons, findings = [], []
    # (1) CuPy's own compile for this GPU
    if args.stand_in:
        reasons.append("CuPy's kernel attributes: the stand-in runs kernels on the CPU "
                       "emulator, which has no cubin and no registers")
    else:
        try:
            data["cupy_attributes"] = _cupy_kernel_attributes(dev)
        except Exception as e:
            reasons.append(f"CuPy's kernel attributes: {type(e).__name__}: {e}")
    # (2) NVRTC's PTX through ptxas -v (scripts/kernel_report.py)
    ptxas = _which("ptxas")
    if ptxas is None:
        reasons.append("ptxas -v: ptxas not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    else:
        os.environ["PATH"] = str(Path(ptxas).parent) + os.pathsep + os.environ.get("PATH", "")
        sys.path.insert(0, str(REPO / "scripts"))
        try:
            import kernel_report
            from gpunet import nvrtc
            data["ptxas"] = {"path": ptxas, "version": _tool_version(ptxas),
                             "nvrtc": ".".join(map(str, nvrtc.version())),
                             "rows": kernel_report.report(arch)}
        except Exception as e:
            reasons.append(f"ptxas -v: {type(e).__name__}: {str(e).splitlines()[0]}")
    for row in data.get("ptxas", {}).get("rows", []):
        spills = row.get("spill_stores", 0) + row.get("spill_loads", 0)
        if spills:
            findings.append(f"{row['kernel']} spills {spills} bytes on {row['arch']} (ptxas)")
    for row in data.get("cupy_attributes", []):
        if row["local_bytes"]:
            findings.append(f"{row['kernel']} uses {row['local_bytes']} bytes of local memory "
                            "per thread (stack or spills)")
    print(json.dumps(data, indent=1))
    if "cupy_attributes" not in data and "ptxas" not in data:
        return {"status": "skipped", "reason": "; ".join(reasons), "data": data}
    counts = [f"{len(data[k]['rows'] if k == 'ptxas' else data[k])} from "
              f"{'ptxas -v' if k == 'ptxas' else 'CuPy'}"
              for k in ("cupy_attributes", "ptxas") if k in data]
    summary = (f"{arch}: {', '.join(counts)} kernel rows; "
               + (f"{len(findings)} with spills or local memory" if findings else "no spills"))
    return {"status": "ok", "summary": summary, "findings": findings,
            "reason": "; ".join(reasons), "data": data}


_SUMMARY = re.compile(r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)")


def stage_sanitizer(args: argparse.Namespace) -> dict[str, Any]:
    sanitizer = args.sanitizer or _which("compute-sanitizer")
    cases = ",".join(SANITIZER_CASES)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    per_tool = max((args.timeout or 60) / len(SANITIZER_TOOLS) - 2, 5)

    def parity_command(result: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--child", "sanitized-parity",
                "--result", str(result), "--device", args.device, "--cases", cases] + (
                    ["--stand-in"] if args.stand_in else [])

    if (args.stand_in and not args.sanitizer) or sanitizer is None:
        reason = ("the stand-in runs no CUDA for compute-sanitizer to watch" if args.stand_in
                  else "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda)")
        # the command the tools would run, run without them, so that it is known to work
        rc, out, err, seconds = _run(parity_command(tmp / "plain.json"), per_tool)
        plain = (json.loads((tmp / "plain.json").read_text())
                 if (tmp / "plain.json").is_file()
                 else {"status": "error", "reason": _tail(err, 2000)})
        return {"status": "skipped", "reason": reason,
                "data": {"cases": SANITIZER_CASES, "without_the_tool": {
                    "returncode": rc, "seconds": seconds, **plain}}}
    tools = {}
    failed = False
    for tool in SANITIZER_TOOLS:
        result = tmp / f"{tool}.json"
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20",
               *parity_command(result)]
        rc, out, err, seconds = _run(cmd, per_tool)
        summaries = _SUMMARY.findall(out + err)
        entry: dict[str, Any] = {"returncode": rc, "seconds": seconds, "summary": summaries,
                                 "output_tail": _tail(out + err, 6000)}
        if result.is_file():
            entry["parity"] = json.loads(result.read_text())
        if rc is None:
            entry["status"] = f"timeout after {per_tool:.0f} s"
        elif rc == 99:
            entry["status"] = "errors found"
        elif rc != 0:
            entry["status"] = f"exit status {rc}"
        else:
            entry["status"] = "clean"
        failed |= entry["status"] != "clean"
        tools[tool] = entry
        print(f"{tool}: {entry['status']} {summaries}")
    summary = "; ".join(f"{t}: {e['status']}" + (f" ({e['summary'][-1]})" if e["summary"] else "")
                        for t, e in tools.items())
    return {"status": "failed" if failed else "ok", "summary": summary,
            "data": {"cases": SANITIZER_CASES, "dtype": "float32", "tool": sanitizer,
                     "version": _tool_version(sanitizer), "tools": tools,
                     "allocator": "CuPy's memory pool off (cupy.cuda.set_allocator(None)) so "
                                  "that memcheck sees every array's own bounds"}}


def stage_sanitized_parity(args: argparse.Namespace) -> dict[str, Any]:
    """What compute-sanitizer runs: the parity cases of ``--cases`` in float32, with CuPy's
    pool off (each array its own allocation) and every kernel launched recorded."""
    from gpunet import kernels, parity
    cupy = _cupy(args.stand_in)
    if not args.stand_in:
        cupy.cuda.set_allocator(None)
    dev = _device(args)
    launched: set[str] = set()
    launch = dev.launch

    def recording_launch(kernel: str, *a: Any, **k: Any) -> None:
        launched.add(kernel)
        launch(kernel, *a, **k)

    dev.launch = recording_launch
    results = parity.run([dev], ("float32",), args.cases.split(","))
    failed = [r.case for r in results if not r.ok]
    print(parity.table(results))
    every = {k for names in kernels.KERNELS.values() for k in names}
    return {"status": "failed" if failed else "ok",
            "summary": f"{len(results) - len(failed)} passed, {len(failed)} failed",
            "data": {"passed": len(results) - len(failed), "failed": failed,
                     "kernels_launched": sorted(launched),
                     "kernels_not_launched": sorted(every - launched)}}


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "device": stage_device, "parity": stage_parity, "bench": stage_bench,
    "bandwidth": stage_bandwidth, "kernels": stage_kernels, "sanitizer": stage_sanitizer,
    "sanitized-parity": stage_sanitized_parity}


def child(args: argparse.Namespace) -> int:
    """Run one stage and write its result (JSON) to ``--result``."""
    try:
        result = CHILDREN[args.child](args)
    except Skip as e:
        result = {"status": "skipped", "reason": str(e)}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(e).__name__}: {e}",
                  "traceback": _tail(traceback.format_exc(), 4000)}
    Path(args.result).write_text(json.dumps(_jsonable(result), indent=1))
    return 0 if result["status"] in ("ok", "skipped") else 1


# == the parent: stages in order, then the report ==========================================
def run_stage(stage: Stage, args: argparse.Namespace, timeout: float, env: dict[str, str],
              tmp: Path) -> dict[str, Any]:
    result_file = tmp / f"{stage.name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage.name, "--result",
           str(result_file), "--device", args.device, "--timeout", f"{timeout:.0f}"]
    if args.stand_in:
        cmd.append("--stand-in")
    if args.sanitizer:
        cmd += ["--sanitizer", str(Path(args.sanitizer).resolve())]
    rc, out, err, seconds = _run(cmd, timeout, env, cwd=REPO)
    entry: dict[str, Any] = {"name": stage.name, "title": stage.title,
                             "budget_s": stage.budget_s, "timeout_s": round(timeout, 1),
                             "seconds": round(seconds, 2)}
    if rc is None:
        entry.update(status="timeout", reason=f"stopped after {timeout:.0f} s (its limit)")
    elif result_file.is_file():
        entry.update(json.loads(result_file.read_text()))
    else:
        entry.update(status="error", reason=f"exit status {rc} without a result; "
                                            f"stderr: {_tail(err, 800)}")
    entry["stdout_tail"], entry["stderr_tail"] = _tail(out), _tail(err)
    return entry


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-device"


def _output_paths(out_dir: Path, device_name: str, standin: bool, day: str) -> tuple[Path, Path]:
    slug = _slug(device_name)
    if standin and "stand-in" not in slug:
        slug = f"stand-in-{slug}"
    stem = f"gpu-{slug}-{day}"
    n = 1
    while (out_dir / f"{stem}.md").exists() or (out_dir / f"{stem}.json").exists():
        n += 1
        stem = f"gpu-{slug}-{day}-{n}"
    return out_dir / f"{stem}.md", out_dir / f"{stem}.json"


def _f(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a summary table of the stages, then each stage's tables."""
    standin = report["standin"]
    caption = f"\n_{STANDIN_NOTE}._\n" if standin else ""
    stages = {s["name"]: s for s in report["stages"]}
    title = report["device_name"] + (" (CuPy stand-in)" if standin and "stand-in" not in
                                     report["device_name"] else "")
    lines = [f"# gpunet GPU check: {title}, {report['date']}", ""]
    if standin:
        lines += [f"**{STANDIN_NOTE}.** This run shows only that `scripts/gpu_check.py` works "
                  "end to end.", ""]
    git = report.get("git") or {}
    lines += [f"`{report['command']}`, gpunet commit {git.get('commit') or 'unknown'}"
              + (" (with local changes)" if git.get("modified") else "")
              + f", {report['elapsed_s']:.0f} s of a {report['budget_s']} s budget.", ""]
    lines += ["## Stages" + (" (stand-in)" if standin else ""), caption,
              "| stage | status | seconds | budget | result |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        text = s.get("summary") or s.get("reason") or ""
        if s.get("status") == "ok" and s.get("reason"):
            text += f" (not available: {s['reason']})"
        if s.get("findings"):
            text += " **Findings:** " + "; ".join(s["findings"])
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['budget_s']} "
                     f"| {text.replace('|', '/')} |")
    lines.append("")

    d = stages.get("device", {}).get("data")
    if d:
        dev = d.get("device", {})
        torch = d.get("torch")
        lines += ["## Device and versions" + (" (stand-in)" if standin else ""), caption,
                  "| | |", "|---|---|",
                  f"| device | {dev.get('name')} ({dev.get('label')}), compute capability "
                  f"{dev.get('compute_capability')}, {dev.get('memory_gib')} GiB, "
                  f"{dev.get('multiprocessors')} SMs |",
                  f"| CUDA driver / runtime | {d.get('cuda_driver')} / {d.get('cuda_runtime')} |",
                  f"| Python / NumPy | {d.get('python')} / {d.get('numpy')} |",
                  f"| CuPy | {d.get('cupy')} (NVRTC {d.get('nvrtc')}, NCCL {d.get('nccl')}) |",
                  "| PyTorch | " + (f"{torch['version']} (CUDA {torch['cuda']}, available "
                                    f"{torch['cuda_available']}, cuDNN {torch['cudnn']})"
                                    if isinstance(torch, dict) else str(torch)) + " |",
                  f"| mpi4py | {d.get('mpi4py')} |",
                  f"| gpunet | {d.get('gpunet')}, commit {(d.get('git') or {}).get('commit')} |"]
        for tool, t in (d.get("tools") or {}).items():
            lines.append(f"| {tool} | {t.get('path') or 'not found'}"
                         + (f" ({t['version']})" if t.get("version") else "") + " |")
        lines.append("")
        if isinstance(d.get("nvidia_smi"), str) and "\n" in d["nvidia_smi"]:
            lines += ["```", d["nvidia_smi"].rstrip(), "```", ""]

    p = stages.get("parity", {}).get("data")
    if p:
        lines += ["## Parity" + (" (stand-in)" if standin else ""), caption,
                  "| dtype | passed | failed |", "|---|---|---|"]
        lines += [f"| {k} | {v['passed']} | {v['failed']} |" for k, v in p["per_dtype"].items()]
        for r in p.get("failed", []):
            lines.append(f"\nFAIL {r['case']} {r['dtype']}: worst {_f(r['worst'], '.3g')} "
                         f"{r['message']}")
        lines.append("")

    b = stages.get("bench", {}).get("data")
    if b:
        lines += ["## Training steps against PyTorch" + (" (stand-in)" if standin else ""),
                  caption, f"{b['steps']} timed steps after {b['warmup']} warm-up steps; "
                  f"shapes: {b['shapes']}.", "",
                  "| workload | gpunet train ms | PyTorch train ms | train ratio | infer ratio "
                  "| gpunet peak MiB | PyTorch peak MiB (reserved) | memory ratio (vs "
                  "reserved) |", "|---|---|---|---|---|---|---|---|"]
        for r in b["results"]:
            g, t = r["gpunet"], r.get("torch") or {}
            label = " (stand-in)" if r.get("standin") else ""
            lines.append(f"| {r['workload']}{label} | {g['train']['median_ms']:.2f} | "
                         f"{_f(t.get('train', {}).get('median_ms'))} | "
                         f"{_f(r.get('ratio_train'))} | {_f(r.get('ratio_infer'))} | "
                         f"{_f(g.get('peak_mb'), '.1f')} | {_f(t.get('peak_mb'), '.1f')} "
                         f"({_f(t.get('reserved_peak_mb'), '.1f')}) | "
                         f"{_f(r.get('ratio_memory'))} ({_f(r.get('ratio_memory_reserved'))}) |")
        skipped = {r.get("torch_skipped") for r in b["results"]} - {None}
        if skipped:
            lines.append(f"\nPyTorch not run: {'; '.join(sorted(skipped))}.")
        if b["results"]:
            g = b["results"][0]["gpunet"]
            t = b["results"][0].get("torch")
            lines.append(f"\nPeak memory: gpunet, {g.get('peak_method')}"
                         + (f"; PyTorch, {t.get('peak_method')}" if t else "") + ".")
        for name, e in b.get("errors", {}).items():
            lines.append(f"\n{name} failed: {e}")
        lines.append("")

    w = stages.get("bandwidth", {}).get("data")
    if w:
        lines += ["## BatchNorm backward bandwidth" + (" (stand-in)" if standin else ""),
                  caption, f"{w['timing']}. {w['bytes_counted']}"
                  + (f" Theoretical peak from the device properties: {w['theoretical_gbs']:.0f}"
                     " GB/s." if w.get("theoretical_gbs") else ""), "",
                  "| shape (float32) | BN backward ms | GB/s (least traffic) | GB/s (as "
                  "launched) | copy ms | copy GB/s | ratio (target >= "
                  f"{w['target_ratio']}) |", "|---|---|---|---|---|---|---|"]
        for r in w["rows"]:
            lines.append(f"| {tuple(r['shape'])} | {r['bn_backward_ms']:.4f} | "
                         f"{_f(r['bn_backward_gbs_min_traffic'], '.1f')} | "
                         f"{_f(r['bn_backward_gbs_as_launched'], '.1f')} | {r['copy_ms']:.4f} | "
                         f"{_f(r['copy_gbs'], '.1f')} | {_f(r['ratio'])} |")
        lines += ["", "| shape | kernel | ms per call | tensors moved | GB/s | ratio to copy |",
                  "|---|---|---|---|---|---|"]
        for r in w["rows"]:
            for k in r["kernels"]:
                lines.append(f"| {tuple(r['shape'])} | {k['kernel']} | {k['ms']:.4f} | "
                             f"{k['traffic'] or 'per-channel only'} | {_f(k['gbs'], '.1f')} | "
                             f"{_f(k['ratio_to_copy'])} |")
        lines.append("")

    k = stages.get("kernels", {}).get("data")
    if k and (k.get("cupy_attributes") or k.get("ptxas")):
        lines += ["## Registers and spills" + (" (stand-in)" if standin else ""), caption]
        if k.get("cupy_attributes"):
            lines += [f"As CuPy compiled and loaded them for this GPU ({k['arch']}):", "",
                      "| kernel | registers | local bytes | shared bytes | max threads/block |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['kernel']} | {r['registers']} | {r['local_bytes']} | "
                      f"{r['shared_bytes']} | {r['max_threads_per_block']} |"
                      for r in k["cupy_attributes"]]
            lines.append("")
        if k.get("ptxas"):
            x = k["ptxas"]
            lines += [f"NVRTC {x['nvrtc']} PTX through `ptxas -v` ({x['version']}) for "
                      f"{k['arch']}:", "",
                      "| kernel | registers | shared bytes | stack bytes | spill stores | "
                      "spill loads |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['kernel']} | {r.get('registers')} | {r.get('smem')} | "
                      f"{r.get('stack')} | {r.get('spill_stores')} | {r.get('spill_loads')} |"
                      for r in x["rows"]]
            lines.append("")

    s = stages.get("sanitizer", {})
    if s.get("data"):
        sd = s["data"]
        lines += ["## compute-sanitizer" + (" (stand-in)" if standin else ""), caption,
                  f"Parity cases {', '.join(sd['cases'])} in float32.", ""]
        if sd.get("tools"):
            lines += ["| tool | status | seconds | summary | kernels launched |",
                      "|---|---|---|---|---|"]
            unseen = set()
            for tool, e in sd["tools"].items():
                ran = (e.get("parity") or {}).get("data", {})
                unseen |= set(ran.get("kernels_not_launched", []))
                lines.append(f"| {tool} | {e['status']} | {e['seconds']:.1f} | "
                             f"{'; '.join(e['summary']) or '-'} | "
                             f"{', '.join(ran.get('kernels_launched', []))} |")
            if unseen:
                lines.append(f"\nNot launched by these cases, so not checked: "
                             f"{', '.join(sorted(unseen))}.")
        else:
            plain = sd.get("without_the_tool", {})
            ran = plain.get("data") or {}
            lines.append(f"Not run: {s.get('reason')}. The command it would run, run without "
                         f"the tool: {plain.get('summary') or plain.get('reason')}"
                         + (f"; kernels launched: {', '.join(ran['kernels_launched'])}; not "
                            f"launched: {', '.join(ran['kernels_not_launched']) or 'none'}"
                            if "kernels_launched" in ran else "") + ".")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Stages (budget in seconds): " + "; ".join(
            f"{s.name} ({s.budget_s}): {s.title}" for s in STAGES)
        + f". Total budget {TOTAL_BUDGET_S} s.")
    parser.add_argument("--device", default="cuda:0", help="the GPU to check (default cuda:0)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                        help="where the .md and .json go (default benchmarks/results)")
    parser.add_argument("--stand-in", action="store_true",
                        help="run on the test suite's CuPy stand-in (tiny shapes; numbers "
                             "mean nothing)")
    parser.add_argument("--stages", help="comma-separated subset of: "
                        + ", ".join(s.name for s in STAGES))
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, metavar="SECONDS",
                        help=f"the whole check's time limit (default {TOTAL_BUDGET_S})")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="another time limit for a stage (repeatable), e.g. bench=300 on a "
                             "slower machine; the total budget still applies")
    parser.add_argument("--sanitizer", metavar="PATH",
                        help="the compute-sanitizer to run (default: found on PATH, in "
                             "$CUDA_HOME or /usr/local/cuda); given, it runs even with "
                             "--stand-in, for testing this script")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--cases", default=",".join(SANITIZER_CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    chosen = args.stages.split(",") if args.stages else [s.name for s in STAGES]
    limits: dict[str, float] = {}
    for item in args.limit:
        name, _, value = item.partition("=")
        try:
            limits[name] = float(value)
        except ValueError:
            parser.error(f"--limit {item}: expected STAGE=SECONDS")
    unknown = (set(chosen) | set(limits)) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    started, wall = time.monotonic(), datetime.now(timezone.utc)
    deadline = started + args.budget
    env = _child_env(args.stand_in)
    tag = "gpu_check (stand-in)" if args.stand_in else "gpu_check"
    print(f"[{tag}] {len(chosen)} stages on {args.device}, budget {args.budget:.0f} s"
          + (f"; {STANDIN_NOTE}" if args.stand_in else ""), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for i, stage in enumerate(s for s in STAGES if s.name in chosen):
            left = deadline - time.monotonic() - 2
            if left < MIN_STAGE_S:
                entry = {"name": stage.name, "title": stage.title, "budget_s": stage.budget_s,
                         "seconds": 0.0, "status": "skipped",
                         "reason": f"no time left of the {args.budget:.0f} s budget"}
            else:
                timeout = min(limits.get(stage.name, stage.budget_s), left)
                print(f"[{tag}] {i + 1}/{len(chosen)} {stage.name}: {stage.title} "
                      f"(limit {timeout:.0f} s) ...", flush=True)
                entry = run_stage(stage, args, timeout, env, Path(tmp))
            text = entry.get("summary") or entry.get("reason") or ""
            print(f"[{tag}]     {stage.name}: {entry['status']} in {entry['seconds']:.1f} s"
                  f" - {text}", flush=True)
            for finding in entry.get("findings") or []:
                print(f"[{tag}]     finding: {finding}", flush=True)
            results.append(entry)
    device = next((s for s in results if s["name"] == "device"), {}).get("data") or {}
    device_name = (device.get("device") or {}).get("name") or (
        "CuPy stand-in" if args.stand_in else "unknown device")
    report = {
        "tool": "scripts/gpu_check.py", "standin": args.stand_in,
        "label": STANDIN_NOTE if args.stand_in else None,
        "date": str(date.today()), "started_utc": wall.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device_spec": args.device, "device_name": device_name,
        "git": device.get("git") or _git(), "budget_s": args.budget,
        "elapsed_s": round(time.monotonic() - started, 1),
        "stages": results}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = _output_paths(args.out_dir, device_name, args.stand_in, report["date"])
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report) + "\n")
    bad = [s["name"] for s in results if s["status"] not in ("ok", "skipped")]
    print(f"[{tag}] done in {report['elapsed_s']:.0f} s: "
          + (f"not ok: {', '.join(bad)}" if bad else "every stage ok or skipped")
          + f"\n[{tag}] wrote {md_path} and {json_path}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
