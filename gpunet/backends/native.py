"""The CPU device's compiled float32 loops (``kernels/cpu.cpp``), built on first use.

The source is compiled with the machine's C++ compiler (``$CXX``, default ``g++``, the one the
CUDA emulator uses) for the machine's own instruction set (``-O3 -march=native``; another
with ``GPUNET_CPU_ARCH``, e.g. ``haswell`` for AVX2 only), and kept in
``$GPUNET_CACHE_DIR/cpu`` (else ``~/.cache/gpunet/cpu``) under a hash of the source, the
compiler, its flags and the CPU's flags, so that a home folder shared by different machines
holds one library for each. :func:`library` is None, and the CPU device keeps its NumPy code,
where there is no compiler, the build fails, or ``GPUNET_CPU_NATIVE=0``; float64 always takes
the NumPy code, the reference every other device is tested against.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

#: -fno-trapping-math: nothing reads floating-point exception flags, and without it GCC
#: would not turn the selects of tanh and ReLU into vector blends for AVX2 (the LSTM cell
#: built for haswell: 241 -> 32 us)
FLAGS = ("-O3", "-fno-trapping-math", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC",
         "-fvisibility=hidden", "-pthread")


def _arch_flag() -> str:
    """``-march=$GPUNET_CPU_ARCH``, default ``native`` (``gpunet bench --isa avx2`` builds for
    ``haswell`` to compare on a machine with AVX-512 as on one without)."""
    return f"-march={os.environ.get('GPUNET_CPU_ARCH', '').strip() or 'native'}"
_I64 = ctypes.c_int64
_P = ctypes.c_void_p
#: each function's argument types (pointers as void*: arrays pass their .ctypes.data)
SIGNATURES: dict[str, tuple[Any, ...]] = {
    # every loop over the whole batch, its last argument the number of threads to share it
    "relu_mt": (_P, _P, _I64, _I64),
    "relu_backward_mt": (_P, _P, _P, _I64, _I64),
    "channel_sum_mt": (_P, _I64, _I64, _I64, _P, _I64),
    "channel_sq_dev_mt": (_P, _I64, _I64, _I64, _P, _P, _I64),
    "batchnorm_sums_mt": (_P, _P, _I64, _I64, _I64, _P, _P, _I64),
    "batchnorm_apply_mt": (_P, _P, _I64, _I64, _I64, _P, _P, _P, _I64),
    "batchnorm_dx_mt": (_P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I64),
    "maxpool2x2_forward_mt": (_P, _P, _P, _I64, _I64, _I64, _I64),
    "maxpool_backward_mt": (_P, _P, _P, *(_I64,) * 11),
    "to_channel_major_mt": (_P, _P, *(_I64,) * 10),
    "from_channel_major_mt": (_P, _P, *(_I64,) * 6, _P, _I64),
    "conv_direct_forward_mt": (_P, _P, _P, _P, *(_I64,) * 10),
    "conv_direct_dweight_mt": (_P, _P, _P, *(_I64,) * 10),
    "conv_vec_forward_mt": (_P, _P, _P, _P, *(_I64,) * 10),
    "conv_vec_dweight_mt": (_P, _P, _P, *(_I64,) * 10),
    "uncolumns_mt": (_P, _P, *(_I64,) * 9),
    "sgd_update_mt": (_P, _P, _P, _I64, ctypes.c_float, ctypes.c_float, ctypes.c_float, _I64,
                      _I64),
    "lstm_cell_forward_mt": (_P, _P, _P, _P, _P, _P, _I64, _I64, _I64),
    "lstm_cell_backward_mt": (_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64),
    "gemm_mt": (_P, *(_I64,) * 6, _P, _I64, _P, _I64, ctypes.c_double, _P, _I64, _I64),
    "pack_b_mt": (_P, *(_I64,) * 4, _P, _I64),
    "gemm_packed_mt": (_P, _I64, _P, _I64, _I64, _I64, _P, *(_I64,) * 3),
    "correlate_mt": (_P, _I64, _P, *(_I64,) * 5, _P, _I64, _I64),
    "conv_dweight_mt": (_P, _I64, _P, *(_I64,) * 7, _P, _I64),
    "lstm_sequence_forward_mt": (_P, _P, _P, _P, _P, *(_I64,) * 5),
    "lstm_sequence_backward_mt": (*(_P,) * 9, *(_I64,) * 5),
    "pool_start": (_I64, _P),
    "packed_panel": (),
    "correlate_spare": (),
}
#: the functions that return a value, and its type
RETURNS: dict[str, Any] = {"packed_panel": _I64, "correlate_spare": _I64}

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _source() -> Path:
    from ..kernels import kernel_dir
    return kernel_dir() / "cpu.cpp"


def cache_dir() -> Path:
    root = os.environ.get("GPUNET_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "gpunet") / "cpu"


def check_arch() -> None:
    """:exc:`DeviceError` if ``$GPUNET_CPU_ARCH`` is set to a name the compiler does not take
    for ``-march`` (checked when the CPU device is made, once per value: a bad name would
    otherwise fail the build and leave the NumPy code running without a word)."""
    from ..errors import DeviceError
    arch = os.environ.get("GPUNET_CPU_ARCH", "").strip()
    cxx = os.environ.get("CXX", "g++")
    if (not arch or os.environ.get("GPUNET_CPU_NATIVE", "").strip() == "0"
            or shutil.which(cxx) is None):
        return
    checked = _state.setdefault("arch_ok", {})
    if arch not in checked:
        done = subprocess.run([cxx, f"-march={arch}", "-x", "c++", "-E", "-o", os.devnull,
                               os.devnull], capture_output=True, text=True)
        checked[arch] = done.returncode == 0
    if not checked[arch]:
        raise DeviceError(f"GPUNET_CPU_ARCH must be an architecture {cxx} takes for -march "
                          f"(native, haswell, skylake-avx512, znver3, ...), got {arch!r}")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _build() -> tuple[Any, str]:
    """The loaded library, or None and why not."""
    if os.environ.get("GPUNET_CPU_NATIVE", "").strip() == "0":
        return None, "GPUNET_CPU_NATIVE=0"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler {cxx!r} (install g++ or set CXX)"
    source = _source().read_bytes()
    version = subprocess.run([cxx, "-dumpfullversion", "-dumpmachine"], capture_output=True,
                             text=True).stdout
    flags = (*FLAGS, _arch_flag())
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:24]
    target = cache_dir() / f"cpu-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run([cxx, *flags, "-o", str(out), str(_source())],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                return None, f"{cxx} failed on {_source().name}: {done.stderr.strip()[-500:]}"
            os.replace(out, target)  # atomic: another process never loads half a file
    lib = ctypes.CDLL(str(target))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(argtypes), RETURNS.get(name)
    from . import blas
    from .. import threads
    local = None if blas.BLAS is None else blas.BLAS.local_threads
    lib.pool_start(threads.env_maximum(), None if local is None
                   else ctypes.cast(local, ctypes.c_void_p).value)
    if local is not None:
        # openblas_set_num_threads_local acts on the whole process in the OpenBLAS NumPy
        # ships (measured: a worker's call made the main thread's GEMMs single-threaded):
        # NumPy's BLAS is on one thread from here on, and gpunet's pool runs its GEMMs
        local(1)
        threads.pin_blas()
    return lib, str(target)


def library() -> Any:
    """The compiled library (its functions as in :data:`SIGNATURES`), or None; built and
    loaded once per process, at the first call."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"], _state["why"] = _build()
                except OSError as e:  # an unwritable cache, a library that will not load
                    _state["lib"], _state["why"] = None, f"{type(e).__name__}: {e}"
    return _state["lib"]


