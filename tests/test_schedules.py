"""AdamW, the schedules CosineAnnealing, LinearWarmup and ReduceLROnPlateau (against PyTorch
where it is installed and against their formulas), early stopping in ``Trainer.fit`` (its
decision, restored weights, resume, several ranks, ``gpunet train --early-stopping``) and the
usage examples in the main layers' docstrings."""
from __future__ import annotations

import doctest
import json
import math
import subprocess
import sys
import threading

import numpy as np
import pytest

import gpunet
from gpunet import EarlyStopping, Sequential, Trainer, data, optim
from gpunet.cli import main
from gpunet.distributed import Communicator
from gpunet.layers import Dense, Parameter, ReLU
from gpunet.losses import SoftmaxCrossEntropy


def make_params(seed: int = 0) -> dict[str, Parameter]:
    g = np.random.default_rng(seed)
    return {"w": Parameter(g.standard_normal((3, 4))), "b": Parameter(g.standard_normal(4))}


def grads(step: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(100 + step)
    return {"w": g.standard_normal((3, 4)), "b": g.standard_normal(4)}


# -- AdamW ---------------------------------------------------------------------------------
def adamw_formula(w0, steps, lr, betas, eps, wd):
    """AdamW written out: decay the weights, then Adam's bias-corrected step."""
    b1, b2 = betas
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, steps + 1):
        g = grads(t - 1)["w"]
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
    return w


def run_adamw(params, steps, first=0, **kwargs):
    opt = optim.AdamW(params, **kwargs)
    for t in range(first, first + steps):
        for k, p in params.items():
            p.grad[...] = grads(t)[k]
        opt.step()
    return opt


def test_adamw_default_weight_decay_is_torchs():
    assert optim.AdamW(make_params()).weight_decay == 0.01


def test_adamw_matches_its_formula():
    params = make_params()
    w0 = params["w"].data.copy()
    run_adamw(params, 6, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    want = adamw_formula(w0, 6, 0.05, (0.8, 0.99), 1e-6, 0.1)
    np.testing.assert_allclose(params["w"].data, want, rtol=1e-13, atol=1e-15)


def test_adamw_matches_torch_number_for_number():
    torch = pytest.importorskip("torch")
    params = make_params()
    tp = {k: torch.tensor(p.data.copy(), requires_grad=True) for k, p in params.items()}
    topt = torch.optim.AdamW(list(tp.values()), lr=0.02, betas=(0.9, 0.95), eps=1e-7,
                             weight_decay=0.3)
    opt = optim.AdamW(params, lr=0.02, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.3)
    for t in range(8):
        for k, p in params.items():
            p.grad[...] = grads(t)[k]
            tp[k].grad = torch.tensor(grads(t)[k])
        opt.step()
        topt.step()
        for k, p in params.items():
            np.testing.assert_allclose(p.data, tp[k].detach().numpy(), rtol=1e-12,
                                       atol=1e-14, err_msg=f"{k} at step {t + 1}")


def test_adamw_differs_from_adam_with_l2_decay():
    a, b = make_params(), make_params()
    for p_a, p_b, k in zip(a.values(), b.values(), a):
        p_a.grad[...] = p_b.grad[...] = grads(0)[k]
    optim.AdamW(a, lr=0.1, weight_decay=0.5).step()
    optim.Adam(b, lr=0.1, weight_decay=0.5).step()
    assert not np.allclose(a["w"].data, b["w"].data)


def test_adamw_on_every_device_equals_the_cpu(device):
    cpu = make_params()
    run_adamw(cpu, 4, lr=0.01)
    params = {k: Parameter(device.asarray(p.data.astype(np.float32)))
              for k, p in make_params().items()}
    opt = optim.AdamW(params, lr=0.01)
    for t in range(4):
        for k, p in params.items():
            p.grad[...] = device.asarray(grads(t)[k].astype(np.float32))
        opt.step()
    for k, p in params.items():
        assert device.owns(p.data) and all(device.owns(s) for s in opt.slots[k].values())
        np.testing.assert_allclose(gpunet.to_numpy(p.data), cpu[k].data, rtol=1e-5, atol=1e-6)


def test_adamw_state_dict_round_trip_continues_exactly():
    full = make_params()
    run_adamw(full, 5, lr=0.03)
    first = make_params()
    opt = run_adamw(first, 3, lr=0.03)
    state = opt.state_dict()
    resumed = {k: Parameter(p.data.copy()) for k, p in first.items()}
    again = optim.AdamW(resumed, lr=0.03)
    again.load_state_dict(state)
    assert again.step_count == 3 and set(state["slots"]) == {
        "w.exp_avg", "w.exp_avg_sq", "b.exp_avg", "b.exp_avg_sq"}
    for t in range(3, 5):
        for k, p in resumed.items():
            p.grad[...] = grads(t)[k]
        again.step()
    for k in full:
        np.testing.assert_array_equal(resumed[k].data, full[k].data, err_msg=k)


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_decay": -0.1}, "AdamW: expected weight_decay >= 0, got -0.1"),
    ({"lr": 0}, "AdamW: expected lr > 0, got 0"),
    ({"betas": (0.9, 1.0)}, r"AdamW: expected beta2 in \[0, 1\), got 1.0"),
])
def test_adamw_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.AdamW(make_params(), **kwargs)


