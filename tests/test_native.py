"""The CPU device's compiled float32 loops (kernels/cpu.cpp through gpunet.backends.native)
against its NumPy code, which float64 and machines without a compiler run; the switches and the
fallback when the build fails."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from gpunet.backends import Backend, CpuBackend, native

R = np.random.default_rng(11)
needs_native = pytest.mark.skipif(native.library() is None,
                                  reason=f"no compiled CPU loops here: {native.status()}")


@pytest.fixture
def both(monkeypatch):
    """``(compiled, numpy)``: the CPU device with its compiled loops, and a function that runs
    a call with them turned off."""
    cpu = CpuBackend(np, "cpu-test")

    def numpy_only(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(native, "library", lambda: None)
            return fn(*args)
    return cpu, numpy_only


def f32(*shape):
    return R.normal(size=shape).astype(np.float32)


@needs_native
@pytest.mark.parametrize("shape", [(64, 32, 16, 16), (300, 7), (3, 5, 2, 3), (3, 1)])
def test_batchnorm_and_relu_loops_match_numpy(both, shape):
    cpu, numpy_only = both
    x, dy = f32(*shape) * 3 + 1, f32(*shape)
    x.reshape(-1)[:3] = [0.0, -0.0, np.nan]  # ReLU's edges: zero and NaN
    c = shape[1]
    mean, scale, shift, k = f32(c), f32(c), f32(c), f32(c)
    for name, args in [("relu", (x,)), ("backprop_relu", (dy, x)), ("channel_sum", (dy,)),
                       ("channel_sq_dev", (dy, mean)), ("batchnorm_apply", (dy, mean, scale, shift)),
                       ("_batchnorm_sums", (dy, dy * 2, mean)),
                       ("_batchnorm_dx", (dy, dy * 2, mean, k, scale, shift))]:
        got, want = getattr(cpu, name)(*args), numpy_only(getattr(cpu, name), *args)
        for g, w in zip(got if isinstance(got, tuple) else [got],
                        want if isinstance(want, tuple) else [want]):
            assert g.dtype == np.float32 and g.shape == w.shape, name
            scale_of = max(1.0, float(np.nanmax(np.abs(w))))
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale_of, err_msg=name)


@needs_native
def test_relu_backward_is_zero_where_x_is_not_positive_even_for_inf_dy(both):
    """As PyTorch's threshold_backward: dy passes where x > 0, else 0 (never 0 * inf)."""
    cpu, _ = both
    x = np.array([[1.0, 0.0, -1.0, np.nan]], np.float32)
    dy = np.array([[np.inf, np.inf, np.nan, 5.0]], np.float32)
    np.testing.assert_array_equal(cpu.backprop_relu(dy, x), [[np.inf, 0, 0, 0]])
    np.testing.assert_array_equal(cpu.relu(x), [[1, 0, 0, np.nan]])