def gemm_kernels() -> bool:
    """Whether the library's GEMM-shaped kernels (the packed GEMM, the stride-1 correlation
    and the convolution's weight gradient) agree with NumPy, checked once per process on
    small problems with every kind of tail, as :mod:`.blas` checks its CBLAS calls: their
    register blocks differ with the ISA the library was built for (AVX2, AVX-512, SSE), and
    a variant may be running for the first time. Where they disagree the CPU device keeps
    NumPy's BLAS for that work."""
    if "gemm_ok" not in _state:
        lib = library()
        _state["gemm_ok"] = lib is not None and _gemm_kernels_agree(lib)
    return _state["gemm_ok"]


def _gemm_kernels_agree(lib: Any) -> bool:
    g = np.random.default_rng(0)

    def f32(*shape: int) -> np.ndarray:
        return g.standard_normal(shape).astype(np.float32)

    def close(got: np.ndarray, want: np.ndarray, terms: int) -> bool:
        return bool(np.allclose(got, want, rtol=1e-4, atol=1e-4 * terms))
    panel = lib.packed_panel()
    # a GEMM with row, panel and K-slice tails: 13 rows (blocks of 6 or 12), 37 columns
    # (panels of 16 or 32), K 300 (slices of 256 or 128), B packed from its transpose
    m, k, n = 13, 300, 37
    a, b = f32(m, k), f32(k, n)
    bt = np.ascontiguousarray(b.T)
    packed = np.empty(-(-n // panel) * panel * k, np.float32)
    lib.pack_b_mt(bt.ctypes.data, k, 1, k, n, packed.ctypes.data, 1)
    c = np.full((m, n), np.nan, np.float32)
    lib.gemm_packed_mt(a.ctypes.data, k, packed.ctypes.data, m, n, k, c.ctypes.data, n, 0, 1)
    if not close(c, a.astype(np.float64) @ b, k):
        return False
    # a 3x3 correlation of 9 channels into 13 over 101 pixels (blocks of 6 or 8 channels x
    # 16 or 48 pixels), and its weight gradient
    o, ch, wp, length = 13, 9, 11, 101
    x = f32(ch, length + 2 * wp + 2 + lib.correlate_spare())
    w = f32(o, ch, 3, 3)
    shifted = np.stack([x[:, i * wp + j:i * wp + j + length] for i in range(3) for j in range(3)])
    wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    out = np.full((o, length), np.nan, np.float32)
    lib.correlate_mt(x.ctypes.data, x.shape[1], wt.ctypes.data, o, ch, 3, 3, wp, out.ctypes.data,
                     length, 1)
    want = np.einsum("ocij,ijcp->op", w.astype(np.float64), shifted.reshape(3, 3, ch, length))
    if not close(out, want, 9 * ch):
        return False
    dy = f32(o, length)
    dwt = np.full((ch * 9, o), np.nan, np.float32)
    lib.conv_dweight_mt(x.ctypes.data, x.shape[1], dy.ctypes.data, length, o, ch, 3, 3, wp,
                        length, dwt.ctypes.data, 1)
    want = np.einsum("ijcp,op->cijo", shifted.reshape(3, 3, ch, length).astype(np.float64), dy)
    return close(dwt, want.reshape(ch * 9, o), length)


def status() -> str:
    """Where the library was loaded from, or why the NumPy code runs instead."""
    return f"compiled ({_state['why']})" if library() is not None else f"NumPy ({_state['why']})"


def usable(*arrays: np.ndarray) -> bool:
    """Whether the compiled loops take these arrays: float32, C-contiguous, and a library."""
    return (all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
            and library() is not None)
