"""Data-parallel training under MPI: two ranks equal one process with the joint batch, ranks
stay identical, the emulated device works, dead or hung ranks stop the job, checkpoints
resume on any number of ranks. On CUDA (the CuPy stand-in's GPUs and its NCCL): a missing NCCL
stops every rank with a DeviceError, an NCCL collective that never completes ends the job
within the timeout, and NCCL training equals one process. The NCCL watchdog and the NCCL id's
encoding are also tested alone, without MPI."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from gpunet import Trainer, distributed, optim
from gpunet.losses import SoftmaxCrossEntropy

sys.path.insert(0, str(Path(__file__).parent))
import mpi_worker  # noqa: E402  (the worker's model and data are the single-process reference)
from standin import STANDIN_PATH as STANDIN, standin_env  # noqa: E402

needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or shutil.which("mpirun") is None,
    reason="mpi4py and mpirun (OpenMPI) are installed by .ci/run")

WORKER = Path(__file__).with_name("mpi_worker.py")
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONUNBUFFERED": "1"}


def mpirun(n: int, *args: str, timeout: float = 120, env: dict | None = None):
    return subprocess.run(["mpirun", "-np", str(n), sys.executable, str(WORKER), *args],
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


def nccl_env(nccl: str, **extra: str) -> dict:
    """The ranks' environment with the CuPy stand-in as `cupy` (two GPUs) and its NCCL in mode
    ``nccl`` (ok, missing or hang)."""
    return {**ENV, **standin_env(gpus=2, nccl=nccl), **extra}


def single_process(batch: int, scenario: str = "mlp") -> dict[str, np.ndarray]:
    """The same model, data and order in one process with the joint batch."""
    model, train = mpi_worker.build(scenario), mpi_worker.dataset(scenario)
    trainer = Trainer(model, SoftmaxCrossEntropy(),
                      optim.SGD(model.params(), lr=0.1, momentum=0.9), progress=False)
    trainer.fit(train, epochs=1, batch_size=batch, seed=5)
    return {k: p.data for k, p in model.params().items()}


@needs_mpi
def test_two_ranks_equal_one_process_with_the_joint_batch(tmp_path):
    out = tmp_path / "r.npz"
    run = mpirun(2, "mlp", str(out))
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    assert int(got["size"]) == 2
    assert len(got["spreads"]) == 4  # 256 samples, 64 per step
    want = single_process(64)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.all(got["spreads"] == 0), "ranks diverged"


@needs_mpi
def test_a_model_with_convolution_matches_too(tmp_path):
    out = tmp_path / "r.npz"
    run = mpirun(2, "conv", str(out))
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    for name, value in single_process(64, "conv").items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.all(got["spreads"] == 0)


@needs_mpi
def test_lenet_on_two_ranks_reaches_single_process_accuracy(tmp_path):
    """The issue's check: `mpirun -np 2 gpunet train lenet --data digits --distributed`."""
    def train(prefix: list[str], out: Path) -> float:
        cmd = [*prefix, sys.executable, "-m", "gpunet", "train", "lenet", "--data", "digits",
               "--device", "cpu", "--no-progress", "--metrics-out", str(out)]
        if prefix:
            cmd.append("--distributed")
        subprocess.run(cmd, check=True, capture_output=True, timeout=300,
                       env={**ENV, "OPENBLAS_NUM_THREADS": "1"})
        return json.loads(out.read_text())["test_accuracy"]

    single = train([], tmp_path / "one.json")
    double = train(["mpirun", "-np", "2"], tmp_path / "two.json")
    assert single >= 0.97 and abs(double - single) <= 0.01