@needs_native
def test_lstm_cell_loops_match_numpy(both):
    cpu, numpy_only = both
    n, hid = 5, 33
    xg, hg, c_prev = f32(n, 4 * hid) * 4, f32(n, 4 * hid), f32(n, hid)
    outs = [np.empty((n, 4 * hid), np.float32), np.empty((n, hid), np.float32),
            np.empty((n, hid), np.float32)]
    refs = [np.empty_like(o) for o in outs]
    cpu.lstm_cell_forward(xg, hg, c_prev, *outs)
    Backend.lstm_cell_forward(cpu, xg, hg, c_prev, *refs)
    for g, w in zip(outs, refs):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6)
    dy, dh, dc = f32(n, hid), f32(n, hid), f32(n, hid)
    got = [np.empty((n, 4 * hid), np.float32), np.empty((n, hid), np.float32)]
    want = [np.empty_like(g) for g in got]
    cpu.lstm_cell_backward(dy, dh, dc, refs[0], c_prev, refs[1], *got)
    Backend.lstm_cell_backward(cpu, dy, dh, dc, refs[0], c_prev, refs[1], *want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@needs_native
def test_tanh_of_the_loops_is_within_a_few_ulp_and_saturates():
    """The rational tanh the loops use, through the LSTM's g gate: tanh(z) = acts[:, 2H:3H]."""
    cpu = CpuBackend(np, "cpu-test")
    z = np.concatenate([np.linspace(-12, 12, 4001), [-1e30, 1e30, 1e-6, -1e-6, 0.0]])
    hid = len(z)
    xg = np.zeros((1, 4 * hid), np.float32)
    xg[0, 2 * hid:3 * hid] = z
    acts = np.empty((1, 4 * hid), np.float32)
    cpu.lstm_cell_forward(xg, np.zeros_like(xg), np.zeros((1, hid), np.float32), acts,
                          np.empty((1, hid), np.float32), np.empty((1, hid), np.float32))
    g = acts[0, 2 * hid:3 * hid].astype(np.float64)
    np.testing.assert_allclose(g, np.tanh(z.astype(np.float32).astype(np.float64)), rtol=5e-7,
                               atol=2e-7)
    assert np.all(np.abs(g) <= 1.0)


@needs_native
def test_channel_major_copies_match_numpy(both):
    cpu, numpy_only = both
    x = f32(3, 4, 5, 6)
    got = cpu._channel_major("a", x, (1, 2), (8, 11), 7).copy()
    want = numpy_only(cpu._channel_major, "b", x, (1, 2), (8, 11), 7)
    np.testing.assert_array_equal(got, want)
    out = f32(4, 3 * 8 * 11)
    y1, y2 = np.empty((3, 4, 5, 6), np.float32), np.empty((3, 4, 5, 6), np.float32)
    bias = f32(4)
    cpu._from_channel_major(out, (8, 11), y1, bias)
    numpy_only(cpu._from_channel_major, out, (8, 11), y2, bias)
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)


def test_float64_and_strided_arrays_take_the_numpy_code():
    x = np.ones((4, 4))
    assert not native.usable(x)
    assert not native.usable(np.ones((4, 8), np.float32)[:, ::2])


def _status_in_child(**env):
    code = "from gpunet.backends import native; print(native.status())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_switch_and_a_failed_build_fall_back_to_numpy(tmp_path):
    assert _status_in_child(GPUNET_CPU_NATIVE="0") == "NumPy (GPUNET_CPU_NATIVE=0)"
    status = _status_in_child(CXX="gpunet-no-such-compiler")
    assert status.startswith("NumPy (no C++ compiler 'gpunet-no-such-compiler'")
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'g++: internal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    status = _status_in_child(CXX=str(broken), GPUNET_CACHE_DIR=str(tmp_path / "cache"))
    assert status.startswith(f"NumPy ({broken} failed on cpu.cpp"), status


@needs_native
def test_the_library_is_cached_by_source_compiler_and_cpu(tmp_path):
    status = _status_in_child(GPUNET_CACHE_DIR=str(tmp_path))
    built = list((tmp_path / "cpu").glob("cpu-*.so"))
    assert len(built) == 1 and status == f"compiled ({built[0]})"
    assert _status_in_child(GPUNET_CACHE_DIR=str(tmp_path)) == status  # reused, not rebuilt


@needs_native
@pytest.mark.parametrize("momentum, weight_decay, nesterov", [(0.0, 0.0, False), (0.9, 0.0, False),
                                                              (0.9, 1e-2, True), (0.0, 1e-3, False)])
def test_sgd_step_loop_matches_numpy(momentum, weight_decay, nesterov):
    cpu = CpuBackend(np, "cpu-test")
    w, g = f32(7, 33), f32(7, 33)
    buf = f32(7, 33) if momentum else None
    w2, buf2 = w.copy(), None if buf is None else buf.copy()
    for _ in range(3):
        cpu.sgd_update(w, g, buf, 0.05, momentum, weight_decay, nesterov)
        Backend.sgd_update(cpu, w2, g, buf2, 0.05, momentum, weight_decay, nesterov)
    np.testing.assert_allclose(w, w2, rtol=1e-6, atol=1e-6)
    if buf is not None:
        np.testing.assert_allclose(buf, buf2, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((4, 6, 28, 28), (2, 2), (2, 2), (0, 0)), ((2, 3, 7, 9), (2, 2), (2, 2), (0, 0)),
    ((2, 3, 7, 9), (3, 3), (2, 2), (1, 1)),
    ((2, 2, 6, 5), (3, 2), (1, 1), (1, 0)), ((1, 2, 5, 5), (1, 1), (1, 1), (0, 0))])
