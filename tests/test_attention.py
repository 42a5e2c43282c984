"""MultiHeadAttention and AdditiveAttention: gradient checks (self, cross, masked, causal,
dropout), the forward against per-head loops, against PyTorch when it is installed, masks
(exact zeros, a query left without keys), bad inputs, and runs on the CuPy stand-in."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import gpunet
from gpunet import DTypeError, DeviceError, ShapeError, StateError, gradcheck, parity
from gpunet.backends import to_numpy
from gpunet.layers import AdditiveAttention, MultiHeadAttention, from_config
from gpunet.parity import _Masked
from helpers import assert_refused

R = np.random.default_rng(11)


def perturbed(layer):
    """``layer`` in float64 with every parameter nudged, so zero biases take part too."""
    layer.to(dtype=np.float64)
    for p in layer.params().values():
        p.data += R.normal(size=p.shape) * 0.2
    return layer


def mha_loops(query, key, value, layer, mask=None, causal=False):
    """``(y, weights)`` of multi-head attention, per batch entry, head and query in plain
    Python over the allowed keys: an implementation independent of gpunet's."""
    (steps, batch, e), keys, heads = query.shape, key.shape[0], layer.num_heads
    d = e // heads
    w = to_numpy(layer.in_proj_weight.data)
    b = np.zeros(3 * e) if layer.in_proj_bias is None else to_numpy(layer.in_proj_bias.data)
    wo = to_numpy(layer.out_proj.weight.data)
    bo = np.zeros(e) if layer.out_proj.bias is None else to_numpy(layer.out_proj.bias.data)
    y, weights = np.zeros((steps, batch, e)), np.zeros((batch, heads, steps, keys))
    for n in range(batch):
        q = query[:, n] @ w[:e].T + b[:e]
        k = key[:, n] @ w[e:2 * e].T + b[e:2 * e]
        v = value[:, n] @ w[2 * e:].T + b[2 * e:]
        context = np.zeros((steps, e))
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for i in range(steps):
                allowed = [j for j in range(keys) if not (mask is not None and mask[n, j])
                           and not (causal and j > i)]
                scores = {j: float(q[i, cols] @ k[j, cols]) / math.sqrt(d) for j in allowed}
                top = max(scores.values())
                total = sum(math.exp(s - top) for s in scores.values())
                for j in allowed:
                    weights[n, h, i, j] = math.exp(scores[j] - top) / total
                    context[i, cols] += weights[n, h, i, j] * v[j, cols]
        y[:, n] = context @ wo.T + bo
    return y, weights


def additive_loops(query, key, value, layer, mask=None):
    """``(context, alpha)`` of additive attention, entry by entry."""
    (steps, batch, _), keys = query.shape, key.shape[0]
    wq, wk, v = (to_numpy(p.data) for p in (layer.query_weight, layer.key_weight, layer.v))
    context, alpha = np.zeros((steps, batch, value.shape[2])), np.zeros((batch, steps, keys))
    for n in range(batch):
        for t in range(steps):
            allowed = [s for s in range(keys) if mask is None or not mask[n, s]]
            e = {s: float(v @ np.tanh(wq @ query[t, n] + wk @ key[s, n])) for s in allowed}
            total = sum(math.exp(x) for x in e.values())
            for s in allowed:
                alpha[n, t, s] = math.exp(e[s]) / total
                context[t, n] += alpha[n, t, s] * value[s, n]
    return context, alpha


def sequences(*shapes):
    return [R.normal(size=s) for s in shapes]