@needs_mpi
@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_synchronised_batchnorm_equals_one_process(tmp_path, device):
    """sync=True: two ranks of 32 normalise with the statistics of all 64 samples, so weights
    and running estimates match one process with batch 64 (kernels on the emulated device)."""
    out = tmp_path / "r.npz"
    run = mpirun(2, "syncbn", str(out), device)
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    model, train = mpi_worker.build("syncbn"), mpi_worker.dataset("syncbn")
    trainer = Trainer(model, SoftmaxCrossEntropy(),
                      optim.SGD(model.params(), lr=0.1, momentum=0.9), progress=False)
    trainer.fit(train, epochs=1, batch_size=64, seed=5)
    for name, value in {**{k: p.data for k, p in model.params().items()},
                        **model.state()}.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.all(got["spreads"] == 0)


@needs_mpi
def test_uneven_last_step_is_weighted(tmp_path):
    """Three ranks of 32 (96 a step) over 194 samples: the last step has 2 samples, split
    1/1/0, so each rank's gradient must weigh by its share (and the empty rank by nothing)."""
    out = tmp_path / "r.npz"
    run = mpirun(3, "uneven", str(out))
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    want = single_process(96, "uneven")
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@needs_mpi
def test_emulated_device_with_batchnorm_kernels_under_mpi(tmp_path):
    out = tmp_path / "r.npz"
    run = mpirun(2, "bn", str(out), "emulated")
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    assert len(got["spreads"]) == 4 and np.all(got["spreads"] == 0)


@needs_mpi
@pytest.mark.parametrize("scenario", ["die", "hang"])
def test_a_dead_or_hung_rank_stops_the_job(tmp_path, scenario):
    started = time.monotonic()
    run = mpirun(2, scenario, str(tmp_path / "r.npz"), timeout=90,
                 env={**ENV, "GPUNET_DIST_TIMEOUT": "5"})
    assert run.returncode != 0
    assert time.monotonic() - started < 60
    if scenario == "hang":
        assert "did not complete within 5 s; another rank has died or hangs" in run.stderr
    assert not (tmp_path / "r.npz").exists()


@needs_mpi
def test_checkpoint_resumes_on_another_number_of_ranks(tmp_path):
    ckpt, out = tmp_path / "c.npz", tmp_path / "r.npz"
    assert mpirun(2, "resume", str(out), "cpu", str(ckpt), "2").returncode == 0
    run = mpirun(1, "resume", str(out), "cpu", str(ckpt), "3")
    assert run.returncode == 0, run.stderr
    assert int(np.load(out)["epochs"]) == 3 and int(np.load(out)["size"]) == 1


# -- NCCL on CUDA: the CuPy stand-in's GPUs and NCCL (tests/cupy_standin) --------------------
@needs_mpi
@pytest.mark.parametrize("lacking", ["all ranks", "rank 0"])
def test_missing_nccl_stops_every_rank_with_a_device_error(tmp_path, lacking):
    """The issue: rank 0 without NCCL raised AttributeError while rank 1 waited forever in
    the id's broadcast. Now every rank refuses, saying which ranks lack NCCL and what to
    install; the worker leaves each rank's message in r.npz.rankR."""
    out = tmp_path / "r.npz"
    worker = [sys.executable, str(WORKER), "mlp", str(out), "cuda"]
    if lacking == "rank 0":  # two programs: rank 0 without NCCL, rank 1 with it
        cmd = ["mpirun", "-np", "1", "-x", "GPUNET_STANDIN_NCCL=missing", *worker,
               ":", "-np", "1", *worker]
    else:
        cmd = ["mpirun", "-np", "2", *worker]
    started = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=90,
                         env=nccl_env("missing" if lacking == "all ranks" else "ok"))
    assert run.returncode != 0
    assert time.monotonic() - started < 30, "the ranks should refuse at once, not time out"
    which = "2 of 2 ranks (ranks 0, 1:" if lacking == "all ranks" else "1 of 2 ranks (rank 0:"
    for rank in (0, 1):
        message = (tmp_path / f"r.npz.rank{rank}").read_text()
        assert message.startswith(f"rank {rank}: NCCL is not available on {which} "
                                  "cupy.cuda.nccl.available is False"), message
        assert "pip install 'gpunet[distributed-cuda12]'" in message
    assert "DeviceError: rank" in run.stderr
    assert not out.exists()