def test_maxpool_loops_match_numpy(both, shape, kernel, stride, padding):
    """Overlapping windows, padding and ties (a rounded input has many): the same maxima, the
    same first-maximum offsets, and the gradients of shared maxima summed."""
    cpu, numpy_only = both
    x = np.round(f32(*shape) * 2) / 2
    y, index = cpu.maxpool2d(x, kernel, stride, padding)
    y_ref, index_ref = numpy_only(cpu.maxpool2d, x, kernel, stride, padding)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(index, index_ref)
    dy = f32(*y.shape)
    np.testing.assert_allclose(cpu.backprop_maxpool2d(dy, index, shape, kernel, stride, padding),
                               numpy_only(cpu.backprop_maxpool2d, dy, index_ref, shape, kernel,
                                          stride, padding), rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-4), (np.float64, 1e-12)])
@pytest.mark.parametrize("m, k, n", [(300, 70, 90), (90, 70, 300), (1, 5, 1), (128, 784, 512)])
def test_gemm_on_gpunets_threads_matches_matmul(dtype, tol, m, k, n):
    """Rows or columns cut among threads (a low threshold forces it), operands contiguous,
    transposed views or neither (copied)."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.GEMM_PARALLEL_MIN, cpu.threads = 1, 2
    a, b = R.normal(size=(m, k)).astype(dtype), R.normal(size=(k, n)).astype(dtype)
    want = a @ b
    for lhs, ta in ((a, False), (np.ascontiguousarray(a.T), True), (a.T.copy().T, False)):
        for rhs, tb in ((b, False), (np.ascontiguousarray(b.T), True),
                        (np.asfortranarray(b), False)):
            got = cpu.gemm(lhs, rhs, trans_a=ta, trans_b=tb)
            assert got.dtype == dtype and got.shape == (m, n)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * k)
    strided = np.repeat(a, 2, axis=1)[:, ::2]  # neither rows nor columns contiguous: copied
    np.testing.assert_allclose(cpu.gemm(strided, b), want, rtol=tol, atol=tol * k)


@needs_native
def test_a_forked_child_runs_the_loops_on_its_own_thread():
    """The pool's workers do not survive fork(): a child must not wait for them."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.threads = 2
    x = f32(512, 256)
    cpu.relu(x)  # the pool has started in this process
    code = os.fork()
    if code == 0:  # the child: exit 0 if the loop finishes and is right
        ok = np.array_equal(cpu.relu(x), np.maximum(x, 0))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(code, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@needs_native
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-4), (np.float64, 1e-12)])
def test_gemm_acc_adds_into_its_output(dtype, tol):
    """A weight gradient added in place by one GEMM with beta = 1, cut among threads."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.GEMM_PARALLEL_MIN, cpu.threads = 1, 2
    dy, x = R.normal(size=(64, 30)).astype(dtype), R.normal(size=(64, 50)).astype(dtype)
    grad = R.normal(size=(30, 50)).astype(dtype)
    want = grad + dy.T @ x
    cpu.gemm_acc(grad, dy, x, trans_a=True)
    np.testing.assert_allclose(grad, want, rtol=tol, atol=tol * 64)
    with pytest.raises(ValueError, match=r"gemm_acc: the product is \(30, 50\), out is \(50, 30\)"):
        cpu.gemm_acc(np.zeros((50, 30), dtype), dy, x, trans_a=True)
    strided = np.zeros((30, 100), dtype)[:, ::2]  # not contiguous: the generic add
    cpu.gemm_acc(strided, dy, x, trans_a=True)
    np.testing.assert_allclose(strided, dy.T @ x, rtol=tol, atol=tol * 64)


@needs_native
def test_gpunet_cpu_arch_builds_a_library_of_its_own(tmp_path):
    """GPUNET_CPU_ARCH=haswell (gpunet bench --isa avx2) builds without AVX-512, apart from
    the native build in the cache, and its loops give the same results."""
    native_build = _status_in_child(GPUNET_CACHE_DIR=str(tmp_path))
    haswell = _status_in_child(GPUNET_CACHE_DIR=str(tmp_path), GPUNET_CPU_ARCH="haswell")
    assert haswell.startswith("compiled (") and haswell != native_build
    assert len(list((tmp_path / "cpu").glob("cpu-*.so"))) == 2


@needs_native
def test_the_pool_pins_numpys_blas_to_one_thread_and_the_policy_leaves_it():
    """The compiled pool cuts gpunet's GEMMs itself: NumPy's OpenBLAS stays on one thread,
    whatever the policy picks later (set_num_threads included)."""
    code = ("import numpy as np, gpunet, threadpoolctl\n"
            "from gpunet.backends import native, blas\n"
            "assert native.library() is not None and blas.BLAS.local_threads is not None\n"
            "gpunet.set_num_threads(2)\n"
            "print([p['num_threads'] for p in threadpoolctl.threadpool_info()"
            " if p['internal_api'] == 'openblas'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "GPUNET_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    assert set(eval(out.stdout.strip())) == {1}


@needs_native
def test_gemm_refuses_operands_whose_inner_dimensions_differ():
    """The pool's BLAS calls would read past an operand: refused before, as matmul does."""
    cpu = CpuBackend(np, "cpu-test")
    with pytest.raises(ValueError, match=r"gemm: op\(a\) is \(4, 3\) and op\(b\) \(5, 2\): "
                                         "their inner dimensions differ"):
        cpu.gemm(f32(4, 3), f32(5, 2))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        cpu.gemm_acc(np.zeros((3, 2), np.float32), f32(4, 3), f32(5, 2), trans_a=True)