# -- gradient checks (float64, central differences) ---------------------------------------------
PAD = np.array([[False, True, False, True], [False, False, False, True]])
GRADCHECKS = {
    "self": (lambda: MultiHeadAttention(6, 2), lambda: R.normal(size=(3, 2, 6))),
    "self-no-bias": (lambda: MultiHeadAttention(4, 4, bias=False),
                     lambda: R.normal(size=(3, 2, 4))),
    "cross": (lambda: MultiHeadAttention(4, 2), lambda: sequences((2, 2, 4), (4, 2, 4), (4, 2, 4))),
    "cross-causal": (lambda: MultiHeadAttention(4, 2, causal=True),
                     lambda: sequences((3, 2, 4), (4, 2, 4), (4, 2, 4))),
    "masked": (lambda: _Masked(MultiHeadAttention(4, 2), PAD.tolist()),
               lambda: R.normal(size=(4, 2, 4))),
    "causal": (lambda: MultiHeadAttention(4, 2, causal=True), lambda: R.normal(size=(4, 2, 4))),
    "causal-masked": (lambda: _Masked(MultiHeadAttention(4, 2, causal=True), PAD.tolist()),
                      lambda: R.normal(size=(4, 2, 4))),
    "batch-first-cross": (lambda: MultiHeadAttention(4, 2, batch_first=True),
                          lambda: sequences((2, 3, 4), (2, 4, 4), (2, 4, 4))),
    "dropout": (lambda: MultiHeadAttention(4, 2, dropout=0.4), lambda: R.normal(size=(4, 2, 4))),
    "dropout-masked": (lambda: _Masked(MultiHeadAttention(4, 2, dropout=0.3), PAD.tolist()),
                       lambda: R.normal(size=(4, 2, 4))),
    "additive": (lambda: AdditiveAttention(3, 2, 4),
                 lambda: sequences((3, 2, 3), (4, 2, 2), (4, 2, 3))),
    "additive-masked": (lambda: _Masked(AdditiveAttention(3, 2, 4), PAD.tolist()),
                        lambda: sequences((3, 2, 3), (4, 2, 2), (4, 2, 3))),
}


@pytest.mark.parametrize("name", GRADCHECKS)
def test_gradcheck(name):
    make_layer, make_input = GRADCHECKS[name]
    layer = perturbed(make_layer())
    report = gradcheck(layer, make_input())
    assert report.ok, str(report)
    assert set(report.errors) >= set(layer.params())


def test_dropout_draws_from_the_seeded_stream():
    layer = perturbed(MultiHeadAttention(4, 2, dropout=0.5))
    x = R.normal(size=(5, 2, 4))
    gpunet.seed(3)
    a = layer.forward(x)
    gpunet.seed(3)
    b = layer.forward(x)
    c = layer.forward(x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(b, c)
    # at eval time, and with dropout=0, there is no dropout
    plain = copy.deepcopy(layer)
    plain.dropout = 0.0
    np.testing.assert_array_equal(layer.forward(x, training=False), plain.forward(x))


# -- the forward against per-head loops ------------------------------------------------------
FORMULAS = {  # name -> (layer, inputs, key_padding_mask)
    "self": (lambda: MultiHeadAttention(6, 3), lambda: R.normal(size=(4, 3, 6)), None),
    "self-one-head": (lambda: MultiHeadAttention(4, 1, bias=False),
                      lambda: R.normal(size=(3, 2, 4)), None),
    "cross": (lambda: MultiHeadAttention(4, 2),
              lambda: sequences((3, 2, 4), (5, 2, 4), (5, 2, 4)), None),
    "masked": (lambda: MultiHeadAttention(4, 2),
               lambda: sequences((3, 2, 4), (4, 2, 4), (4, 2, 4)), PAD),
    "causal": (lambda: MultiHeadAttention(4, 2, causal=True), lambda: R.normal(size=(4, 2, 4)),
               None),
    "causal-cross-masked": (lambda: MultiHeadAttention(4, 2, causal=True),
                            lambda: sequences((5, 2, 4), (4, 2, 4), (4, 2, 4)), PAD),
}


@pytest.mark.parametrize("name", FORMULAS)
def test_forward_matches_loops(name):
    make_layer, make_input, mask = FORMULAS[name]
    layer = perturbed(make_layer())
    x = make_input()
    y = layer.forward(x, key_padding_mask=mask)
    q, k, v = x if isinstance(x, list) else (x, x, x)
    want_y, want_w = mha_loops(q, k, v, layer, mask, layer.causal)
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.attention_weights, want_w, rtol=1e-12, atol=1e-12)