# -- schedules against their formulas and torch -----------------------------------------
def lrs(schedule, opt, epochs, metrics=None):
    seen = [opt.lr]
    for e in range(epochs):
        schedule.step() if metrics is None else schedule.step(metrics[e])
        seen.append(opt.lr)
    return seen


def torch_lrs(make, epochs, lr, metrics=None):
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make(torch, opt)
    seen = [opt.param_groups[0]["lr"]]
    for e in range(epochs):
        opt.step()
        sched.step() if metrics is None else sched.step(metrics[e])
        seen.append(opt.param_groups[0]["lr"])
    return seen


def test_cosine_annealing_follows_its_formula():
    opt = optim.SGD(make_params(), lr=0.2)
    got = lrs(optim.CosineAnnealing(opt, t_max=8, eta_min=0.01), opt, 8)
    want = [0.01 + 0.19 * (1 + math.cos(math.pi * e / 8)) / 2 for e in range(9)]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert got[-1] == pytest.approx(0.01, rel=1e-15)


def test_cosine_annealing_matches_torch_past_t_max():
    opt = optim.SGD(make_params(), lr=0.1)
    got = lrs(optim.CosineAnnealing(opt, t_max=5, eta_min=0.001), opt, 14)
    want = torch_lrs(lambda t, o: t.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5,
                                                                          eta_min=0.001),
                     14, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_linear_warmup_then_cosine_matches_torchs_sequential_lr():
    opt = optim.SGD(make_params(), lr=0.1)
    got = lrs(optim.LinearWarmup(optim.CosineAnnealing(opt, t_max=10), warmup_epochs=4,
                                 start_factor=0.1), opt, 16)

    def make(t, o):
        warm = t.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4)
        cos = t.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
        return t.optim.lr_scheduler.SequentialLR(o, [warm, cos], milestones=[4])
    np.testing.assert_allclose(got, torch_lrs(make, 16, 0.1), rtol=1e-12)
    # the formula: a linear ramp from 0.01 to 0.1, then the cosine from its start
    np.testing.assert_allclose(got[:5], [0.01, 0.0325, 0.055, 0.0775, 0.1], rtol=1e-14)
    assert got[5] == pytest.approx(0.05 * (1 + math.cos(math.pi / 10)), rel=1e-14)