@needs_native
@pytest.mark.parametrize("m, k, n", [(32, 256, 1024), (32, 1024, 256), (37, 100, 70),
                                     (1, 1, 33), (5, 3, 1), (13, 600, 17)])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_gemm_matches_matmul(m, k, n, threads):
    """Every row-block and panel tail (panels of 16 or 32 columns, rows in blocks of 6 or 12,
    K in slices of 256), the right operand packed from a matrix or a transposed view, the
    product written into a new array or into ``out``; cut into panels among threads."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.GEMM_PARALLEL_MIN, cpu.threads = 1, threads
    a, b = f32(m, k), f32(k, n)
    want = a.astype(np.float64) @ b
    for rhs in (b, np.ascontiguousarray(b.T).T):
        packed = cpu.pack(rhs)
        assert (packed.k, packed.n) == (k, n)
        assert packed.data.size == -(-n // native.library().packed_panel()) * native.library(
        ).packed_panel() * k
        np.testing.assert_allclose(cpu.gemm_packed(a, packed), want, rtol=1e-5, atol=1e-5 * k)
        out = np.full((m, n), np.nan, np.float32)
        assert cpu.gemm_packed(a, packed, out=out) is out
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * k)
    strided = np.repeat(a, 2, axis=1)[:, ::2]  # rows not contiguous: copied first
    np.testing.assert_allclose(cpu.gemm_packed(strided, cpu.pack(b)), want, rtol=1e-5,
                               atol=1e-5 * k)


@needs_native
def test_packed_gemm_refuses_bad_operands_and_float64_stays_numpy():
    cpu = CpuBackend(np, "cpu-test")
    packed = cpu.pack(f32(4, 6))
    with pytest.raises(ValueError, match=r"gemm_packed: a is \(3, 5\) and the packed matrix "
                                         r"\(4, 6\): their inner dimensions differ"):
        cpu.gemm_packed(f32(3, 5), packed)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float32 \(3, 6\) array, "
                                         r"got float32 \(6, 3\)"):
        cpu.gemm_packed(f32(3, 4), packed, out=np.empty((6, 3), np.float32))
    b64 = R.normal(size=(4, 6)).T  # float64: a contiguous copy, multiplied by NumPy's BLAS
    packed64 = cpu.pack(b64)
    assert isinstance(packed64, np.ndarray) and packed64.flags.c_contiguous
    a64 = R.normal(size=(2, 6))
    np.testing.assert_allclose(cpu.gemm_packed(a64, packed64), a64 @ b64, rtol=1e-12)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_lstm_sequence_in_one_compiled_call_matches_the_step_loop(threads):
    """The CPU's compiled recurrence against Backend's loop of gemm_packed and the cell
    (which float64 and the other devices run), forward and backward."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.GEMM_PARALLEL_MIN, cpu.NATIVE_PARALLEL_MIN, cpu.threads = 1, 1, threads
    steps, n, hid = 7, 5, 20
    xg, w_h = f32(steps, n, 4 * hid), f32(4 * hid, hid) * 0.3

    def forward(run):
        hs, cs = np.empty((steps + 1, n, hid), np.float32), np.empty((steps + 1, n, hid),
                                                                     np.float32)
        hs[0], cs[0] = 0.5, -0.25
        acts = np.empty((steps, n, 4 * hid), np.float32)
        run(xg, cpu.pack(w_h.T), hs, cs, acts)
        return hs, cs, acts
    got, want = forward(cpu.lstm_sequence_forward), forward(
        lambda *a: Backend.lstm_sequence_forward(cpu, *a))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    _, cs, acts = want
    dy, dh_t, dc_t = f32(steps, n, hid), f32(n, hid), f32(n, hid)
    kept = dh_t.copy(), dc_t.copy()

    def backward(run):
        dz = np.empty((steps, n, 4 * hid), np.float32)
        return (*run(dy, dh_t, dc_t, acts, cs, cpu.pack(w_h), dz), dz)
    got, want = backward(cpu.lstm_sequence_backward), backward(
        lambda *a: Backend.lstm_sequence_backward(cpu, *a))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(dh_t, kept[0])  # the final state's gradients only read
    np.testing.assert_array_equal(dc_t, kept[1])


