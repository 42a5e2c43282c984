"""Embeddings: CosineSimilarity and L2Normalize, the triplet and cosine-embedding losses, the
in-batch triplet mining loss, nearest-neighbour accuracy and PCA, and `gpunet train embed`.
Values against formulas written here independently (loops over rows and triplets), gradients
against float64 central differences, PyTorch as an oracle where it is installed."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

import gpunet
from gpunet import DeviceError, DTypeError, ShapeError, StateError, gradcheck
from gpunet.cli import main
from gpunet.embeddings import batch_nn_accuracy, nearest_neighbour_accuracy, pca_2d
from gpunet.layers import CosineSimilarity, L2Normalize
from gpunet.losses import BatchTripletLoss, CosineEmbeddingLoss, TripletLoss
from helpers import train_command

R = np.random.default_rng(41)


def numeric_grads(loss, xs: list[np.ndarray], target=None, h: float = 1e-6) -> list[np.ndarray]:
    """Central differences of ``loss.forward(xs, target)`` (a list of float64 arrays) with
    respect to each entry of each array."""
    grads = []
    for k, x in enumerate(xs):
        grad = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            up, down = [a.copy() for a in xs], [a.copy() for a in xs]
            up[k][i] += h
            down[k][i] -= h
            grad[i] = (float(loss.forward(up, target))
                       - float(loss.forward(down, target))) / (2 * h)
        grads.append(grad)
    return grads


def norm(v: np.ndarray) -> float:
    return math.sqrt(sum(float(a) ** 2 for a in v))


# -- CosineSimilarity and L2Normalize --------------------------------------------------------
def test_cosine_similarity_matches_the_formula_row_by_row():
    x1, x2 = R.normal(size=(5, 4)), R.normal(size=(5, 4))
    want = [float(a @ b) / (norm(a) * norm(b)) for a, b in zip(x1, x2)]
    np.testing.assert_allclose(CosineSimilarity().forward([x1, x2]), want, rtol=1e-13)


def test_cosine_similarity_along_a_middle_axis():
    x1, x2 = R.normal(size=(2, 3, 4)), R.normal(size=(2, 3, 4))
    y = CosineSimilarity(axis=1).forward([x1, x2])
    assert y.shape == (2, 4)
    for n in range(2):
        for j in range(4):
            a, b = x1[n, :, j], x2[n, :, j]
            assert y[n, j] == pytest.approx(float(a @ b) / (norm(a) * norm(b)), rel=1e-13)


def test_cosine_similarity_clamps_each_norm_on_its_own():
    # PyTorch 2: x1.x2 / (max(|x1|, eps) max(|x2|, eps)), not x1.x2 / max(|x1| |x2|, eps)
    x1 = np.array([[1e-9, 0.0, 0.0], [3.0, 4.0, 0.0]])
    x2 = np.array([[1.0, 0.0, 0.0], [1e-10, 0.0, 0.0]])
    y = CosineSimilarity(eps=1e-8).forward([x1, x2])
    np.testing.assert_allclose(y, [1e-9 / 1e-8, 3e-10 / (5 * 1e-8)], rtol=1e-12)
    assert CosineSimilarity().forward([np.zeros((1, 3)), np.ones((1, 3))])[0] == 0.0


def test_cosine_similarity_gradient_where_a_norm_is_clamped_treats_it_as_constant():
    x1, x2 = np.array([[1e-9, 2e-9]]), np.array([[3.0, -1.0]])
    layer = CosineSimilarity(eps=1e-8)
    layer.forward([x1, x2])
    dx1, dx2 = layer.backward(np.array([1.0]))
    y = float(x1[0] @ x2[0]) / (1e-8 * norm(x2[0]))
    np.testing.assert_allclose(dx1, x2 / (1e-8 * norm(x2[0])), rtol=1e-12)  # linear in x1
    np.testing.assert_allclose(dx2, x1 / (1e-8 * norm(x2[0])) - y * x2 / norm(x2[0]) ** 2,
                               rtol=1e-10)


def test_l2_normalize_matches_the_formula():
    x = R.normal(size=(4, 6))
    want = np.array([[v / norm(row) for v in row] for row in x])
    np.testing.assert_allclose(L2Normalize().forward(x), want, rtol=1e-13)
    np.testing.assert_allclose(L2Normalize(axis=0).forward(x), x / np.sqrt((x ** 2).sum(0)),
                               rtol=1e-13)
    assert np.all(L2Normalize().forward(np.zeros((2, 3))) == 0)  # max(|x|, eps): no NaN


@pytest.mark.parametrize("layer, inputs", [
    (CosineSimilarity(), [R.normal(size=(4, 5)), R.normal(size=(4, 5))]),
    (CosineSimilarity(axis=0, eps=1e-3), [R.normal(size=(3, 2, 2)), R.normal(size=(3, 2, 2))]),
    (L2Normalize(), R.normal(size=(4, 5))),
    (L2Normalize(axis=1), R.normal(size=(2, 3, 4))),
])
def test_layer_gradcheck(layer, inputs):
    report = gradcheck(layer, inputs)
    assert report.ok, report


def test_layers_against_torch():
    torch = pytest.importorskip("torch")
    x1, x2, dy = R.normal(size=(6, 5)), R.normal(size=(6, 5)), R.normal(size=6)
    layer = CosineSimilarity()
    y = layer.forward([x1, x2])
    dx1, dx2 = layer.backward(dy)
    t1, t2 = (torch.tensor(a, requires_grad=True) for a in (x1, x2))
    ty = torch.nn.CosineSimilarity(dim=-1, eps=1e-8)(t1, t2)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(dx1, t1.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(dx2, t2.grad.numpy(), rtol=1e-10, atol=1e-14)
    # torch clamps each norm too (forward); only its backward at a clamped norm differs
    tiny = [np.array([[1e-9, 0.0, 0.0]]), np.array([[1.0, 0.0, 0.0]])]
    np.testing.assert_allclose(
        CosineSimilarity().forward(tiny),
        torch.nn.functional.cosine_similarity(*map(torch.tensor, tiny), dim=-1).numpy(),
        rtol=1e-12)

    x, dy = R.normal(size=(4, 3)), R.normal(size=(4, 3))
    norm_layer = L2Normalize()
    y = norm_layer.forward(x)
    dx = norm_layer.backward(dy)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.normalize(tx, dim=-1)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("inputs, error, match", [
    (np.zeros((2, 3)), ShapeError, "CosineSimilarity: expected a list of input arrays"),
    ([np.zeros((2, 3))] * 3, ShapeError, "CosineSimilarity: expected 2 inputs, got 3"),
    ([np.zeros((2, 3)), np.zeros((2, 4))], ShapeError,
     r"CosineSimilarity: expected input 1 of input 0's shape \(2, 3\), got \(2, 4\)"),
    ([np.zeros((2, 3)), np.zeros((2, 3), np.float32)], DTypeError,
     "CosineSimilarity: expected input 1 of input 0's dtype float64, got float32"),
    ([np.zeros((2, 3), np.int64)] * 2, DTypeError, "CosineSimilarity: expected input 0 of dtype"),
])
def test_cosine_similarity_bad_inputs(inputs, error, match):
    with pytest.raises(error, match=match):
        CosineSimilarity().forward(inputs)


def test_similarity_layers_bad_axis_eps_and_gradient():
    with pytest.raises(ShapeError, match=r"CosineSimilarity: expected input with axis 2, got "
                                         r"shape \(2, 3\)"):
        CosineSimilarity(axis=2).forward([np.zeros((2, 3))] * 2)
    with pytest.raises(ShapeError, match=r"L2Normalize: expected input with axis -3"):
        L2Normalize(axis=-3).forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="CosineSimilarity: expected eps > 0, got 0"):
        CosineSimilarity(eps=0)
    with pytest.raises(ValueError, match="L2Normalize: expected eps > 0, got -1"):
        L2Normalize(eps=-1)
    layer = CosineSimilarity()
    layer.forward([np.ones((2, 3))] * 2)
    with pytest.raises(ShapeError, match=r"CosineSimilarity: expected output gradient of "
                                         r"shape \(2\), got \(2, 3\)"):
        layer.backward(np.ones((2, 3)))


# -- TripletLoss ------------------------------------------------------------------------------
TRIPLET = [R.normal(size=(6, 4)) for _ in range(3)]


def triplet_reference(a, p, n, margin, distance) -> list[float]:
    """One loss per triplet, row by row in Python floats."""
    def d(u, v):
        if distance == "squared":
            return sum((float(x) - float(y)) ** 2 for x, y in zip(u, v))
        return math.sqrt(sum((float(x) - float(y) + 1e-6) ** 2 for x, y in zip(u, v)))
    return [max(0.0, d(ai, pi) - d(ai, ni) + margin) for ai, pi, ni in zip(a, p, n)]


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
@pytest.mark.parametrize("margin", [0.0, 0.2, 2.0])
def test_triplet_matches_the_formula(distance, margin):
    want = triplet_reference(*TRIPLET, margin, distance)
    assert 0 < sum(w > 0 for w in want) < 6 or margin == 2.0  # some hinges active, some not
    value = TripletLoss(margin, distance).forward(TRIPLET)
    assert np.ndim(value) == 0
    assert value == pytest.approx(sum(want) / 6, rel=1e-12)
    assert TripletLoss(margin, distance, reduction="sum")(TRIPLET) == pytest.approx(sum(want),
                                                                                   rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_triplet_gradient(distance, reduction):
    loss = TripletLoss(1.0, distance, reduction)
    loss.forward(TRIPLET)
    got = loss.backward()
    assert isinstance(got, list) and len(got) == 3
    for g, want in zip(got, numeric_grads(loss, TRIPLET)):
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-8)


def test_euclidean_triplet_is_torchs_triplet_margin_loss():
    torch = pytest.importorskip("torch")
    loss = TripletLoss(1.0, "euclidean")
    value = loss.forward(TRIPLET)
    grads = loss.backward()
    ts = [torch.tensor(x, requires_grad=True) for x in TRIPLET]
    want = torch.nn.TripletMarginLoss(margin=1.0)(*ts)
    want.backward()
    assert float(value) == pytest.approx(want.item(), rel=1e-12)
    for g, t in zip(grads, ts):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_triplet_float32_stays_float32():
    loss = TripletLoss()
    value = loss.forward([x.astype(np.float32) for x in TRIPLET])
    assert value.dtype == np.float32
    assert all(g.dtype == np.float32 for g in loss.backward())


@pytest.mark.parametrize("inputs, error, match", [
    (TRIPLET[0], ShapeError, r"TripletLoss: expected a list \[anchor, positive, negative\], "
                             "got ndarray"),
    (TRIPLET[:2], ShapeError, r"TripletLoss: expected a list .* of 3 arrays, got 2"),
    ([TRIPLET[0], TRIPLET[1][:5], TRIPLET[2]], ShapeError,
     r"TripletLoss: expected positive of shape \(6, 4\) \(the anchor's\), got \(5, 4\)"),
    ([TRIPLET[0], TRIPLET[1], TRIPLET[2].astype(np.float32)], DTypeError,
     "TripletLoss: expected negative of dtype float64 .*got float32"),
    ([np.zeros(4)] * 3, ShapeError, r"TripletLoss: expected anchor of shape \(N, D\)"),
    ([np.zeros((2, 2), np.int64)] * 3, DTypeError, "TripletLoss: expected anchor of dtype "
                                                   "float32 or float64, got int64"),
    ([TRIPLET[0], [[0.0] * 4] * 6, TRIPLET[2]], DTypeError,
     "TripletLoss: expected positive to be an array, got list"),
])
def test_triplet_bad_inputs(inputs, error, match):
    with pytest.raises(error, match=match):
        TripletLoss().forward(inputs)


def test_losses_bad_arguments():
    with pytest.raises(ValueError, match="TripletLoss: expected margin >= 0, got -0.1"):
        TripletLoss(-0.1)
    with pytest.raises(ValueError, match="TripletLoss: expected distance 'squared' or "
                                         "'euclidean', got 'cosine'"):
        TripletLoss(distance="cosine")
    with pytest.raises(ValueError, match=r"CosineEmbeddingLoss: expected margin in \[-1, 1\]"):
        CosineEmbeddingLoss(1.5)
    with pytest.raises(ValueError, match="BatchTripletLoss: expected mining 'hard' or "
                                         "'semi-hard', got 'easy'"):
        BatchTripletLoss(mining="easy")
    with pytest.raises(ValueError, match="BatchTripletLoss: expected reduction"):
        BatchTripletLoss(reduction="none")


@pytest.mark.parametrize("make, args", [
    (TripletLoss, (TRIPLET,)),
    (CosineEmbeddingLoss, (TRIPLET[:2], np.ones(6))),
    (BatchTripletLoss, (TRIPLET[0], np.arange(6) % 2)),
])
def test_backward_before_forward_or_twice(make, args):
    loss = make()
    with pytest.raises(StateError, match=make.__name__):
        loss.backward()
    loss.forward(*args)
    loss.backward()
    with pytest.raises(StateError, match=make.__name__):
        loss.backward()


# -- CosineEmbeddingLoss ----------------------------------------------------------------------
PAIR = [R.normal(size=(8, 3)), R.normal(size=(8, 3))]
SIGNS = np.array([1, -1, 1, -1, -1, 1, -1, -1])


def cosine_embedding_reference(x1, x2, y, margin) -> list[float]:
    e = 9.999999960041972e-13  # PyTorch's EPSILON, 1e-12 as a C float
    out = []
    for a, b, t in zip(x1, x2, y):
        cos = float(a @ b) / math.sqrt((norm(a) ** 2 + e) * (norm(b) ** 2 + e))
        out.append(1 - cos if t == 1 else max(0.0, cos - margin))
    return out


@pytest.mark.parametrize("margin", [-0.5, 0.0, 0.3])
def test_cosine_embedding_matches_the_formula(margin):
    want = cosine_embedding_reference(*PAIR, SIGNS, margin)
    assert CosineEmbeddingLoss(margin).forward(PAIR, SIGNS) == pytest.approx(np.mean(want),
                                                                            rel=1e-12)
    assert CosineEmbeddingLoss(margin, "sum").forward(PAIR, SIGNS.astype(np.float32)) == \
        pytest.approx(sum(want), rel=1e-12)  # float targets are fine too


@pytest.mark.parametrize("margin", [-0.5, 0.0, 0.3])
def test_cosine_embedding_gradient(margin):
    loss = CosineEmbeddingLoss(margin)
    loss.forward(PAIR, SIGNS)
    for g, want in zip(loss.backward(), numeric_grads(loss, PAIR, SIGNS)):
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-8)


def test_cosine_embedding_is_torchs():
    torch = pytest.importorskip("torch")
    tiny = [np.vstack([PAIR[0], [[1e-7, 0, 0]]]), np.vstack([PAIR[1], [[1e-7, 0, 0]]])]
    y = np.append(SIGNS, 1)  # a near-zero pair: PyTorch's 1e-12 smoothing decides its cosine
    loss = CosineEmbeddingLoss(0.2)
    value = loss.forward(tiny, y)
    grads = loss.backward()
    ts = [torch.tensor(x, requires_grad=True) for x in tiny]
    want = torch.nn.CosineEmbeddingLoss(margin=0.2)(*ts, torch.tensor(y))
    want.backward()
    assert float(value) == pytest.approx(want.item(), rel=1e-12)
    for g, t in zip(grads, ts):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_cosine_embedding_bad_targets():
    with pytest.raises(ValueError, match="CosineEmbeddingLoss: expected targets 1 or -1, got 0"):
        CosineEmbeddingLoss().forward(PAIR, np.array([1, -1, 0, 1, 1, 1, 1, 1]))
    with pytest.raises(ShapeError, match=r"CosineEmbeddingLoss: expected the target of shape "
                                         r"\(8,\), one 1 or -1 per pair, got \(8, 1\)"):
        CosineEmbeddingLoss().forward(PAIR, SIGNS[:, None])
    with pytest.raises(DTypeError, match="CosineEmbeddingLoss: expected the target to be an "
                                         "array, got list"):
        CosineEmbeddingLoss().forward(PAIR, [1] * 8)
    with pytest.raises(ShapeError, match=r"CosineEmbeddingLoss: expected a list \[x1, x2\]"):
        CosineEmbeddingLoss().forward(PAIR[0], SIGNS)


def test_cosine_embedding_reports_bad_targets_on_a_gpu_without_reading_each_batch(standin):
    gpu = gpunet.device("cuda:1")
    loss, counters = CosineEmbeddingLoss(), standin._standin.counters
    pair = [gpu.asarray(x) for x in PAIR]
    counters.reset()
    good = loss(pair, gpu.asarray(SIGNS))
    bad = loss(pair, gpu.asarray(np.array([1, -1, 1, 2, -1, 1, -1, -1])))
    assert counters.host_reads == 0
    assert float(good) == pytest.approx(np.mean(cosine_embedding_reference(*PAIR, SIGNS, 0)))
    assert np.isnan(float(bad))
    with pytest.raises(ValueError, match="CosineEmbeddingLoss: expected targets 1 or -1, got 2"):
        loss.check()


def test_target_on_another_device(standin):
    gpu = gpunet.device("cuda:0")
    with pytest.raises(DeviceError, match="CosineEmbeddingLoss: expected the target on device "
                                          "cuda:0.*got an array on cpu"):
        CosineEmbeddingLoss().forward([gpu.asarray(x) for x in PAIR], SIGNS)
    with pytest.raises(DeviceError, match="TripletLoss: expected positive on device cpu "
                                          r"\(the anchor's\), got an array on cuda:0"):
        TripletLoss().forward([TRIPLET[0], gpu.asarray(TRIPLET[1]), TRIPLET[2]])


# -- BatchTripletLoss: triplets mined in the batch ------------------------------------------
EMB = R.normal(size=(14, 3))
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3, 0, 1, 2, 2, 1])  # class 3: no positive


def pair_distance(u, v, distance) -> float:
    return triplet_reference([u], [v], [u], 0.0, distance)[0] if distance == "squared" else \
        math.sqrt(sum((float(x) - float(y) + 1e-6) ** 2 for x, y in zip(u, v)))


def mined_reference(e, labels, margin, mining, distance) -> list[float]:
    """The loss of every counted anchor (hard) or anchor-positive pair (semi-hard), by loops."""
    n = len(e)
    d = [[pair_distance(e[i], e[j], distance) for j in range(n)] for i in range(n)]
    out = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [k for k in range(n) if labels[k] != labels[a]]
        if not pos or not neg:
            continue
        if mining == "hard":
            out.append(max(0.0, max(d[a][p] for p in pos) - min(d[a][k] for k in neg) + margin))
            continue
        for p in pos:
            farther = [d[a][k] for k in neg if d[a][k] > d[a][p]]
            d_an = min(farther) if farther else max(d[a][k] for k in neg)
            out.append(max(0.0, d[a][p] - d_an + margin))
    return out


MINING = [(m, d) for m in ("hard", "semi-hard") for d in ("squared", "euclidean")]


@pytest.mark.parametrize("mining, distance", MINING)
@pytest.mark.parametrize("margin", [0.2, 1.5])
def test_batch_triplet_matches_the_mined_triplets(mining, distance, margin):
    want = mined_reference(EMB, LABELS, margin, mining, distance)
    assert len(want) == (13 if mining == "hard" else 4 * 3 + 5 * 4 + 4 * 3)  # anchors; pairs
    loss = BatchTripletLoss(margin, mining, distance)
    assert loss.forward(EMB, LABELS) == pytest.approx(np.mean(want), rel=1e-12)
    total = BatchTripletLoss(margin, mining, distance, reduction="sum")
    assert total.forward(EMB, LABELS) == pytest.approx(sum(want), rel=1e-12)


@pytest.mark.parametrize("mining, distance", MINING)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_triplet_gradient(mining, distance, reduction):
    loss = BatchTripletLoss(0.5, mining, distance, reduction)
    loss.forward(EMB, LABELS)
    got = loss.backward()
    numeric = np.zeros_like(EMB)
    for i in np.ndindex(EMB.shape):
        up, down = EMB.copy(), EMB.copy()
        up[i] += 1e-6
        down[i] -= 1e-6
        numeric[i] = (float(loss.forward(up, LABELS)) - float(loss.forward(down, LABELS))) / 2e-6
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-8)


def test_batch_hard_is_torchs_triplet_loss_on_the_hardest_triplets():
    torch = pytest.importorskip("torch")
    e, labels = EMB[:8], LABELS[:8]  # every anchor has a positive and a negative
    d = np.sqrt((((e[:, None] - e[None]) + 1e-6) ** 2).sum(-1))
    same = labels[:, None] == labels[None]
    p = np.where(same & ~np.eye(8, dtype=bool), d, -np.inf).argmax(1)
    n = np.where(~same, d, np.inf).argmin(1)
    loss = BatchTripletLoss(1.0, "hard", "euclidean")
    value = loss.forward(e, labels)
    grad = loss.backward()
    te = torch.tensor(e, requires_grad=True)
    want = torch.nn.TripletMarginLoss(margin=1.0)(te, te[p], te[n])
    want.backward()
    assert float(value) == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(grad, te.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_batch_triplet_without_any_triplet_is_zero():
    for labels in (np.zeros(4, np.int64), np.arange(4)):  # one class; no positives
        loss = BatchTripletLoss()
        assert float(loss.forward(EMB[:4], labels)) == 0.0
        assert np.all(loss.backward() == 0)


@pytest.mark.parametrize("labels, error, match", [
    (LABELS.astype(np.float64), DTypeError, "BatchTripletLoss: expected integer class labels, "
                                            "got dtype float64"),
    (LABELS[:5], ShapeError, r"BatchTripletLoss: expected labels of shape \(14,\), got \(5,\)"),
    (list(LABELS), DTypeError, "BatchTripletLoss: expected the target to be an array"),
])
def test_batch_triplet_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        BatchTripletLoss().forward(EMB, labels)


def test_batch_triplet_bad_embeddings():
    with pytest.raises(ShapeError, match=r"BatchTripletLoss: expected embeddings of shape "
                                         r"\(N, D\), got \(14, 3, 1\)"):
        BatchTripletLoss().forward(EMB[..., None], LABELS)
    with pytest.raises(DTypeError, match="BatchTripletLoss: expected the prediction of dtype"):
        BatchTripletLoss().forward(LABELS[:, None], LABELS)


# -- every loss on every device ---------------------------------------------------------------
DEVICE_CASES = {
    "TripletLoss": (lambda: TripletLoss(0.5), TRIPLET, None),
    "TripletLoss-euclidean": (lambda: TripletLoss(1.0, "euclidean"), TRIPLET, None),
    "CosineEmbeddingLoss": (lambda: CosineEmbeddingLoss(0.1), PAIR, SIGNS),
    "BatchTripletLoss-hard": (lambda: BatchTripletLoss(0.5), EMB, LABELS),
    "BatchTripletLoss-semi-hard": (lambda: BatchTripletLoss(0.5, "semi-hard", "euclidean"),
                                   EMB, LABELS),
}


@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_each_device_matches_numpy(case, device):
    make, xs, target = DEVICE_CASES[case]
    host = make()
    want_value, want_grads = host.forward(xs, target), host.backward()
    moved = [device.asarray(x) for x in xs] if isinstance(xs, list) else device.asarray(xs)
    loss = make()
    value = loss.forward(moved, None if target is None else device.asarray(target))
    grads = loss.backward()
    grads, want_grads = (grads, want_grads) if isinstance(xs, list) else ([grads], [want_grads])
    assert np.ndim(value) == 0 and (device.on_host or device.owns(value))  # left on the GPU
    assert float(value) == pytest.approx(float(want_value), rel=1e-12)
    for g, want in zip(grads, want_grads):
        assert device.owns(g)
        np.testing.assert_allclose(gpunet.to_numpy(g), want, rtol=1e-10, atol=1e-14)


# -- nearest neighbours and PCA ---------------------------------------------------------------
def test_batch_nn_accuracy_by_hand():
    e = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.2], [0.0, 0.3]])
    y = np.array([0, 0, 1, 1, 1])  # the last one's nearest neighbour is of class 0
    assert float(batch_nn_accuracy(e, y)) == pytest.approx(0.8)
    assert batch_nn_accuracy(e, e) is None and batch_nn_accuracy(e[:1], y[:1]) is None


def test_nearest_neighbour_accuracy_by_hand():
    train, train_y = np.array([[0.0, 0.0], [1.0, 1.0], [4.0, 0.0]]), np.array([3, 7, 5])
    test, test_y = np.array([[0.9, 1.2], [3.0, 0.1], [0.2, -0.1], [2.9, 0.0]]), \
        np.array([7, 5, 5, 7])
    assert nearest_neighbour_accuracy(train, train_y, test, test_y) == 0.5


def test_pca_2d_projects_on_the_covariance_eigenvectors():
    g = np.random.default_rng(0)
    x = g.normal(size=(200, 3)) * [5.0, 2.0, 0.01] @ np.linalg.qr(g.normal(size=(3, 3)))[0] + 7
    values, vectors = np.linalg.eigh(np.cov(x.T))  # ascending
    want = (x - x.mean(0)) @ vectors[:, [2, 1]]
    xy = pca_2d(x)
    assert xy.shape == (200, 2)
    for k in range(2):  # each axis up to its sign
        sign = np.sign(xy[:, k] @ want[:, k])
        np.testing.assert_allclose(xy[:, k], sign * want[:, k], atol=1e-9)


# -- the command ------------------------------------------------------------------------------
def test_train_embed_on_digits_from_the_command_line(tmp_path):
    """`gpunet train embed --data digits` with the registry defaults: 1-nearest-neighbour test
    accuracy in the embedding space >= 0.95."""
    metrics = train_command(["embed", "--data", "digits"], tmp_path)
    assert set(metrics) == {"test_accuracy", "test_loss", "epochs", "seconds", "device",
                            "test_batch_nn_accuracy"}
    assert metrics["test_accuracy"] >= 0.95, metrics


def test_train_embed_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "embed.png"
    train_command(["embed", "--data", "digits", "--epochs", "1", "--plot", str(png)], tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_errors_are_one_line(monkeypatch, capsys):
    assert main(["train", "mlp", "--data", "digits", "--plot", "x.png"]) == 2
    assert capsys.readouterr().err.strip() == ("gpunet train: error: --plot: model 'mlp' draws "
                                               "no plot (embed does)")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes its import fail
    assert main(["train", "embed", "--data", "digits", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'gpunet train: error: --plot needs matplotlib: pip install "gpunet[bench]"'


@pytest.mark.parametrize("mining", ["hard", "semi-hard"])
def test_an_embedding_epoch_on_a_gpu_reads_nothing_per_step(mining, standin):
    """The mining, the loss and the in-batch metric stay on the device: an epoch without a
    progress bar reads from the GPU a constant number of times (the epoch's totals)."""
    train = gpunet.data.digits()[0]
    train = gpunet.data.Dataset(train.x[:192], train.y[:192], train.name, train.num_classes)
    gpunet.seed(0)
    model = gpunet.models.embed((64,), 10, dim=8, hidden=32)
    trainer = gpunet.Trainer(model, BatchTripletLoss(0.2, mining),
                             gpunet.optim.Adam(model.params(), lr=1e-3), device="cuda:1",
                             metric=batch_nn_accuracy, progress=False)
    trainer.fit(train, epochs=1, batch_size=32, seed=0)
    counters = standin._standin.counters
    counters.reset()
    trainer.fit(train, epochs=1, batch_size=32, seed=0)
    assert counters.host_reads <= 2, counters.as_dict()
    assert counters.uploads <= 2 * 6 + 2, counters.as_dict()  # each batch's x and y
    assert trainer.history[-1]["batch_nn_accuracy"] is not None


def test_embed_model_saves_and_loads(tmp_path):
    model = gpunet.models.embed((64,), 10, dim=4, hidden=8)
    x = R.random((3, 64)).astype(np.float32)
    gpunet.save(model, tmp_path / "embed.npz")
    loaded = gpunet.load(tmp_path / "embed.npz", device="cpu")
    np.testing.assert_array_equal(loaded.forward(x, training=False),
                                  model.forward(x, training=False))
    np.testing.assert_allclose(np.linalg.norm(loaded.forward(x), axis=1), 1.0, rtol=1e-6)
