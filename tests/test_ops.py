"""gpunet.ops: box IoU and non-maximum suppression against plain-Python references (torchvision
is not a dependency), the word-vector utilities against the notes' formulas and their
geometric promises, every device, host reads on a GPU, and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet import to_numpy
from gpunet.errors import DeviceError, DTypeError, ShapeError
from gpunet.ops import box_iou, cosine_similarity, equalize, neutralize, nms

R = np.random.default_rng(8)


def iou_by_hand(a, b) -> float:
    """One pair of (x1, y1, x2, y2) boxes, in plain Python."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else math.nan


def nms_by_brute_force(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Repeatedly take the best remaining box (highest score, then lowest index) and strike
    out every remaining box that overlaps it by more than ``threshold``."""
    remaining = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept = []
    while remaining:
        best = remaining.pop(0)
        kept.append(best)
        remaining = [i for i in remaining if not iou_by_hand(boxes[best], boxes[i]) > threshold]
    return kept


def random_boxes(g: np.random.Generator, n: int) -> np.ndarray:
    """Boxes in a few clusters, so that many overlap; some with integer corners."""
    centres = g.uniform(0, 20, (3, 2))[g.integers(0, 3, n)] + g.normal(0, 2, (n, 2))
    half = g.uniform(0.5, 4, (n, 2))
    boxes = np.concatenate([centres - half, centres + half], axis=1)
    return np.where(g.random((n, 1)) < 0.2, np.round(boxes), boxes)


# -- box_iou ---------------------------------------------------------------------------------
def test_box_iou_by_hand():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], dtype=np.float64)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], dtype=np.float64)
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 1, 0], [0, 1 / 4, 0]], rtol=1e-15)


def test_box_iou_matches_the_formula_on_random_boxes():
    a, b = random_boxes(R, 17), random_boxes(R, 9)
    want = np.array([[iou_by_hand(p, q) for q in b] for p in a])
    got = box_iou(a, b)
    assert got.shape == (17, 9) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
    assert ((got >= 0) & (got <= 1)).all()


def test_box_iou_degenerate_boxes_follow_torchvision():
    point, line = np.array([[1.0, 1, 1, 1]]), np.array([[0.0, 1, 2, 1]])
    box = np.array([[0.0, 0, 2, 2]])
    assert box_iou(point, box)[0, 0] == 0 and box_iou(line, box)[0, 0] == 0  # 0 / area
    assert np.isnan(box_iou(point, point)[0, 0])  # 0 / 0, unguarded as in torchvision
    assert box_iou(np.zeros((0, 4)), box).shape == (0, 1)


def test_box_iou_keeps_float32_and_promotes_integers():
    b32 = random_boxes(R, 4).astype(np.float32)
    assert box_iou(b32, b32).dtype == np.float32
    ints = np.array([[0, 0, 2, 2]], dtype=np.int32)
    got = box_iou(ints, np.array([[1, 1, 3, 3]], dtype=np.int64))
    assert got.dtype == np.float64 and got[0, 0] == pytest.approx(1 / 7, rel=1e-15)


# -- nms -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(60))
def test_nms_matches_brute_force(seed):
    g = np.random.default_rng(seed)
    n = int(g.integers(1, 40))
    boxes = random_boxes(g, n)
    scores = g.random(n)
    if seed % 3 == 0:  # many ties in score
        scores = np.round(scores * 4) / 4
    threshold = float(g.choice([0.0, 0.1, 0.3, 0.5, 0.7, 1.0, g.random()]))
    kept = nms(boxes, scores, threshold)
    assert kept.dtype == np.int64
    assert kept.tolist() == nms_by_brute_force(boxes, scores, threshold)


def test_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10],
                      [21, 21, 29, 29]], dtype=np.float64)
    scores = np.array([0.9, 0.95, 0.5, 0.9, 0.1])
    # box 1 (IoU 81/119 = 0.68 with boxes 0 and 3) drops them at 0.5 but not at 0.7;
    # box 4 lies inside box 2 (IoU 0.64)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [1, 0, 2, 4]  # 0 and 3 tie: 0 first, drops 3
    assert nms(boxes, scores, 1.0).tolist() == [1, 0, 3, 2, 4]  # only IoU > 1 drops
    assert nms(boxes, scores, 0.0).tolist() == [1, 2]  # any overlap drops


def test_nms_edge_cases():
    empty = nms(np.zeros((0, 4)), np.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == np.int64
    assert nms(np.array([[0.0, 0, 1, 1]]), np.array([0.3]), 0.5).tolist() == [0]
    # NaN scores first, as torch.sort puts them; a NaN IoU (two points) drops nothing
    points = np.array([[1.0, 1, 1, 1]] * 3)
    assert nms(points, np.array([0.2, np.nan, np.inf]), 0.5).tolist() == [1, 2, 0]
    # integer boxes and scores work; -0.0 and 0.0 are one score
    assert nms(np.array([[0, 0, 2, 2], [0, 0, 2, 2]]), np.array([-0.0, 0.0]), 0.5).tolist() \
        == [0]


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan, True, "0.5", None])
def test_nms_rejects_a_threshold_out_of_range(threshold):
    with pytest.raises(ValueError, match=r"nms: expected iou_threshold a number in \[0, 1\]"):
        nms(np.zeros((2, 4)), np.zeros(2), threshold)


def test_nms_and_box_iou_reject_bad_shapes_and_types():
    with pytest.raises(ShapeError, match=r"nms: expected boxes of shape \(N, 4\).*got \(3, 5\)"):
        nms(np.zeros((3, 5)), np.zeros(3), 0.5)
    with pytest.raises(ShapeError, match=r"nms: expected scores of shape \(3,\).*got \(4,\)"):
        nms(np.zeros((3, 4)), np.zeros(4), 0.5)
    with pytest.raises(ShapeError, match=r"box_iou: expected b of shape \(N, 4\).*got \(4,\)"):
        box_iou(np.zeros((3, 4)), np.zeros(4))
    with pytest.raises(DTypeError, match=r"box_iou: expected a to be an array, got list"):
        box_iou([[0, 0, 1, 1]], np.zeros((1, 4)))
    with pytest.raises(DTypeError, match=r"nms: expected scores of a real numeric dtype"):
        nms(np.zeros((1, 4)), np.array(["a"]), 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_box_iou_and_nms_on_every_device(device, seed):
    g = np.random.default_rng(seed)
    boxes, scores = random_boxes(g, 25), np.round(g.random(25) * 5) / 5
    b = device.asarray(boxes, dtype=np.float32)
    iou = box_iou(b, b[:7])
    kept = nms(b, device.asarray(scores, dtype=np.float32), 0.4)
    assert device.owns(iou) and device.owns(kept) and iou.dtype == np.float32
    np.testing.assert_allclose(to_numpy(iou), box_iou(boxes, boxes[:7]), rtol=1e-5, atol=1e-6)
    assert to_numpy(kept).tolist() == nms_by_brute_force(boxes.astype(np.float32), scores, 0.4)


def test_nms_reads_the_gpu_once_and_box_iou_never(standin):
    gpu, counters = gpunet.device("cuda:1"), standin._standin.counters
    boxes = gpu.asarray(random_boxes(R, 30))
    scores = gpu.asarray(R.random(30))
    counters.reset()
    iou = box_iou(boxes, boxes)
    assert counters.host_reads == 0
    kept = nms(boxes, scores, 0.5)
    assert counters.host_reads == 1, counters.as_dict()
    assert kept.device.id == 1 and iou.device.id == 1


def test_ops_reject_arrays_on_two_devices(standin):
    a, b = gpunet.device("cuda:0").asarray(np.zeros((2, 4))), gpunet.device("cuda:1").asarray(
        np.zeros((2, 4)))
    with pytest.raises(DeviceError, match=r"box_iou: expected b on the device of a \(cuda:0\), "
                                          r"got an array on cuda:1"):
        box_iou(a, b)
    with pytest.raises(DeviceError, match=r"nms: expected scores on the device of boxes "
                                          r"\(cuda:0\), got an array on cpu"):
        nms(a, np.zeros(2), 0.5)
    with pytest.raises(DeviceError, match=r"neutralize: expected g on the device of e"):
        neutralize(a, np.ones(4))


# -- word vectors ----------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cosine_similarity_by_hand_and_against_the_formula():
    assert cosine_similarity(np.array([1.0, 0]), np.array([0.0, 3])) == 0
    assert cosine_similarity(np.array([1.0, 2]), np.array([2.0, 4])) == pytest.approx(1)
    assert cosine_similarity(np.array([1.0, 2]), np.array([-3.0, -6])) == pytest.approx(-1)
    u, v = R.normal(size=(5, 7)), R.normal(size=(5, 7))
    want = [np.dot(u[i], v[i]) / math.sqrt(np.dot(u[i], u[i]) * np.dot(v[i], v[i]))
            for i in range(5)]
    np.testing.assert_allclose(cosine_similarity(u, v), want, rtol=1e-13)
    np.testing.assert_allclose(cosine_similarity(u, v[0]), [  # one vector against a batch
        np.dot(u[i], v[0]) / np.linalg.norm(u[i]) / np.linalg.norm(v[0]) for i in range(5)],
        rtol=1e-13)
    assert cosine_similarity(u[0], v[0]).shape == ()


def test_cosine_similarity_against_torch():
    torch = pytest.importorskip("torch")
    u, v = R.normal(size=(6, 4)), R.normal(size=(6, 4))
    u[1], u[2], v[3] = 0, 1e-9, 1e-5  # a zero vector and norms around eps
    want = torch.nn.functional.cosine_similarity(torch.tensor(u), torch.tensor(v), dim=-1)
    np.testing.assert_allclose(cosine_similarity(u, v), want.numpy(), rtol=1e-12, atol=1e-15)


def test_neutralize_removes_the_projection_on_the_bias_axis():
    g, e = R.normal(size=8), R.normal(size=(4, 8))
    got = neutralize(e, g)
    want = np.stack([e[i] - np.dot(e[i], g) / np.dot(g, g) * g for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got @ g, 0, atol=1e-13)
    np.testing.assert_allclose(neutralize(got, g), got, rtol=1e-13, atol=1e-15)  # idempotent
    np.testing.assert_allclose(neutralize(e[0], g), got[0], rtol=1e-13, atol=1e-15)


def equalize_by_the_notes(e_w1, e_w2, bias_axis):
    """The notes' equations, line by line, for one pair."""
    mu = (e_w1 + e_w2) / 2
    mu_B = np.dot(mu, bias_axis) / np.linalg.norm(bias_axis) ** 2 * bias_axis
    mu_orth = mu - mu_B
    e_w1B = np.dot(e_w1, bias_axis) / np.linalg.norm(bias_axis) ** 2 * bias_axis
    e_w2B = np.dot(e_w2, bias_axis) / np.linalg.norm(bias_axis) ** 2 * bias_axis
    root = np.sqrt(np.abs(1 - np.linalg.norm(mu_orth) ** 2))
    e_w1B_corrected = root * (e_w1B - mu_B) / np.linalg.norm((e_w1 - mu_orth) - mu_B)
    e_w2B_corrected = root * (e_w2B - mu_B) / np.linalg.norm((e_w2 - mu_orth) - mu_B)
    return e_w1B_corrected + mu_orth, e_w2B_corrected + mu_orth


def test_equalize_follows_the_notes_and_makes_a_symmetric_pair():
    g = R.normal(size=10)
    pairs = unit(R.normal(size=(2, 3, 10)))
    e1, e2 = equalize(pairs[0], pairs[1], g)
    for i in range(3):
        w1, w2 = equalize_by_the_notes(pairs[0, i], pairs[1, i], g)
        np.testing.assert_allclose(e1[i], w1, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(e2[i], w2, rtol=1e-12, atol=1e-14)
    along1, along2 = e1 @ g / (g @ g), e2 @ g / (g @ g)
    np.testing.assert_allclose(along1, -along2, rtol=1e-12)  # opposite along the bias axis
    np.testing.assert_allclose(e1 - along1[:, None] * g, e2 - along2[:, None] * g,
                               rtol=1e-12, atol=1e-14)  # the same orthogonal part
    # the notes divide by ||e_wi - mu||, not by its part along g: no longer than 1
    assert (np.linalg.norm(e1, axis=-1) <= 1 + 1e-12).all()
    # so a neutralised word is equally similar to both
    other = neutralize(unit(R.normal(size=10)), g)
    assert cosine_similarity(other, e1[0]) == pytest.approx(cosine_similarity(other, e2[0]))


def test_equalize_gives_unit_vectors_for_a_pair_that_differs_along_the_bias_axis():
    g = R.normal(size=6)
    m = neutralize(R.normal(size=6), g)
    m *= 0.6 / np.linalg.norm(m)  # the shared part, ||mu_orth|| = 0.6
    g_hat = g / np.linalg.norm(g)
    e1, e2 = equalize(m + 0.8 * g_hat, m + 0.3 * g_hat, g)
    np.testing.assert_allclose([np.linalg.norm(e1), np.linalg.norm(e2)], 1, rtol=1e-12)
    # sqrt(1 - 0.6^2) = 0.8 along g, on either side
    np.testing.assert_allclose(e1, m + 0.8 * g_hat, rtol=1e-12)
    np.testing.assert_allclose(e2, m - 0.8 * g_hat, rtol=1e-12)


def test_word_vector_functions_reject_bad_inputs():
    e = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"neutralize: expected a nonzero bias axis g"):
        neutralize(e, np.zeros(3))
    with pytest.raises(ValueError, match=r"equalize: expected a nonzero bias axis g"):
        equalize(e, -e, np.zeros(3))
    with pytest.raises(ValueError, match=r"equalize: expected two different word vectors"):
        equalize(np.array([[1.0, 0, 0], [0, 1, 0]]), np.array([[0.0, 0, 1], [0, 1, 0]]),
                 np.ones(3))
    with pytest.raises(ShapeError, match=r"neutralize: expected the bias axis g of shape "
                                         r"\(3,\).*got \(4,\)"):
        neutralize(e, np.ones(4))
    with pytest.raises(ShapeError, match=r"neutralize: expected the bias axis g of shape"):
        neutralize(e, np.ones((1, 3)))
    with pytest.raises(ShapeError, match=r"equalize: expected e_w1 and e_w2 of one shape"):
        equalize(e, np.ones(3), np.ones(3))
    with pytest.raises(ShapeError, match=r"cosine_similarity: expected u and v of one length"):
        cosine_similarity(np.ones(3), np.ones(4))
    with pytest.raises(ShapeError, match=r"cosine_similarity: expected u of shape \(\.\.\., D\)"):
        cosine_similarity(np.array(1.0), np.ones(4))
    with pytest.raises(DTypeError, match=r"neutralize: expected e to be an array, got list"):
        neutralize([1.0, 2.0], np.ones(2))


def test_word_vectors_on_every_device(device):
    g, u, v = R.normal(size=6), unit(R.normal(size=(3, 6))), unit(R.normal(size=(3, 6)))
    d = [device.asarray(a) for a in (g, u, v)]
    results = [cosine_similarity(d[1], d[2]), neutralize(d[1], d[0]), *equalize(d[1], d[2], d[0])]
    wants = [cosine_similarity(u, v), neutralize(u, g), *equalize(u, v, g)]
    for got, want in zip(results, wants):
        assert device.owns(got)
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12, atol=1e-14)


def test_the_bias_axis_checks_read_a_gpu_once(standin):
    gpu, counters = gpunet.device("cuda:0"), standin._standin.counters
    g, u, v = (gpu.asarray(a) for a in (R.normal(size=5), R.normal(size=(2, 5)),
                                          R.normal(size=(2, 5))))
    counters.reset()
    cosine_similarity(u, v)
    assert counters.host_reads == 0
    neutralize(u, g)
    assert counters.host_reads == 1
    equalize(u, v, g)
    assert counters.host_reads == 2, counters.as_dict()