def test_batch_first_is_the_transpose():
    layer = perturbed(MultiHeadAttention(4, 2, causal=True))
    flipped = copy.deepcopy(layer)
    flipped.batch_first = True
    x, dy = R.normal(size=(3, 2, 4)), R.normal(size=(3, 2, 4))
    y = layer.forward(x, key_padding_mask=PAD[:, :3])
    np.testing.assert_allclose(flipped.forward(x.transpose(1, 0, 2).copy(),
                                               key_padding_mask=PAD[:, :3]),
                               y.transpose(1, 0, 2), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(flipped.backward(dy.transpose(1, 0, 2).copy()),
                               layer.backward(dy).transpose(1, 0, 2), rtol=1e-13, atol=1e-14)


def test_one_array_three_times_adds_up_to_self_attention():
    layer = perturbed(MultiHeadAttention(4, 2))
    twin = copy.deepcopy(layer)
    x, dy = R.normal(size=(3, 2, 4)), R.normal(size=(3, 2, 4))
    np.testing.assert_allclose(layer.forward([x, x, x]), twin.forward(x), rtol=1e-13)
    grads = layer.backward(dy)
    assert isinstance(grads, list) and len(grads) == 3
    assert grads[0] is not grads[1] and not np.allclose(grads[0], grads[1])
    np.testing.assert_allclose(grads[0] + grads[1] + grads[2], twin.backward(dy), rtol=1e-12,
                               atol=1e-13)
    for name, p in layer.params().items():
        np.testing.assert_allclose(p.grad, twin.params()[name].grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("masked", [False, True])
def test_additive_forward_matches_loops(masked):
    layer = perturbed(AdditiveAttention(3, 2, 5))
    q, k, v = sequences((3, 2, 3), (4, 2, 2), (4, 2, 3))
    mask = PAD if masked else None
    y = layer.forward([q, k, v], key_padding_mask=mask)
    want_y, want_alpha = additive_loops(q, k, v, layer, mask)
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.attention_weights, want_alpha, rtol=1e-12, atol=1e-12)


def test_parameters_as_pytorch_names_them_and_initialises_them():
    gpunet.seed(0)
    layer = MultiHeadAttention(64, 4)
    shapes = {k: p.shape for k, p in layer.params().items()}
    assert shapes == {"in_proj_weight": (192, 64), "in_proj_bias": (192,),
                      "out_proj.weight": (64, 64), "out_proj.bias": (64,)}
    assert list(MultiHeadAttention(8, 2, bias=False).params()) == ["in_proj_weight",
                                                                    "out_proj.weight"]
    w, wo = layer.in_proj_weight.data, layer.out_proj.weight.data
    xavier, linear = math.sqrt(6 / (64 + 192)), 1 / math.sqrt(64)
    assert 0.95 * xavier < np.abs(w).max() <= xavier
    assert 0.95 * linear < np.abs(wo).max() <= linear
    assert not layer.in_proj_bias.data.any() and not layer.out_proj.bias.data.any()
    additive = AdditiveAttention(9, 16, 25)
    assert {k: p.shape for k, p in additive.params().items()} == {
        "query_weight": (25, 9), "key_weight": (25, 16), "v": (25,)}
    assert 0.9 / 4 < np.abs(additive.key_weight.data).max() <= 1 / 4


def test_rebuilt_from_config_and_copied_without_weights_of_a_forward():
    layer = MultiHeadAttention(8, 2, dropout=0.1, bias=False, batch_first=True, causal=True)
    again = from_config(layer.config())
    assert again.config() == layer.config()
    assert (again.num_heads, again.head_dim, again.causal) == (2, 4, True)
    layer.forward(R.normal(size=(2, 3, 8)).astype(np.float32))
    assert layer.attention_weights.shape == (2, 2, 3, 3)
    assert copy.deepcopy(layer).attention_weights is None


def test_no_input_gradient_when_not_needed():
    layer = perturbed(MultiHeadAttention(4, 2))
    twin = copy.deepcopy(layer).set_input_grad(False)
    xs, dy = sequences((3, 2, 4), (2, 2, 4), (2, 2, 4)), R.normal(size=(3, 2, 4))
    layer.forward(xs), twin.forward(xs)
    layer.backward(dy)
    assert twin.backward(dy) == [None, None, None]
    for name, p in layer.params().items():
        np.testing.assert_allclose(twin.params()[name].grad, p.grad, rtol=1e-13)
    single = copy.deepcopy(layer).set_input_grad(False)
    single.forward(xs[0])
    assert single.backward(dy) is None


# -- against PyTorch (a test oracle; CI has no torch) -----------------------------------------
TORCH_CASES = {  # name -> (MultiHeadAttention args, input shapes, key_padding_mask)
    "self": (dict(embed_dim=6, num_heads=2), [(4, 3, 6)], None),
    "cross-masked": (dict(embed_dim=4, num_heads=2), [(3, 2, 4), (4, 2, 4), (4, 2, 4)], PAD),
    "causal": (dict(embed_dim=4, num_heads=4, causal=True), [(4, 2, 4)], None),
    "causal-masked-no-bias": (dict(embed_dim=4, num_heads=2, causal=True, bias=False),
                              [(4, 2, 4)], PAD),
    "batch-first": (dict(embed_dim=6, num_heads=3, batch_first=True), [(2, 5, 6)], None),
}


@pytest.mark.parametrize("name", TORCH_CASES)
def test_matches_torch(name):
    torch = pytest.importorskip("torch")
    args, shapes, mask = TORCH_CASES[name]
    layer = perturbed(MultiHeadAttention(**args))
    reference = torch.nn.MultiheadAttention(
        args["embed_dim"], args["num_heads"], bias=args.get("bias", True),
        batch_first=args.get("batch_first", False), dtype=torch.float64)
    with torch.no_grad():
        for k, p in reference.named_parameters():
            p.copy_(torch.from_numpy(layer.params()[k].data))
    xs = [R.normal(size=s) for s in shapes]
    txs = [torch.tensor(x, requires_grad=True) for x in xs]
    tq, tk, tv = txs if len(txs) == 3 else txs * 3
    axis = 1 if args.get("batch_first") else 0  # of the steps
    attn_mask = (torch.triu(torch.ones(tq.shape[axis], tk.shape[axis], dtype=torch.bool), 1)
                 if args.get("causal") else None)
    y_ref, w_ref = reference(tq, tk, tv, key_padding_mask=None if mask is None
                             else torch.from_numpy(mask), attn_mask=attn_mask,
                             need_weights=True, average_attn_weights=False)
    dy = R.normal(size=tuple(y_ref.shape))
    y_ref.backward(torch.from_numpy(dy))

    y = layer.forward(xs if len(xs) == 3 else xs[0], key_padding_mask=mask)
    np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.attention_weights, w_ref.detach().numpy(), rtol=1e-10,
                               atol=1e-12)
    dxs = layer.backward(dy)
    for dx, t in zip(dxs if len(xs) == 3 else [dxs], txs):
        np.testing.assert_allclose(dx, t.grad.numpy(), rtol=1e-9, atol=1e-12)
    for k, p in reference.named_parameters():
        np.testing.assert_allclose(layer.params()[k].grad, p.grad.numpy(), rtol=1e-9, atol=1e-12)


