"""Run under `mpirun -np N python tests/mpi_worker.py SCENARIO OUT [...]` by
tests/test_distributed.py; rank 0 writes what the test checks to OUT (.npz)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

import gpunet
from gpunet import Sequential, Trainer, data, distributed, optim
from gpunet.errors import DeviceError
from gpunet.layers import BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, ReLU
from gpunet.losses import SoftmaxCrossEntropy


def build(kind: str):
    gpunet.seed(0)
    if kind in ("bn", "syncbn"):
        return Sequential([Dense(2, 16), BatchNorm(16, sync=kind == "syncbn"), ReLU(),
                           Dense(16, 3)])
    if kind == "conv":
        return Sequential([Conv2D(1, 4, 3, padding=1), ReLU(), MaxPool2D(2), Flatten(),
                           Dense(64, 10)])
    return Sequential([Dense(2, 16), ReLU(), Dense(16, 3)])


def dataset(scenario: str):
    if scenario == "conv":  # 256 digit images (1, 8, 8)
        train, _ = data.digits(flat=False)
        return data.Dataset(train.x[:256], train.y[:256], "digits", 10)
    # "uneven": 3 ranks over 194 samples leave a last step of 2, so one rank reads nothing
    return data.blobs(n=194 if scenario == "uneven" else 256, classes=3)[0]


class Checksums(optim.SGD):
    """SGD that records, after every step, how far the ranks' parameter checksums are from
    rank 0's (summed over ranks: 0 when all hold identical parameters)."""

    def __init__(self, params, comm, **kwargs):
        super().__init__(params, **kwargs)
        self.comm, self.spreads = comm, []

    def step(self):
        super().step()
        total = sum(float(gpunet.to_numpy(p.data).astype(np.float64).sum())
                    for p in self.params.values())
        root = np.array([total])
        self.comm.broadcast([root])  # rank 0's checksum; every rank compares its own
        self.spreads.append(self.comm.allreduce_sum([abs(float(root[0]) - total)])[0])


def open_device(spec: str):
    """``spec``; "cuda" is one GPU per rank, as `gpunet train --distributed` picks them."""
    if spec != "cuda":
        return gpunet.device(spec)
    count = gpunet.device("cuda").xp.cuda.runtime.getDeviceCount()
    return gpunet.device(f"cuda:{distributed.local_rank() % count}")


def report_refusal(out: str, error: DeviceError) -> None:
    """Leave this rank's DeviceError in OUT.rankR, then wait (20 s at most) until every rank
    has: the test sees that each rank refused, not only the first one to exit (mpirun stops
    the others as soon as one exits)."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    Path(f"{out}.rank{world.Get_rank()}").write_text(str(error))
    request, deadline = world.Ibarrier(), time.monotonic() + 20
    while not request.Test() and time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    device = open_device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
    try:
        comm = distributed.init(device)
    except DeviceError as e:
        report_refusal(out, e)
        raise
    train = dataset(scenario)
    model = build(scenario).to(device)
    opt = Checksums(model.params(), comm, lr=0.1, momentum=0.9)
    trainer = Trainer(model, SoftmaxCrossEntropy(), opt, progress=False, comm=comm)
    if scenario == "die":
        if comm.rank == 1:
            os._exit(3)
    if scenario == "hang":
        if comm.rank == 1:
            time.sleep(3600)
    if scenario == "resume":
        ckpt = sys.argv[4]
        trainer.fit(train, epochs=int(sys.argv[5]), batch_size=32, checkpoint=ckpt,
                    resume=os.path.exists(ckpt), seed=5)
    else:
        trainer.fit(train, epochs=1, batch_size=32, seed=5)
    if comm.rank == 0:
        np.savez(out, size=comm.size, spreads=np.array(opt.spreads), epochs=len(trainer.history),
                 **{k: gpunet.to_numpy(p.data) for k, p in model.params().items()},
                 **{k: gpunet.to_numpy(v) for k, v in model.state().items()})
    comm.close()


if __name__ == "__main__":
    main()