def test_linear_warmup_of_an_optimizer_matches_torchs_linear_lr():
    opt = optim.SGD(make_params(), lr=0.3)
    got = lrs(optim.LinearWarmup(opt, warmup_epochs=3), opt, 6)
    want = torch_lrs(lambda t, o: t.optim.lr_scheduler.LinearLR(o, total_iters=3), 6, 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_linear_warmup_composes_with_step_decay():
    opt = optim.SGD(make_params(), lr=1.0)
    got = lrs(optim.LinearWarmup(optim.StepDecay(opt, step_size=2, gamma=0.5),
                                 warmup_epochs=2, start_factor=0.5), opt, 6)
    np.testing.assert_allclose(got, [0.5, 0.75, 1.0, 1.0, 0.5, 0.5, 0.25], rtol=1e-15)


PLATEAU_METRICS = [5.0, 4.0, 4.0, 4.0, 3.9999, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0,
                   2.0, 2.0, 2.0, float("nan"), 2.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("kwargs", [
    {},
    {"patience": 1},
    {"patience": 1, "cooldown": 2, "factor": 0.5},
    {"patience": 0, "min_lr": 0.02, "factor": 0.5},
    {"patience": 1, "threshold": 0.5, "threshold_mode": "abs"},
    {"mode": "max", "patience": 2},
])
def test_reduce_lr_on_plateau_matches_torch(kwargs):
    opt = optim.SGD(make_params(), lr=0.1)
    got = lrs(optim.ReduceLROnPlateau(opt, **kwargs), opt, len(PLATEAU_METRICS),
              PLATEAU_METRICS)
    want = torch_lrs(lambda t, o: t.optim.lr_scheduler.ReduceLROnPlateau(o, **kwargs),
                     len(PLATEAU_METRICS), 0.1, PLATEAU_METRICS)
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert len(set(got)) > 1 or kwargs in ({}, {"mode": "max", "patience": 2})


def test_reduce_lr_on_plateau_by_its_rule():
    opt = optim.SGD(make_params(), lr=1.0)
    got = lrs(optim.ReduceLROnPlateau(opt, patience=2, factor=0.5), opt, 7,
              [3, 3, 3, 3, 3, 3, 3])
    # epoch 1 sets best; three epochs without improvement exceed patience 2: a cut
    assert got == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("make, match", [
    (lambda o: optim.CosineAnnealing(o, t_max=0), "CosineAnnealing: expected t_max to be an "
                                                   "integer > 0, got 0"),
    (lambda o: optim.CosineAnnealing(o, t_max=5, eta_min=-1.0), "eta_min >= 0"),
    (lambda o: optim.LinearWarmup(o, warmup_epochs=0), "LinearWarmup: expected "
                                                       "warmup_epochs to be an integer > 0"),
    (lambda o: optim.LinearWarmup(o, 2, start_factor=0.0), r"start_factor in \(0, 1\]"),
    (lambda o: optim.LinearWarmup(optim.ReduceLROnPlateau(o), 2), "LinearWarmup: expected an "
                                                                  "optimizer or a schedule"),
    (lambda o: optim.ReduceLROnPlateau(o, mode="up"), "ReduceLROnPlateau: expected mode "
                                                      "'min' or 'max', got 'up'"),
    (lambda o: optim.ReduceLROnPlateau(o, factor=1.0), r"factor in \(0, 1\), got 1.0"),
    (lambda o: optim.ReduceLROnPlateau(o, patience=-1), "patience to be an integer >= 0"),
    (lambda o: optim.ReduceLROnPlateau(o).load_state_dict({"epoch": 1}),
     "ReduceLROnPlateau.load_state_dict: expected a dict with keys"),
])
def test_schedules_reject_bad_arguments(make, match):
    opt = optim.SGD(make_params(), lr=0.1)
    with pytest.raises((ValueError, TypeError), match=match):
        make(opt)
    assert opt.lr == 0.1


# -- in the Trainer: checkpoint and resume equal to an uninterrupted run --------------------
def setup(schedule=None, seed=0, opt_cls=optim.SGD, **opt_kwargs):
    gpunet.seed(seed)
    train, val = data.spirals(n=240)  # slow to learn: plateaus come soon
    model = Sequential([Dense(2, 16), ReLU(), Dense(16, 3)])
    opt = opt_cls(model.params(), lr=0.2, **opt_kwargs)
    sched = None if schedule is None else schedule(opt)
    return train, val, Trainer(model, SoftmaxCrossEntropy(), opt, schedule=sched,
                               progress=False)


def strip(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


SCHEDULES = {
    "cosine": lambda o: optim.CosineAnnealing(o, t_max=5, eta_min=0.01),
    "warmup+cosine": lambda o: optim.LinearWarmup(optim.CosineAnnealing(o, t_max=3), 2),
    "plateau": lambda o: optim.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=0.05),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_resume_equals_the_uninterrupted_run(name, tmp_path):
    train, val, full = setup(SCHEDULES[name])
    full.fit(train, epochs=5, batch_size=32, val=val, seed=3)
    train, val, first = setup(SCHEDULES[name])
    ckpt = tmp_path / "run.ckpt"
    first.fit(train, epochs=2, batch_size=32, val=val, checkpoint=ckpt, seed=3)
    train, val, resumed = setup(SCHEDULES[name], seed=7)
    resumed.fit(train, epochs=5, batch_size=32, val=val, checkpoint=ckpt, resume=True, seed=3)
    assert strip(resumed.history) == strip(full.history)
    assert resumed.optimizer.lr == full.optimizer.lr
    for (k, a), b in zip(full.model.params().items(), resumed.model.params().values()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=k)
    assert len({row["lr"] for row in full.history}) > 1  # the schedule did change the rate


def test_trainer_steps_reduce_lr_on_plateau_with_the_validation_loss():
    train, val, trainer = setup(SCHEDULES["plateau"])
    history = trainer.fit(train, epochs=5, batch_size=32, val=val, seed=3)
    replay = optim.ReduceLROnPlateau(optim.SGD(make_params(), lr=0.2), patience=0, factor=0.5,
                                     threshold=0.05)
    want = lrs(replay, replay.optimizer, 5, [row["val_loss"] for row in history])
    assert [row["lr"] for row in history] == want[:5]
    assert trainer.optimizer.lr == want[5]


def test_reduce_lr_on_plateau_without_validation_is_refused_before_training():
    train, _, trainer = setup(SCHEDULES["plateau"])
    before = trainer.model.params()["0.weight"].data.copy()
    with pytest.raises(ValueError, match="Trainer.fit: schedule ReduceLROnPlateau monitors "
                                         "'val_loss': pass val="):
        trainer.fit(train, epochs=2)
    np.testing.assert_array_equal(trainer.model.params()["0.weight"].data, before)


# -- early stopping ----------------------------------------------------------------------
def weights(trainer):
    return {k: p.data.copy() for k, p in trainer.model.params().items()}


def test_early_stopping_stops_restores_the_best_weights_and_says_why():
    # nothing improves on epoch 1 by 10: epochs 2 and 3 are the patience, then it stops
    train, val, trainer = setup()
    stopper = EarlyStopping("val_loss", patience=2, min_delta=10.0)
    history = trainer.fit(train, epochs=20, batch_size=32, val=val, seed=3,
                          early_stopping=stopper)
    assert len(history) == 3 and stopper.best_epoch == 1 and stopper.stopped_epoch == 3
    assert history[-1]["stopped"] == ("early stopping: val_loss did not improve for 2 epochs "
                                      f"(best {history[0]['val_loss']:.6g} at epoch 1); "
                                      "restored the weights of epoch 1")
    assert all("stopped" not in row for row in history[:-1])
    train, val, one = setup()
    one.fit(train, epochs=1, batch_size=32, val=val, seed=3)
    for k, w in weights(one).items():
        np.testing.assert_array_equal(trainer.model.params()[k].data, w, err_msg=k)


def test_early_stopping_restores_on_every_device(device):
    def on(dev):
        train, val, t = setup()
        return train, val, Trainer(t.model.to(dev), t.loss, t.optimizer, progress=False)
    train, val, trainer = on(device)
    trainer.fit(train, epochs=20, batch_size=32, val=val, seed=3,
                early_stopping=EarlyStopping(patience=2, min_delta=10.0))
    train, val, one = on(device)
    one.fit(train, epochs=1, batch_size=32, val=val, seed=3)
    assert len(trainer.history) == 3
    for k, p in trainer.model.params().items():
        assert device.owns(p.data), k
        np.testing.assert_array_equal(gpunet.to_numpy(p.data),
                                      gpunet.to_numpy(one.model.params()[k].data), err_msg=k)


def test_early_stopping_without_restore_keeps_the_last_weights():
    train, val, trainer = setup()
    trainer.fit(train, epochs=20, batch_size=32, val=val, seed=3,
                early_stopping=EarlyStopping(patience=2, min_delta=10.0, restore_best=False))
    train, val, three = setup()
    three.fit(train, epochs=3, batch_size=32, val=val, seed=3)
    for k, w in weights(three).items():
        np.testing.assert_array_equal(trainer.model.params()[k].data, w, err_msg=k)
    assert "restored" not in trainer.history[-1]["stopped"]


def test_early_stopping_in_max_mode_on_accuracy_runs_on_while_it_improves():
    train, val, trainer = setup()
    stopper = EarlyStopping("val_accuracy", patience=3, mode="max")
    history = trainer.fit(train, epochs=30, batch_size=32, val=val, seed=3,
                          early_stopping=stopper)
    best = max(row["val_accuracy"] for row in history)
    assert stopper.best == best and history[stopper.best_epoch - 1]["val_accuracy"] == best
    if len(history) < 30:
        assert len(history) == stopper.best_epoch + 3 and "stopped" in history[-1]


def test_early_stopping_resume_equals_the_uninterrupted_run(tmp_path):
    make = lambda: EarlyStopping("val_loss", patience=2, min_delta=0.005)
    train, val, full = setup()
    full.fit(train, epochs=40, batch_size=32, val=val, seed=3, early_stopping=make())
    stopped = len(full.history)
    assert 3 < stopped < 40, "the scenario must stop after a few improving epochs"
    ckpt = tmp_path / "run.ckpt"
    train, val, first = setup()
    first.fit(train, epochs=stopped - 1, batch_size=32, val=val, checkpoint=ckpt, seed=3,
              early_stopping=make())
    assert "stopped" not in first.history[-1]
    train, val, resumed = setup(seed=9)
    resumed.fit(train, epochs=40, batch_size=32, val=val, checkpoint=ckpt, resume=True,
                seed=3, early_stopping=make())
    assert strip(resumed.history) == strip(full.history)
    for k, w in weights(full).items():
        np.testing.assert_array_equal(resumed.model.params()[k].data, w, err_msg=k)
    # resuming a run that stopped adds nothing
    train, val, again = setup(seed=11)
    again.fit(train, epochs=40, batch_size=32, val=val, checkpoint=ckpt, resume=True, seed=3,
              early_stopping=make())
    assert strip(again.history) == strip(full.history)
    for k, w in weights(full).items():
        np.testing.assert_array_equal(again.model.params()[k].data, w, err_msg=k)


@pytest.mark.parametrize("kwargs, match", [
    ({"patience": 0}, "EarlyStopping: expected patience to be an integer >= 1, got 0"),
    ({"mode": "lower"}, "EarlyStopping: expected mode 'min' or 'max', got 'lower'"),
    ({"min_delta": -1}, "EarlyStopping: expected min_delta >= 0, got -1"),
    ({"monitor": ""}, "EarlyStopping: expected monitor to be a history key"),
])
def test_early_stopping_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)


def test_early_stopping_on_a_missing_metric_is_an_error_naming_it():
    train, val, trainer = setup()
    with pytest.raises(ValueError, match="early_stopping EarlyStopping monitors 'val_loss': "
                                         "pass val="):
        trainer.fit(train, epochs=2, early_stopping=EarlyStopping())
    with pytest.raises(ValueError, match=r"EarlyStopping monitors 'val_dice', which this "
                                         r"run's history does not have \(it has .*'val_loss'"):
        trainer.fit(train, epochs=2, val=val, early_stopping=EarlyStopping("val_dice"))


class ThreadComm(Communicator):
    """Ranks as threads of one process: each collective swaps values through a shared list
    between two barrier waits (the sums run in rank order, so every rank gets the same)."""

    def __init__(self, rank: int, size: int, shared: dict) -> None:
        self.rank, self.size, self.shared = rank, size, shared

    def _swap(self, values: list) -> list:
        self.shared["slots"][self.rank] = values
        self.shared["barrier"].wait()
        got = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return got

    def allreduce_mean(self, arrays) -> None:
        got = self._swap([np.array(a) for a in arrays])
        for i, a in enumerate(arrays):
            a[...] = sum(r[i] for r in got) / self.size

    def allreduce_sum(self, values) -> list[float]:
        got = self._swap([float(v) for v in values])
        return [sum(r[i] for r in got) for i in range(len(values))]

    def broadcast(self, arrays, root: int = 0) -> None:
        got = self._swap([np.array(a) for a in arrays])
        for i, a in enumerate(arrays):
            a[...] = got[root][i]

    def barrier(self) -> None:
        self.shared["barrier"].wait()


def test_early_stopping_on_two_ranks_stops_them_together():
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=60)}
    results, errors = [None, None], []

    def rank(r: int) -> None:
        try:
            train, val, _ = setup()
            gpunet.seed(r)  # different initial weights: rank 0's must be broadcast
            model = Sequential([Dense(2, 16), ReLU(), Dense(16, 3)])
            trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.2),
                              progress=False, comm=ThreadComm(r, 2, shared))
            stopper = EarlyStopping("val_loss", patience=2, min_delta=0.005)
            trainer.fit(train, epochs=40, batch_size=16, val=val, seed=3,
                        early_stopping=stopper)
            results[r] = (strip(trainer.history), weights(trainer), stopper.best_epoch)
        except BaseException as e:  # noqa: BLE001  (reported by the test thread)
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    (h0, w0, b0), (h1, w1, b1) = results
    assert h0 == h1 and b0 == b1 and "stopped" in h0[-1] and len(h0) < 40
    for k in w0:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)