# -- masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_keys_get_exactly_zero_weight_and_gradient(dtype):
    mask = np.array([[False, True, True, False, True], [True, True, True, True, False]])
    layer = MultiHeadAttention(4, 2, dropout=0.3, causal=False).to(dtype=dtype)
    q, k, v = (a.astype(dtype) for a in sequences((3, 2, 4), (5, 2, 4), (5, 2, 4)))
    k *= 30  # large scores: the softmax must still subtract the maximum of the kept keys
    layer.forward([q, k, v], key_padding_mask=mask)
    w = layer.attention_weights
    assert np.all(w.transpose(1, 2, 0, 3)[:, :, mask] == 0)
    np.testing.assert_allclose(w.sum(axis=-1), 1, rtol=1e-6)
    assert np.isfinite(w).all()
    _, dk, dv = layer.backward(R.normal(size=(3, 2, 4)).astype(dtype))
    assert np.all(dk.transpose(1, 0, 2)[mask] == 0) and np.all(dv.transpose(1, 0, 2)[mask] == 0)

    additive = AdditiveAttention(4, 4, 3).to(dtype=dtype)
    additive.forward([q, k, v], key_padding_mask=mask)
    assert np.all(additive.attention_weights.transpose(1, 0, 2)[:, mask] == 0)


def test_causal_weights_are_zero_after_each_query():
    layer = MultiHeadAttention(4, 2, causal=True)
    layer.forward(R.normal(size=(5, 2, 4)).astype(np.float32))
    upper = np.triu(np.ones((5, 5), dtype=bool), 1)
    assert np.all(layer.attention_weights[..., upper] == 0)
    assert np.all(layer.attention_weights[..., ~upper] > 0)


