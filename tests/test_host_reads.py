"""How often a training epoch on a GPU waits for the host: counted on the CuPy stand-in.

Every device-to-host read (``float(loss)``, ``.get()``, ``bool(...)``) makes the host wait for
the GPU to finish everything queued. A training step must queue its work and go on; the
Trainer reads its loss and metric sums only to redraw the progress bar (a few times a second)
and at the end of the epoch. These tests count the reads of one epoch on the stand-in's
cuda:0 and print them, so a regression shows its size.
"""
from __future__ import annotations

import io

import numpy as np
import pytest

import gpunet
from gpunet import Sequential, Trainer, data, models, optim
from gpunet.distributed import Communicator
from gpunet.layers import BatchNorm, Conv2D, Dense, GlobalAvgPool2D, ReLU
from gpunet.losses import SoftmaxCrossEntropy
from gpunet.progress import ProgressBar

#: Reads allowed beyond one per progress redraw: the epoch's totals, plus one spare.
CONSTANT = 2


class _Terminal(io.StringIO):
    """A log that says it is a terminal, so the progress bar redraws (and reads) as it would
    for a user watching."""

    def isatty(self) -> bool:
        return True


class _TwoRanks(Communicator):
    """Two ranks with identical data, in one process: collectives leave device arrays as MPI or
    NCCL would (the mean of equal arrays) and sum host values, without reading anything."""

    rank, size = 0, 2

    def allreduce_sum(self, values):
        return [2 * float(v) for v in values]


def _digits(flat: bool = True, rows: bool = False) -> data.Dataset:
    train = (data.digits_rows() if rows else data.digits(flat=flat))[0]
    return data.Dataset(train.x[:192], train.y[:192], train.name, train.num_classes)


def _bn(sync: bool):
    return Sequential([Conv2D(1, 8, 3, padding=1), BatchNorm(8, sync=sync), ReLU(),
                       Conv2D(8, 8, 3, padding=1), BatchNorm(8, sync=sync), ReLU(),
                       GlobalAvgPool2D(), Dense(8, 10)])


RUNS = {  # model, data, clip_norm, communicator
    "mlp": (lambda: models.mlp((64,), 10), lambda: _digits(), None, None),
    "lenet": (lambda: models.lenet((1, 8, 8), 10), lambda: _digits(flat=False), None, None),
    "lstm": (lambda: models.lstm((8, 8), 10), lambda: _digits(rows=True), 1.0, None),
    "bn": (lambda: _bn(False), lambda: _digits(flat=False), None, None),
    "bn-sync": (lambda: _bn(True), lambda: _digits(flat=False), None, _TwoRanks()),
    "transformer": (lambda: models.transformer((8,), 10, embed_dim=16, heads=2, blocks=1,
                                               hidden=32),
                    lambda: data.reverse(n_train=192, n_test=1)[0], 1.0, None),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_an_epoch_reads_from_the_gpu_only_to_show_progress(name, standin, monkeypatch):
    build, load, clip, comm = RUNS[name]
    monkeypatch.setattr(ProgressBar, "INTERVAL", 0.0)  # redraw at every step: the worst case
    gpunet.seed(0)
    model = build()
    log = _Terminal()
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.Adam(model.params(), lr=1e-3),
                      device="cuda:0", clip_norm=clip, log=log, comm=comm)
    train = load()
    trainer.fit(train, epochs=1, batch_size=16, seed=0)  # compiles, loads, warms up
    counters = standin._standin.counters
    counters.reset()
    redraws = []
    monkeypatch.setattr(ProgressBar, "close", lambda bar, **_: redraws.append(bar.redraws))
    trainer.fit(train, epochs=1, batch_size=16, seed=0)
    steps = -(-len(train) // (16 * trainer.comm.size))
    reads = counters.host_reads
    print(f"{name}: {reads} host reads in one epoch of {steps} steps, {redraws[0]} redraws "
          f"({counters.as_dict()})")
    assert redraws == [steps]  # the bar was drawn at every step
    assert reads <= redraws[0] + CONSTANT
    assert counters.uploads <= steps * 2 + CONSTANT  # each batch (x and y), nothing per layer
    assert counters.get_function_calls == 0  # kernel handles were kept from the first epoch


@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_without_a_progress_bar_an_epoch_reads_a_constant(name, standin):
    build, load, clip, comm = RUNS[name]
    gpunet.seed(0)
    model = build()
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1),
                      device="cuda:1", clip_norm=clip, progress=False)
    train = load()
    trainer.fit(train, epochs=1, batch_size=16, seed=0)
    standin._standin.counters.reset()
    trainer.fit(train, epochs=1, batch_size=16, seed=0)
    reads = standin._standin.counters.host_reads
    print(f"{name}: {reads} host reads in one epoch without progress")
    assert reads <= CONSTANT


def test_a_nan_on_the_gpu_stops_at_the_next_read(standin, tmp_path):
    train = _digits()
    gpunet.seed(0)
    model = models.mlp((64,), 10)
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1),
                      device="cuda:0", progress=False)
    ckpt = tmp_path / "run.npz"
    trainer.fit(train, epochs=1, batch_size=16, seed=0, checkpoint=ckpt)
    good = ckpt.read_bytes()
    train.x[20] = np.nan  # in the second step
    with pytest.raises(gpunet.TrainingDiverged,
                       match=r"loss became nan at epoch 2, one of steps 1 to 12; those steps "
                             r"were applied"):
        trainer.fit(train, epochs=2, batch_size=16, seed=0, checkpoint=ckpt, resume=True)
    assert ckpt.read_bytes() == good


def test_a_bad_label_on_the_gpu_is_reported_as_such(standin):
    train = _digits()
    train.y[30] = 12  # ten classes
    gpunet.seed(0)
    model = models.mlp((64,), 10)
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1),
                      device="cuda:0", progress=False)
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: expected labels in \[0, 10\), "
                                         r"got 12"):
        trainer.fit(train, epochs=1, batch_size=16, seed=0)


def test_a_bad_token_on_the_gpu_is_reported_as_such(standin):
    train = data.reverse(n_train=64, n_test=1)[0]
    train.x[40, 3] = 10  # ten tokens: 0 to 9
    gpunet.seed(0)
    model = models.transformer((8,), 10, embed_dim=16, heads=2, blocks=1, hidden=32)
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.Adam(model.params(), lr=1e-3),
                      device="cuda:0", progress=False)
    with pytest.raises(IndexError, match=r"Embedding: expected indices in \[0, 10\), got 10"):
        trainer.fit(train, epochs=1, batch_size=16, seed=0)