@needs_mpi
def test_an_nccl_collective_that_never_completes_ends_the_job_within_the_timeout(tmp_path):
    """Every NCCL collective is queued and never completes (as when a peer died): the
    watchdogs abort NCCL and the job after GPUNET_DIST_TIMEOUT, naming it."""
    out = tmp_path / "r.npz"
    started = time.monotonic()
    run = mpirun(2, "mlp", str(out), "cuda", timeout=90,
                 env=nccl_env("hang", GPUNET_DIST_TIMEOUT="3"))
    assert run.returncode != 0
    assert time.monotonic() - started < 45
    assert re.search(r"gpunet distributed: rank \d: NCCL \w+ did not complete within 3 s; "
                     "another rank has died or hangs", run.stderr), run.stderr
    assert not out.exists()


@needs_mpi
def test_two_ranks_on_gpus_with_nccl_equal_one_process_with_the_joint_batch(tmp_path):
    """The CPU test's model and data on stand-in GPUs (cuda:0 and cuda:1, one per rank), the
    gradients averaged by (the stand-in's) NCCL."""
    out = tmp_path / "r.npz"
    run = mpirun(2, "mlp", str(out), "cuda", timeout=300, env=nccl_env("ok"))
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    assert int(got["size"]) == 2 and len(got["spreads"]) == 4
    for name, value in single_process(64).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.all(got["spreads"] == 0), "ranks diverged"


# -- the NCCL communicator's pieces alone: no MPI, no GPU ------------------------------------
class Work:
    """What the watchdog tracks (a CUDA event recorded after a collective): done when the
    test says so."""

    def __init__(self, done: bool = False) -> None:
        self.done = done


def watchdog(timeout: float, **kwargs):
    """A watchdog whose timeout handler records ``(what, error, when)`` instead of ending
    the process."""
    fired, calls = threading.Event(), []

    def on_timeout(what, error):
        calls.append((what, error, time.monotonic()))
        fired.set()
    return distributed._Watchdog(timeout, on_timeout, poll=0.01, **kwargs), calls, fired


def test_watchdog_ends_a_collective_that_never_completes_without_the_caller_waiting():
    dog, calls, fired = watchdog(1.0)
    started = time.monotonic()
    dog.track("allreduce", Work())
    assert time.monotonic() - started < 0.25  # the training thread goes on at once
    assert fired.wait(10)
    what, error, when = calls[0]
    assert (what, error) == ("allreduce", None) and when - started >= 1.0
    dog._thread.join(2)
    assert not dog._thread.is_alive() and len(calls) == 1


def test_watchdog_lets_completed_collectives_go_and_stops_when_asked():
    dog, calls, _ = watchdog(0.5)
    works = [Work() for _ in range(3)]
    for i, work in enumerate(works):
        dog.track(f"allreduce {i}", work)
    time.sleep(0.1)
    for work in works:
        work.done = True
    time.sleep(0.6)  # past the deadlines they had
    dog.stop(wait=2)
    assert not calls and dog.outstanding == 0 and not dog._thread.is_alive()


def test_stopping_the_watchdog_still_bounds_what_is_outstanding():
    dog, calls, _ = watchdog(0.3)
    dog.track("broadcast", Work())
    dog.stop(wait=5)  # at close or exit: the broadcast never completes, the deadline ends it
    assert [c[:2] for c in calls] == [("broadcast", None)]


def test_watchdog_bounds_a_blocking_host_call():
    dog, calls, fired = watchdog(0.2)
    with dog.guard("communicator setup"):  # NCCL's setup waiting for a rank that never comes
        assert fired.wait(5)
    assert calls[0][:2] == ("communicator setup", None)
    dog, calls, _ = watchdog(1.0)
    with dog.guard("communicator setup"):
        pass
    dog.stop(wait=2)
    assert not calls