def test_a_query_without_keys_is_an_error_not_nan():
    layer = MultiHeadAttention(4, 2)
    x = R.normal(size=(4, 3, 4)).astype(np.float32)
    mask = np.zeros((3, 4), dtype=bool)
    mask[1] = True
    with pytest.raises(ValueError, match="MultiHeadAttention: key_padding_mask masks every "
                       "key of batch entry 1; each query needs at least one key"):
        layer.forward(x, key_padding_mask=mask)
    with pytest.raises(StateError):  # nothing was kept for a backward
        layer.backward(x)
    with pytest.raises(ValueError, match="AdditiveAttention: key_padding_mask masks every key "
                       "of batch entry 1"):
        AdditiveAttention(4, 4, 2).forward([x, x, x], key_padding_mask=mask)
    mask[1] = False
    mask[2, :2] = True  # query 0 may see key 0 only, query 1 keys 0 and 1: all masked
    with pytest.raises(ValueError, match=r"MultiHeadAttention: key_padding_mask and "
                       r"causal=True leave query 0 of batch entry 2 no key to attend to "
                       r"\(it may only see keys 0..0, all masked\)"):
        MultiHeadAttention(4, 2, causal=True).forward(x, key_padding_mask=mask)


def assert_forward_refused(layer, x, error, match, **kwargs):
    with pytest.raises(error, match=match):
        layer.forward(x, **kwargs)


def test_bad_mask():
    layer = MultiHeadAttention(4, 2)
    x = R.normal(size=(3, 2, 4)).astype(np.float32)
    assert_forward_refused(layer, x, ShapeError, r"MultiHeadAttention: expected key_padding_mask"
                           r" of shape \(N, S\) = \(2, 3\), got \(3, 2\)",
                           key_padding_mask=np.zeros((3, 2), dtype=bool))
    assert_forward_refused(layer, x, DTypeError, "expected key_padding_mask of dtype bool "
                           r"\(True = ignore that key\), got float32",
                           key_padding_mask=np.zeros((2, 3), dtype=np.float32))
    assert_forward_refused(layer, x, DTypeError, "expected key_padding_mask to be a boolean "
                           "array, got list", key_padding_mask=[[False] * 3] * 2)
    additive = AdditiveAttention(4, 4, 2)
    assert_forward_refused(additive, [x, x[:2], x[:2]], ShapeError,
                           r"AdditiveAttention: expected key_padding_mask of shape \(N, S\) = "
                           r"\(2, 2\), got \(2, 3\)", key_padding_mask=np.zeros((2, 3), bool))


# -- bad arguments and inputs -----------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    ((6, 4), "expected embed_dim divisible by num_heads, got embed_dim=6 and num_heads=4"),
    ((4, 0), "expected num_heads to be a positive integer, got 0"),
    ((0, 1), "expected embed_dim to be a positive integer, got 0"),
    ((4, 2, 1.0), r"expected dropout in \[0, 1\), got 1.0"),
])
def test_bad_multihead_arguments(args, match):
    with pytest.raises(ValueError, match="MultiHeadAttention: " + match):
        MultiHeadAttention(*args)


def test_bad_additive_arguments():
    with pytest.raises(ValueError, match="AdditiveAttention: expected hidden_dim to be a "
                       "positive integer, got 0"):
        AdditiveAttention(3, 3, 0)


