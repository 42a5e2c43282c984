"""gpunet.threads: the free-core count from two load samples, set_num_threads / get_num_threads
on NumPy's BLAS and the CPU device's pool, the environment variables, and the adaptive policy
against a real busy neighbour process."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import gpunet
from gpunet import threads
from gpunet.backends import CpuBackend
from gpunet.errors import DeviceError


def blas_threads() -> list[int]:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas"]


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch):
    """Each test starts from the environment's policy and leaves the BLAS as it found it."""
    for var in ("GPUNET_NUM_THREADS", "GPUNET_THREAD_POLICY"):
        monkeypatch.delenv(var, raising=False)
    try:
        import threadpoolctl
        before = threadpoolctl.ThreadpoolController().select(user_api="blas")
        counts = [lib["num_threads"] for lib in before.info()]
    except ImportError:
        before, counts = None, []
    threads.reset()
    yield
    threads.reset()
    # once gpunet's compiled pool has pinned NumPy's BLAS to one thread (an earlier test may
    # have started it), putting the count back would undo the pin under the pool's GEMMs
    if before is not None and counts and not threads._blas_pinned:
        before.limit(limits=max(counts))


def S(wall: float, busy: float, own: float) -> threads.Sample:
    return threads.Sample(wall, busy, own)


# -- free cores from two samples ---------------------------------------------------------------
@pytest.mark.parametrize("allowed, busy, own, want", [
    (2, 2.0, 1.0, 1),   # a neighbour keeps one of two cores busy
    (2, 2.0, 2.0, 2),   # both cores busy, all of it ours (our BLAS threads spinning included)
    (2, 0.3, 0.0, 2),   # noise: a neighbour at 0.3 of a core takes none
    (4, 2.6, 0.0, 1),   # 2.6 cores of 4 busy with others' work: 3 taken
    (2, 5.0, 0.0, 1),   # more than everything busy: at least 1
    (8, 0.0, 0.0, 8),   # idle
    (2, 2.0, 1.5, 1),   # a neighbour sharing a core with one of ours gets about half of it
])
def test_free_cores_from_two_samples(allowed, busy, own, want):
    s0 = S(100.0, 50.0, 3.0)
    s1 = S(101.0, 50.0 + busy, 3.0 + own)  # one second later
    assert threads.free_cores(allowed, s0, s1) == want


def test_free_cores_scales_with_the_interval():
    assert threads.free_cores(2, S(0.0, 0.0, 0.0), S(0.5, 0.5, 0.0)) == 1  # 1 core over 0.5 s
    assert threads.free_cores(2, S(0.0, 0.0, 0.0), S(2.0, 0.5, 0.0)) == 2  # 0.25 core over 2 s
    assert threads.free_cores(2, S(1.0, 0.0, 0.0), S(1.0, 9.0, 0.0)) == 2  # no time passed


# -- set_num_threads / get_num_threads ---------------------------------------------------------
def test_set_num_threads_sets_the_blas_and_the_pool():
    blas_threads()  # skips without threadpoolctl
    gpunet.set_num_threads(1)
    assert gpunet.get_num_threads() == 1
    assert blas_threads() and set(blas_threads()) == {1}
    cpu = CpuBackend(np, "cpu-one")
    cpu.PARALLEL_MIN = 1
    assert len(cpu._parallel(np.zeros((6, 2)), lambda s: s)) == 1
    gpunet.set_num_threads(3)  # more than the pool had: it grows
    assert gpunet.get_num_threads() == 3
    assert [(s.start, s.stop) for s in cpu._parallel(np.zeros((6, 2)), lambda s: s)] == [
        (0, 2), (2, 4), (4, 6)]
    np.testing.assert_allclose(cpu.gemm(np.eye(3), np.ones((3, 2))), np.ones((3, 2)))


def test_set_num_threads_stops_the_adaptation(monkeypatch):
    gpunet.set_num_threads(2)
    monkeypatch.setattr(threads, "free_cores", lambda *a: pytest.fail("sampled"))
    for _ in range(3):
        assert threads.current() == 2


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", None, True, False])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match=r"set_num_threads expects an int >= 1, got "):
        gpunet.set_num_threads(bad)