# -- the command line ---------------------------------------------------------------------
def test_cli_early_stopping_stops_and_says_so(tmp_path):
    out = tmp_path / "m.json"
    done = subprocess.run([sys.executable, "-m", "gpunet", "train", "mlp", "--data", "blobs",
                           "--epochs", "200", "--lr", "0.5", "--early-stopping", "2",
                           "--device", "cpu", "--no-progress", "--metrics-out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "gpunet: early stopping: val_loss did not improve for 2 epochs" in done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(out.read_text())["stopped_at_epoch"] < 200


def test_cli_early_stopping_patience_must_be_positive(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "mlp", "--data", "blobs", "--early-stopping", "0"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert "argument --early-stopping: expected a positive integer, got 0" in err


def test_cli_early_stopping_needs_a_validation_set(capsys):
    code = main(["train", "mlp", "--data", "blobs", "--device", "cpu", "--early-stopping", "3",
                 "--val-fraction", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("gpunet train: error: --early-stopping watches the validation loss: "
                          "it needs --val-fraction > 0")


# -- the usage examples in docstrings run ---------------------------------------------------
def _docstring_objects():
    from gpunet.layers import BatchNorm, Conv2D, Graph, Layer, LSTM, MaxPool2D
    return [Dense, Conv2D, LSTM, BatchNorm, MaxPool2D, Sequential, Graph, Layer.forward,
            Layer.backward, optim.AdamW, optim.CosineAnnealing, optim.LinearWarmup,
            optim.ReduceLROnPlateau, EarlyStopping]


@pytest.mark.parametrize("obj", _docstring_objects(), ids=lambda o: o.__qualname__)
def test_docstring_examples_run(obj):
    module = sys.modules[obj.__module__]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = doctest.DocTestFinder(recurse=False).find(obj, obj.__qualname__,
                                                     globs=dict(vars(module)))
    for test in tests:
        runner.run(test)
    assert runner.tries > 0, f"{obj.__qualname__}: no >>> example in its docstring"
    assert runner.failures == 0, f"{obj.__qualname__}: a docstring example failed (see above)"


@pytest.mark.parametrize("obj", _docstring_objects()[:7], ids=lambda o: o.__qualname__)
def test_layer_help_shows_the_example_before_implementation_detail(obj):
    doc = obj.__doc__
    assert ">>>" in doc
    for detail in ("im2col", "GEMM", "kernels", "cache"):
        if detail in doc:
            assert doc.index(">>>") < doc.index(detail), f"{obj.__name__}: {detail} first"