def f32(*shape):
    return R.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("layer, x, error, match", [
    (MultiHeadAttention(4, 2), f32(3, 2, 5), ShapeError,
     r"MultiHeadAttention: expected input of shape \(L, N, 4\), got \(3, 2, 5\)"),
    (MultiHeadAttention(4, 2), f32(3, 4), ShapeError,
     r"expected input of shape \(L, N, 4\), got \(3, 4\)"),
    (MultiHeadAttention(4, 2, batch_first=True), f32(2, 3), ShapeError,
     r"expected input of shape \(N, L, 4\), got \(2, 3\)"),
    (MultiHeadAttention(4, 2), R.normal(size=(3, 2, 4)), DTypeError,
     "expected input of dtype float32, got float64"),
    (MultiHeadAttention(4, 2), [f32(3, 2, 4), f32(3, 2, 4)], ShapeError,
     "expected 3 inputs, got 2"),
    (MultiHeadAttention(4, 2), [f32(3, 2, 4), f32(5, 2, 4), f32(4, 2, 4)], ShapeError,
     r"expected key and value of one shape \(S, N, 4\), got \(5, 2, 4\) and \(4, 2, 4\)"),
    (MultiHeadAttention(4, 2), [f32(3, 2, 4), f32(5, 3, 4), f32(5, 3, 4)], ShapeError,
     r"expected key and value with the batch size of the query, 2, got shape \(5, 3, 4\)"),
    (MultiHeadAttention(4, 2), [f32(3, 2, 4), f32(5, 2, 3), f32(5, 2, 4)], ShapeError,
     r"expected key of shape \(S, N, 4\), got \(5, 2, 3\)"),
    (AdditiveAttention(3, 2, 4), f32(3, 2, 3), ShapeError,
     "AdditiveAttention: expected a list of input arrays, got ndarray"),
    (AdditiveAttention(3, 2, 4), [f32(3, 2, 3), f32(4, 2, 3), f32(4, 2, 1)], ShapeError,
     r"expected key of shape \(S, N, 2\), got \(4, 2, 3\)"),
    (AdditiveAttention(3, 2, 4), [f32(3, 2, 3), f32(4, 2, 2), f32(5, 2, 1)], ShapeError,
     r"expected value of shape \(S, N, Dv\) with the S and N of the key \(4, 2, 2\), "
     r"got \(5, 2, 1\)"),
    (AdditiveAttention(3, 2, 4), [f32(3, 1, 3), f32(4, 2, 2), f32(4, 2, 1)], ShapeError,
     "expected key and value with the batch size of the query, 1"),
])
def test_bad_inputs(layer, x, error, match):
    assert_refused(layer, x, error, match)


def test_bad_output_gradient():
    layer = MultiHeadAttention(4, 2, batch_first=True)
    with pytest.raises(StateError, match="MultiHeadAttention: backward called before forward"):
        layer.backward(f32(2, 3, 4))
    layer.forward(f32(2, 3, 4))
    with pytest.raises(ShapeError, match=r"expected output gradient of shape \(2, 3, 4\), "
                       r"got \(3, 2, 4\)"):
        layer.backward(f32(3, 2, 4))
    additive = AdditiveAttention(3, 2, 4)
    additive.forward([f32(3, 2, 3), f32(4, 2, 2), f32(4, 2, 5)])
    with pytest.raises(ShapeError, match=r"AdditiveAttention: expected output gradient of "
                       r"shape \(3, 2, 5\)"):
        additive.backward(f32(3, 2, 4))


# -- on the CuPy stand-in's GPUs (the real CudaBackend) ---------------------------------------
def test_on_a_standin_gpu(standin):
    """Same results as on the host; no host read or upload without a mask, one read (the
    check for a query left without keys) with one."""
    device = gpunet.device("cuda:1")
    layer = perturbed(MultiHeadAttention(4, 2, dropout=0.2, causal=True))
    host = copy.deepcopy(layer)
    layer.to(device)
    x, dy = R.normal(size=(4, 2, 4)), R.normal(size=(4, 2, 4))
    mask = np.array([[False, False, True, False], [False, True, False, False]])
    on_gpu = [device.asarray(a) for a in (x, dy, mask)]
    counters = standin._standin.counters
    for key_padding_mask, reads in ((None, 0), (on_gpu[2], 1)):
        counters.reset()
        layer.forward(on_gpu[0], key_padding_mask=key_padding_mask)
        layer.backward(on_gpu[1])
        assert (counters.host_reads, counters.uploads) == (reads, 0), counters.as_dict()
    y = layer.forward(on_gpu[0], training=False, key_padding_mask=on_gpu[2])
    np.testing.assert_allclose(y.get(), host.forward(x, False, key_padding_mask=mask),
                               rtol=1e-12)
    assert layer.attention_weights.device.id == 1
    with pytest.raises(DeviceError, match="expected key_padding_mask on device cuda:1, "
                       "got an array on cpu"):
        layer.forward(on_gpu[0], key_padding_mask=mask)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="leave query 0 of batch entry 0 no key"):
        layer.forward(on_gpu[0], key_padding_mask=device.asarray(mask))


def test_parity_cases_cover_both_layers():
    built = {type(parity.CASES[n].build()).__name__ for n in parity.CASES if "Attention" in n}
    assert {"MultiHeadAttention", "AdditiveAttention"} <= built