def test_without_threadpoolctl_only_the_pool_follows(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import raises ImportError
    threads.reset()
    assert threads.current() >= 1
    gpunet.set_num_threads(1)
    assert gpunet.get_num_threads() == 1 and threads._policy.blas is None


# -- the environment ---------------------------------------------------------------------------
def test_bad_gpunet_num_threads_is_a_device_error(monkeypatch):
    monkeypatch.setenv("GPUNET_NUM_THREADS", "0")
    with pytest.raises(DeviceError, match="GPUNET_NUM_THREADS must be a positive integer"):
        CpuBackend(np, "cpu-bad")
    with pytest.raises(DeviceError, match="GPUNET_NUM_THREADS must be a positive integer"):
        threads.current()


def test_bad_policy_is_a_device_error(monkeypatch):
    monkeypatch.setenv("GPUNET_THREAD_POLICY", "sometimes")
    with pytest.raises(DeviceError, match="GPUNET_THREAD_POLICY must be one of adaptive, fixed"):
        threads.current()


def test_gpunet_num_threads_is_the_maximum(monkeypatch):
    monkeypatch.setenv("GPUNET_NUM_THREADS", "1")
    assert threads.current() == 1
    if blas_threads():
        assert set(blas_threads()) == {1}


def test_the_fixed_policy_uses_the_maximum_whatever_the_load(monkeypatch):
    monkeypatch.setenv("GPUNET_NUM_THREADS", "3")
    monkeypatch.setenv("GPUNET_THREAD_POLICY", "fixed")
    monkeypatch.setattr(threads, "free_cores", lambda *a: pytest.fail("sampled"))
    assert [threads.current() for _ in range(3)] == [3, 3, 3]
    monkeypatch.setattr(threads._policy, "read", lambda: pytest.fail("read the load"))
    threads._next = float("-inf")  # even if asked to sample
    assert threads._update() == 3


def test_without_proc_stat_the_count_is_the_maximum(monkeypatch):
    monkeypatch.setenv("GPUNET_NUM_THREADS", "2")
    assert threads.current() == 2
    monkeypatch.setattr(threads._policy, "read", lambda: None)
    threads._next = float("-inf")
    assert threads.current() == 2 and threads._next == float("inf")


def test_the_blas_is_never_raised_above_what_the_user_asked():
    """With OPENBLAS_NUM_THREADS set, the BLAS's maximum is its count at start."""
    blas_threads()
    code = ("import time, gpunet, threadpoolctl; from gpunet import threads\n"
            "threads.current(); p = threads._policy\n"
            "print(p.blas_max, p.maximum, threadpoolctl.threadpool_info()[0]['num_threads'])")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "GPUNET_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out == ["1", "2", "1"]


# -- the adaptive policy against a real neighbour ----------------------------------------------
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/stat"),
                    reason="needs Linux (sched_setaffinity and /proc/stat)")
def test_a_busy_neighbour_takes_a_core():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"needs 2 CPUs to leave one to a neighbour, this process may use {len(cpus)}")
    code = f"import os; os.sched_setaffinity(0, {{{cpus[0]}}})\nwhile True: pass"
    neighbour = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert threads.current() == len(cpus)  # the first call takes a baseline
        seen, deadline = [], time.monotonic() + 3.0
        while time.monotonic() < deadline and (not seen or seen[-1] >= len(cpus)):
            time.sleep(0.05)
            seen.append(threads.current())
        assert seen[-1] < len(cpus), f"the count stayed at {len(cpus)} for 3 s: {seen}"
    finally:
        neighbour.kill()
        neighbour.wait()


@pytest.mark.parametrize("var, value, message", [
    ("GPUNET_THREAD_POLICY", "bogus", "GPUNET_THREAD_POLICY must be one of adaptive, fixed, "
                                      "got 'bogus'"),
    ("GPUNET_NUM_THREADS", "x", "GPUNET_NUM_THREADS must be a positive integer, got 'x'"),
    ("GPUNET_CPU_ARCH", "bogus", "GPUNET_CPU_ARCH must be an architecture g++ takes for -march "
                                 "(native, haswell, skylake-avx512, znver3, ...), got 'bogus'"),
])
def test_a_bad_thread_variable_is_one_line_from_the_command_line(var, value, message):
    """Checked when the CPU device is made: the command line says what is wrong, not that
    the model does not fit the data (the dry run's message when the policy was read there)."""
    done = subprocess.run([sys.executable, "-m", "gpunet", "train", "mlp", "--data", "digits",
                           "--epochs", "1", "--no-progress"], capture_output=True, text=True,
                          env={**os.environ, var: value})
    assert done.returncode == 2
    assert done.stderr.strip() == f"gpunet train: error: {message}"


def test_the_second_sample_comes_sooner_than_the_later_ones(monkeypatch):
    """A short run adapts too: the first reading is a baseline, the second follows it after
    FIRST_INTERVAL (0.1 s), every later one after INTERVAL (0.5 s)."""
    monkeypatch.setenv("GPUNET_NUM_THREADS", "2")
    clock = [100.0]
    monkeypatch.setattr(threads, "_monotonic", lambda: clock[0])
    threads.current()
    readings = iter([S(100.0, 0.0, 0.0), S(100.1, 0.1, 0.0), S(100.6, 0.6, 0.0)])
    monkeypatch.setattr(threads._policy, "read", lambda: next(readings))
    threads._policy.sample, threads._next = None, float("-inf")
    assert threads.current() == 2 and threads._next == pytest.approx(100.0 + threads.FIRST_INTERVAL)
    clock[0] = 100.05
    assert threads.current() == 2  # not yet: no new reading
    clock[0] = 100.1  # a neighbour took all of one core over the first 0.1 s
    assert threads.current() == 1 and threads._next == pytest.approx(100.1 + threads.INTERVAL)
    clock[0] = 100.6
    assert threads.current() == 1 and threads._next == pytest.approx(100.6 + threads.INTERVAL)