@needs_native
@pytest.mark.parametrize("o, c, kh, kw, wp, length", [
    (32, 32, 3, 3, 34, 3 * 34 * 34), (7, 9, 3, 3, 12, 100), (13, 8, 5, 5, 20, 391),
    (1, 8, 1, 3, 9, 5), (25, 16, 2, 1, 7, 48)])
def test_compiled_correlation_matches_the_gemm_per_tap(both, o, c, kh, kw, wp, length):
    """The shifted convolution's correlation (forward and input gradient of stride-1
    convolutions) in one compiled call against one BLAS GEMM per tap: output-channel tails of
    every size, a last block of pixels cut short, taps of other shapes."""
    cpu, numpy_only = both
    cpu.NATIVE_PARALLEL_MIN, cpu.threads = 1, 2
    spare = native.library().correlate_spare()
    xc = f32(c, length + (kh - 1) * wp + kw - 1 + spare)
    weight = f32(o, c, kh, kw)
    got, want = np.full((o, length), np.nan, np.float32), np.empty((o, length), np.float32)
    cpu._correlate(xc, cpu._taps(weight), wp, got)
    numpy_only(cpu._correlate, xc, cpu._taps(weight), wp, want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * c * kh * kw)


@needs_native
@pytest.mark.parametrize("o, c, kh, kw, wp, length", [
    (32, 32, 3, 3, 34, 3 * 34 * 34), (7, 9, 3, 3, 12, 100), (13, 8, 5, 5, 20, 391),
    (1, 8, 1, 3, 9, 5), (2, 3, 2, 1, 7, 47)])
def test_compiled_weight_gradient_matches_the_column_gemm(o, c, kh, kw, wp, length):
    """The shifted convolution's weight gradient (C kh kw, O) in one compiled call against
    the column matrix and one BLAS GEMM per run: row and column tiles cut short, a run of
    pixels that is no multiple of a vector, dy read from a view with rows further apart."""
    cpu = CpuBackend(np, "cpu-test")
    cpu.NATIVE_PARALLEL_MIN, cpu.threads = 1, 2
    xc = f32(c, length + (kh - 1) * wp + kw - 1)
    dyc = f32(o, length + 5)[:, 3:3 + length]
    got = np.empty((c * kh * kw, o), np.float32)
    native.library().conv_dweight_mt(xc.ctypes.data, xc.shape[1], dyc.ctypes.data,
                                     dyc.strides[0] // 4, o, c, kh, kw, wp, length,
                                     got.ctypes.data, 2)
    want = cpu._dweight_columns(xc, dyc, f32(o, c, kh, kw), wp, length)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(length))