def test_watchdog_reports_an_nccl_asynchronous_error_at_once():
    class RemoteError(RuntimeError):
        pass

    def check():
        raise RemoteError("NCCL_ERROR_REMOTE_ERROR")
    dog, calls, fired = watchdog(60, check=check)
    started = time.monotonic()
    dog.track("allreduce", Work())
    assert fired.wait(5) and time.monotonic() - started < 5
    assert calls[0][0] == "allreduce" and isinstance(calls[0][1], RemoteError)


def test_a_late_collective_aborts_the_nccl_communicator_then_the_job(monkeypatch, capsys):
    """The watchdog's handler: the message, NCCL's abort, MPI's Abort, the exit."""
    events, ended = [], threading.Event()

    class NcclComm:
        def abort(self):
            events.append("NCCL abort")

    class MPIComm:
        def Abort(self, code):
            events.append(("MPI Abort", code))

    def exit_(code):
        events.append(("exit", code))
        ended.set()
    monkeypatch.setattr(distributed.os, "_exit", exit_)
    mpi = types.SimpleNamespace(THREAD_MULTIPLE=3, Query_thread=lambda: 3)
    failure = distributed._NcclFailure(1, 0.2, mpi, MPIComm())
    failure.nccl_comm = NcclComm()
    dog = distributed._Watchdog(0.2, failure, check=failure.check, poll=0.01)
    dog.track("allreduce", Work())
    assert ended.wait(5)
    assert events == ["NCCL abort", ("MPI Abort", 1), ("exit", 1)]
    assert ("gpunet distributed: rank 1: NCCL allreduce did not complete within 0.2 s; "
            "another rank has died or hangs") in capsys.readouterr().err


def standin_nccl(monkeypatch, mode: str):
    """The stand-in's cupy.cuda.nccl in ``mode``, under a bare `cupy` package (none of the rest
    of the stand-in is needed)."""
    monkeypatch.setenv("GPUNET_STANDIN_NCCL", mode)
    cupy, cuda = types.ModuleType("cupy"), types.ModuleType("cupy.cuda")
    cupy.cuda = cuda
    spec = importlib.util.spec_from_file_location("cupy.cuda.nccl",
                                                  STANDIN / "cupy" / "cuda" / "nccl.py")
    nccl = importlib.util.module_from_spec(spec)
    for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "cupy._standin", raising=False)
    spec.loader.exec_module(nccl)
    cuda.nccl = nccl
    return nccl


def test_the_nccl_check_finds_a_missing_library(monkeypatch):
    nccl = standin_nccl(monkeypatch, "missing")
    # as CuPy without libnccl: `available` is False and nothing of NCCL's API is there
    assert nccl.available is False and not hasattr(nccl, "get_unique_id")
    assert distributed._load_nccl()[:2] == (None, 2)


def test_the_nccl_check_passes_a_working_one_and_refuses_an_incomplete_one(monkeypatch):
    nccl = standin_nccl(monkeypatch, "ok")
    assert distributed._load_nccl() == (nccl, 0, "")
    sys.modules["cupy.cuda"].nccl = types.SimpleNamespace(available=True, NCCL_SUM=0)
    module, code, detail = distributed._load_nccl()
    assert (module, code) == (None, 3) and "get_unique_id" in detail and "abort" in detail


@pytest.mark.parametrize("uid", [
    bytes(range(128)),  # CuPy 14
    tuple(np.arange(0, 256, 2, dtype=np.uint8).view(np.int8).tolist()),  # CuPy 13, signed char
    tuple(range(128, 256)),  # CuPy 13 where char is unsigned (Arm)
], ids=["bytes", "signed-chars", "unsigned-chars"])
def test_the_nccl_id_arrives_in_the_form_rank_0s_cupy_gave_it(uid):
    buf = distributed._encode_unique_id(uid)
    assert buf.dtype == np.uint8 and buf[0] == 1  # a plain buffer for MPI's Ibcast
    back = distributed._decode_unique_id(buf.copy())
    assert back == uid and type(back) is type(uid)
