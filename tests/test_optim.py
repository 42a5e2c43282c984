"""Optimizers against reference updates written here in plain NumPy (PyTorch's rules),
checkpoint state, learning-rate schedules and gradient clipping."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet.layers.base import Parameter
from gpunet.optim import (OPTIMIZERS, SGD, Adam, ExponentialDecay, InverseTimeDecay,
                          RMSprop, StepDecay, clip_grad_norm, clip_grad_value)

R = np.random.default_rng(5)
START = {"w": R.normal(size=(3, 2)), "b": R.normal(size=(2,))}
GRADS = [{k: R.normal(size=v.shape) for k, v in START.items()} for _ in range(6)]
for _arrays in [START, *GRADS]:  # a test that updated these in place would fail, not leak
    for _a in _arrays.values():
        _a.setflags(write=False)


def make_params(dtype=np.float64, start=START) -> dict[str, Parameter]:
    return {k: Parameter(v.astype(dtype)) for k, v in start.items()}


def run(opt, params: dict[str, Parameter], grads) -> None:
    for g in grads:
        for k, p in params.items():
            p.grad[...] = g[k]
        opt.step()


# -- reference rules: one array, all steps, from torch.optim's documented algorithms ------
def ref_sgd(w, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    w, buf = w.copy(), None
    for g in grads:
        g = g + weight_decay * w
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        w = w - lr * g
    return w


def ref_rmsprop(w, grads, lr, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0):
    w, sq, buf = w.copy(), np.zeros_like(w), np.zeros_like(w)
    for g in grads:
        g = g + weight_decay * w
        sq = alpha * sq + (1 - alpha) * g ** 2
        avg = np.sqrt(sq) + eps
        if momentum:
            buf = momentum * buf + g / avg
            w = w - lr * buf
        else:
            w = w - lr * g / avg
    return w


def ref_adam(w, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    w, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * w
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g ** 2
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
    return w


VARIANTS = {
    "sgd": (SGD, ref_sgd, {"lr": 0.1}),
    "sgd-momentum": (SGD, ref_sgd, {"lr": 0.1, "momentum": 0.9}),
    "sgd-nesterov": (SGD, ref_sgd, {"lr": 0.1, "momentum": 0.8, "nesterov": True}),
    "sgd-wd": (SGD, ref_sgd, {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1}),
    "rmsprop": (RMSprop, ref_rmsprop, {"lr": 0.01}),
    "rmsprop-momentum": (RMSprop, ref_rmsprop, {"lr": 0.01, "alpha": 0.9, "momentum": 0.7,
                                                "weight_decay": 0.05}),
    "adam": (Adam, ref_adam, {"lr": 0.01}),
    "adam-wd": (Adam, ref_adam, {"lr": 0.02, "betas": (0.8, 0.95), "weight_decay": 0.1}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_steps_match_the_reference_rule(variant):
    cls, ref, kwargs = VARIANTS[variant]
    params = make_params()
    run(cls(params, **kwargs), params, GRADS)
    for k, p in params.items():
        want = ref(START[k], [g[k] for g in GRADS], **kwargs)
        np.testing.assert_allclose(p.data, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_updates_are_in_place_and_keep_the_dtype(variant):
    cls, _, kwargs = VARIANTS[variant]
    params = make_params(np.float32)
    data = {k: p.data for k, p in params.items()}
    run(cls(params, **kwargs), params, GRADS[:2])
    for k, p in params.items():
        assert p.data is data[k] and p.data.dtype == np.float32
        assert not np.array_equal(p.data, START[k].astype(np.float32))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_device_matches_numpy(variant, device):
    cls, ref, kwargs = VARIANTS[variant]
    params = {k: Parameter(device.asarray(v.copy())) for k, v in START.items()}  # own copy
    run(cls(params, **kwargs), params,
        [{k: device.asarray(v) for k, v in g.items()} for g in GRADS])
    for k, p in params.items():
        assert device.owns(p.data)
        np.testing.assert_allclose(gpunet.to_numpy(p.data),
                                   ref(START[k], [g[k] for g in GRADS], **kwargs), rtol=1e-10)


def test_sgd_momentum_by_hand():
    p = Parameter(np.array([1.0]))
    opt = SGD({"p": p}, lr=0.1, momentum=0.9)
    p.grad[...] = 0.5
    opt.step()  # buf = 0.5 (the gradient itself on the first step)
    assert p.data[0] == pytest.approx(0.95, abs=1e-15)
    opt.step()  # buf = 0.9 * 0.5 + 0.5 = 0.95
    assert p.data[0] == pytest.approx(0.855, abs=1e-15)


def test_adam_first_step_moves_each_weight_by_lr():
    # bias correction makes m_hat / sqrt(v_hat) = sign(g) on the first step
    p = Parameter(np.array([1.0, -2.0, 3.0]))
    p.grad[...] = [0.3, -7.0, 1e-3]
    Adam({"p": p}, lr=0.01, eps=1e-12).step()
    np.testing.assert_allclose(p.data, [0.99, -1.99, 2.99], rtol=1e-9)


def test_zero_grad_clears_every_gradient_in_place():
    params = make_params()
    grads = {k: p.grad for k, p in params.items()}
    for p in params.values():
        p.grad[...] = 3.0
    SGD(params, lr=0.1).zero_grad()
    for k, p in params.items():
        assert p.grad is grads[k] and not p.grad.any()


def test_slots_follow_a_model_moved_after_the_optimizer_was_built():
    params = make_params(np.float32)
    opt = Adam(params, lr=0.01)
    for p in params.values():  # what Layer.to(dtype=float64) does to each parameter
        p.data, p.grad = p.data.astype(np.float64), p.grad.astype(np.float64)
    run(opt, params, GRADS)
    for k, p in params.items():
        assert p.data.dtype == np.float64
        np.testing.assert_allclose(p.data, ref_adam(START[k].astype(np.float32).astype(
            np.float64), [g[k] for g in GRADS], lr=0.01), rtol=1e-12)


def test_optimizers_by_name():
    assert OPTIMIZERS == {"sgd": SGD, "rmsprop": RMSprop, "adam": Adam}


# -- state_dict ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_round_trip_continues_identically(variant):
    cls, _, kwargs = VARIANTS[variant]
    params = make_params()
    opt = cls(params, **kwargs)
    run(opt, params, GRADS[:3])
    state = opt.state_dict()
    clone = make_params(start={k: p.data for k, p in params.items()})
    resumed = cls(clone, lr=1.0, **{k: v for k, v in kwargs.items() if k != "lr"})
    resumed.load_state_dict(state)
    assert resumed.lr == kwargs["lr"] and resumed.step_count == 3
    run(opt, params, GRADS[3:])
    run(resumed, clone, GRADS[3:])
    for k in params:
        np.testing.assert_array_equal(clone[k].data, params[k].data)


def test_state_dict_is_a_host_snapshot():
    params = make_params()
    opt = Adam(params, lr=0.01)
    run(opt, params, GRADS[:2])
    state = opt.state_dict()
    assert state["lr"] == 0.01 and state["step"] == 2
    assert sorted(state["slots"]) == ["b.exp_avg", "b.exp_avg_sq", "w.exp_avg", "w.exp_avg_sq"]
    m = 0.9 * 0.1 * GRADS[0]["w"] + 0.1 * GRADS[1]["w"]  # exp_avg after two steps
    np.testing.assert_allclose(state["slots"]["w.exp_avg"], m, rtol=1e-12)
    run(opt, params, GRADS[2:3])
    np.testing.assert_allclose(state["slots"]["w.exp_avg"], m, rtol=1e-12)
    # loading shares nothing with the dict either
    opt.load_state_dict(state)
    run(opt, params, GRADS[3:4])
    np.testing.assert_allclose(state["slots"]["w.exp_avg"], m, rtol=1e-12)


def test_sgd_without_momentum_has_no_slots():
    assert SGD(make_params(), lr=0.1).state_dict()["slots"] == {}


def _changed(state: dict, key: str, value) -> dict:
    slots = dict(state["slots"])
    if value is None:
        del slots[key]
    else:
        slots[key] = value
    return {**state, "slots": slots}


@pytest.mark.parametrize("bad, match", [
    (lambda s: _changed(s, "w.exp_avg", None), r"missing \['w.exp_avg'\]"),
    (lambda s: _changed(s, "v.exp_avg", np.zeros((3, 2))), r"unexpected \['v.exp_avg'\]"),
    (lambda s: _changed(s, "w.exp_avg", np.zeros((2, 3))),
     r"'w.exp_avg' should have shape \(3, 2\), got \(2, 3\)"),
    (lambda s: {**s, "lr": -1.0}, "lr > 0"),
    (lambda s: {**s, "step": 1.5}, "step"),
    (lambda s: {"lr": 0.1, "step": 0}, "'slots'"),
])
def test_load_state_dict_rejects_a_bad_state_and_changes_nothing(bad, match):
    params = make_params()
    opt = Adam(params, lr=0.01)
    run(opt, params, GRADS[:2])
    good = opt.state_dict()
    other_params = make_params()
    other = Adam(other_params, lr=0.5)
    run(other, other_params, GRADS[2:3])
    with pytest.raises(ValueError, match=f"Adam.load_state_dict.*{match}"):
        opt.load_state_dict(bad(other.state_dict()))
    after = opt.state_dict()
    assert after["lr"] == good["lr"] and after["step"] == good["step"]
    for k, v in good["slots"].items():
        np.testing.assert_array_equal(after["slots"][k], v)


def test_load_state_dict_rejects_another_configuration():
    with_momentum = SGD(make_params(), lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match=r"SGD.load_state_dict.*unexpected \['b.momentum_buffer'"):
        SGD(make_params(), lr=0.1).load_state_dict(with_momentum)


# -- constructor checks --------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda p: SGD(p, lr=0.0), "SGD: expected lr > 0, got 0.0"),
    (lambda p: SGD(p, lr=0.1, nesterov=True), "SGD: expected nesterov only with momentum > 0"),
    (lambda p: SGD(p, lr=0.1, momentum=-0.5), "SGD: expected momentum in"),
    (lambda p: SGD(p, lr=0.1, weight_decay=-1), "SGD: expected weight_decay >= 0"),
    (lambda p: RMSprop(p, alpha=1.5), "RMSprop: expected alpha in"),
    (lambda p: RMSprop(p, eps=0), "RMSprop: expected eps > 0"),
    (lambda p: Adam(p, betas=(0.9, 1.0)), "Adam: expected beta2 in"),
    (lambda p: Adam(p, betas=0.9), "Adam: expected betas to be a pair"),
    (lambda p: Adam(p, lr=float("nan")), "Adam: expected lr > 0"),
    (lambda p: Adam({}, lr=0.1), "Adam: expected at least one parameter"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_params())


def test_params_must_be_a_dict_of_parameters():
    with pytest.raises(TypeError, match="SGD: expected params as a dict"):
        SGD(list(make_params().values()), lr=0.1)


# -- schedules -----------------------------------------------------------------------------
@pytest.mark.parametrize("make, want", [
    (lambda o: ExponentialDecay(o, gamma=0.5), [0.2 * 0.5 ** e for e in range(1, 6)]),
    (lambda o: StepDecay(o, step_size=2, gamma=0.1),
     [0.2, 0.2 * 0.1, 0.2 * 0.1, 0.2 * 0.01, 0.2 * 0.01]),
    (lambda o: InverseTimeDecay(o, decay_rate=0.5, decay_steps=2),
     [0.2 / 1.25, 0.2 / 1.5, 0.2 / 1.75, 0.2 / 2.0, 0.2 / 2.25]),
])
def test_schedule_sets_lr_each_epoch_and_resumes(make, want):
    opt = SGD(make_params(), lr=0.2)
    schedule = make(opt)
    seen = []
    for _ in range(5):
        schedule.step()
        seen.append(opt.lr)
    np.testing.assert_allclose(seen, want, rtol=1e-15)
    assert schedule.epoch == 5 and schedule.base_lr == 0.2
    resumed_opt = SGD(make_params(), lr=0.2)
    resumed = make(resumed_opt)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.epoch == 5 and resumed_opt.lr == pytest.approx(want[-1], rel=1e-15)


def test_schedule_rejects_bad_arguments_and_state():
    opt = SGD(make_params(), lr=0.2)
    with pytest.raises(ValueError, match="StepDecay: expected step_size to be an integer > 0"):
        StepDecay(opt, step_size=0)
    with pytest.raises(ValueError, match="ExponentialDecay: expected gamma > 0"):
        ExponentialDecay(opt, gamma=-1.0)
    with pytest.raises(ValueError, match="InverseTimeDecay.load_state_dict.*epoch"):
        InverseTimeDecay(opt, 0.5).load_state_dict({"epoch": -1, "base_lr": 0.2})


# -- clipping ------------------------------------------------------------------------------
def test_clip_grad_norm_scales_all_gradients_together():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros((1, 1)))
    a.grad[...], b.grad[...] = [3.0, 0.0], [[4.0]]
    assert clip_grad_norm({"a": a, "b": b}, max_norm=1.0) == pytest.approx(5.0, rel=1e-15)
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(a.grad, [3 * scale, 0.0], rtol=1e-15)
    np.testing.assert_allclose(b.grad, [[4 * scale]], rtol=1e-15)


def test_clip_grad_norm_leaves_small_gradients_and_takes_an_iterable():
    a = Parameter(np.zeros(2))
    a.grad[...] = [0.6, 0.8]
    assert clip_grad_norm([a], max_norm=2.0) == pytest.approx(1.0, rel=1e-15)
    np.testing.assert_array_equal(a.grad, [0.6, 0.8])
    with pytest.raises(ValueError, match="clip_grad_norm: expected max_norm > 0"):
        clip_grad_norm([a], 0)


def test_clip_grad_value():
    a, b = Parameter(np.zeros(3)), Parameter(np.zeros(2, dtype=np.float32))
    grads = (a.grad, b.grad)
    a.grad[...], b.grad[...] = [-5.0, 0.2, 3.0], [0.5, -0.7]
    clip_grad_value({"a": a, "b": b}, 0.5)
    assert a.grad is grads[0] and b.grad is grads[1]
    np.testing.assert_array_equal(a.grad, [-0.5, 0.2, 0.5])
    np.testing.assert_array_equal(b.grad, np.array([0.5, -0.5], dtype=np.float32))
    assert b.grad.dtype == np.float32
    with pytest.raises(ValueError, match="clip_grad_value: expected clip_value > 0"):
        clip_grad_value([a], -1.0)


def test_clip_grad_norm_matches_the_l2_norm_of_all_gradients():
    params = make_params()
    for k, p in params.items():
        p.grad[...] = GRADS[0][k]
    want = math.sqrt(sum((GRADS[0][k] ** 2).sum() for k in params))
    assert clip_grad_norm(params, max_norm=1e9) == pytest.approx(want, rel=1e-14)