@needs_native
def test_compiled_recurrence_refuses_shapes_that_do_not_match():
    """Raw pointers read whatever they are given: a W_h packed the wrong way round, or a
    buffer of the wrong shape, is refused before the call."""
    cpu = CpuBackend(np, "cpu-test")
    steps, n, hid = 3, 2, 16
    xg, acts = f32(steps, n, 4 * hid), np.empty((steps, n, 4 * hid), np.float32)
    hs, cs = np.zeros((steps + 1, n, hid), np.float32), np.zeros((steps + 1, n, hid), np.float32)
    w_h = f32(4 * hid, hid)
    with pytest.raises(ValueError, match=r"lstm_sequence_forward: the packed W_h is \(64, 16\), "
                                         r"expected \(16, 64\)"):
        cpu.lstm_sequence_forward(xg, cpu.pack(w_h), hs, cs, acts)
    with pytest.raises(ValueError, match=r"lstm_sequence_forward: hs is \(3, 2, 16\), "
                                         r"expected \(4, 2, 16\)"):
        cpu.lstm_sequence_forward(xg, cpu.pack(w_h.T), hs[:steps], cs, acts)
    dz = np.empty((steps, n, 4 * hid), np.float32)
    with pytest.raises(ValueError, match=r"lstm_sequence_backward: dh is \(2, 8\), "
                                         r"expected \(2, 16\)"):
        cpu.lstm_sequence_backward(f32(steps, n, hid), f32(n, 8), f32(n, hid), acts, cs,
                                   cpu.pack(w_h), dz)


@needs_native
def test_packed_gemm_refuses_float64_and_an_output_that_overlaps_a():
    cpu = CpuBackend(np, "cpu-test")
    packed = cpu.pack(f32(6, 6))
    with pytest.raises(ValueError, match="gemm_packed: a must be float32 like the packed "
                                         "matrix, got float64"):
        cpu.gemm_packed(R.normal(size=(2, 6)), packed)
    a = f32(4, 6)
    with pytest.raises(ValueError, match="gemm_packed: out overlaps a"):
        cpu.gemm_packed(a, packed, out=a)
    assert cpu.gemm_packed(a, packed) is not a  # PackedMatrix compares by identity
    assert packed == packed and packed != cpu.pack(f32(6, 6))


@needs_native
def test_the_gemm_kernels_are_checked_against_numpy_and_skipped_when_they_disagree(
        monkeypatch):
    """The GEMM-shaped kernels' register blocks differ per ISA and a variant may run for the
    first time on a user's machine: checked once against NumPy, and where one is wrong the
    CPU device keeps NumPy's BLAS for packing, correlation and weight gradient."""
    assert native.gemm_kernels()
    lib = native.library()

    class Broken:  # the real library with one kernel off by a little
        def __getattr__(self, name):
            return getattr(lib, name)

        @staticmethod
        def correlate_mt(x, ldx, wt, o, c, kh, kw, wp, out, length, threads):
            lib.correlate_mt(x, ldx, wt, o, c, kh, kw, wp, out, length, threads)
            np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_float)),
                                  (o * length,))[-1] += 1.0
    assert not native._gemm_kernels_agree(Broken())
    monkeypatch.setitem(native._state, "gemm_ok", False)
    cpu = CpuBackend(np, "cpu-test")
    b = f32(8, 5)
    assert isinstance(cpu.pack(b), np.ndarray)  # not a PackedMatrix: NumPy's matmul
    x, w = f32(2, 8, 6, 6), f32(8, 8, 3, 3)
    y = cpu.conv2d(x, w, None, (1, 1), (1, 1))[0]  # nine BLAS GEMMs
    monkeypatch.setitem(native._state, "gemm_ok", True)
    np.testing.assert_allclose(y, cpu.conv2d(x, w, None, (1, 1), (1, 1))[0], rtol=1e-4,
                               atol=1e-4)


def test_a_bad_gpunet_cpu_arch_is_refused_when_the_device_is_made(monkeypatch):
    """A name the compiler does not take for -march would fail the build and leave the NumPy
    code running without a word: refused at once, naming the variable and the value."""
    from gpunet.errors import DeviceError
    if native.shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler: the library is not built, nothing to refuse")
    monkeypatch.setenv("GPUNET_CPU_ARCH", "no-such-cpu")
    with pytest.raises(DeviceError, match="GPUNET_CPU_ARCH must be an architecture .* takes "
                                          "for -march .*, got 'no-such-cpu'"):
        CpuBackend(np, "cpu-bad-arch")
    monkeypatch.setenv("GPUNET_CPU_ARCH", "haswell")
    CpuBackend(np, "cpu-haswell")  # a real one passes
