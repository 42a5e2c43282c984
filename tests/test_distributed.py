"""Data-parallel training under MPI: two ranks equal one process with the joint batch, ranks
stay identical, the emulated device works, dead or hung ranks stop the job, checkpoints
resume on any number of ranks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpunet import Trainer, optim
from gpunet.losses import SoftmaxCrossEntropy

pytest.importorskip("mpi4py", reason="mpi4py is installed by .ci/run")
if shutil.which("mpirun") is None:
    pytest.skip("mpirun (OpenMPI) is installed by .ci/run", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import mpi_worker  # noqa: E402  (the worker's model and data are the single-process reference)

WORKER = Path(__file__).with_name("mpi_worker.py")
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONUNBUFFERED": "1"}


def mpirun(n: int, *args: str, timeout: float = 120, env: dict | None = None):
    return subprocess.run(["mpirun", "-np", str(n), sys.executable, str(WORKER), *args],
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


def single_process(batch: int, scenario: str = "mlp") -> dict[str, np.ndarray]:
    """The same model, data and order in one process with the joint batch."""
    model, train = mpi_worker.build(scenario), mpi_worker.dataset(scenario)
    trainer = Trainer(model, SoftmaxCrossEntropy(),
                      optim.SGD(model.params(), lr=0.1, momentum=0.9), progress=False)
    trainer.fit(train, epochs=1, batch_size=batch, seed=5)
    return {k: p.data for k, p in model.params().items()}


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


def test_a_model_with_convolution_matches_too(tmp_path):
    out = tmp_path / "r.npz"
    run = mpirun(2, "conv", str(out))
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    for name, value in single_process(64, "conv").items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.all(got["spreads"] == 0)


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


def test_emulated_device_with_batchnorm_kernels_under_mpi(tmp_path):
    out = tmp_path / "r.npz"
    run = mpirun(2, "bn", str(out), "emulated")
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    assert len(got["spreads"]) == 4 and np.all(got["spreads"] == 0)


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


def test_checkpoint_resumes_on_another_number_of_ranks(tmp_path):
    ckpt, out = tmp_path / "c.npz", tmp_path / "r.npz"
    assert mpirun(2, "resume", str(out), "cpu", str(ckpt), "2").returncode == 0
    run = mpirun(1, "resume", str(out), "cpu", str(ckpt), "3")
    assert run.returncode == 0, run.stderr
    assert int(np.load(out)["epochs"]) == 3 and int(np.load(out)["size"]) == 1
