"""Augmentation: flips and crops checked sample by sample, seeded and per-epoch draws in the
DataLoader (resume, data-parallel shares, masks), never in evaluation, `--augment`, bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import gpunet
from gpunet import ShapeError, Trainer, optim
from gpunet.augment import Compose, RandomCrop, RandomHorizontalFlip, Transform, recipe
from gpunet.data import DataLoader, Dataset
from gpunet.layers import Dense, Flatten, Sequential
from gpunet.losses import SoftmaxCrossEntropy
from helpers import train_command


def images(n: int = 40, c: int = 2, h: int = 5, w: int = 4) -> np.ndarray:
    """Distinct positive pixels, so a crop's position can be read off and padding is 0."""
    return (np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w) + 1) / 1000


def dataset(n: int = 40, masks: bool = False) -> Dataset:
    x = images(n)
    y = x[:, :1].copy() if masks else np.arange(n) % 3
    return Dataset(x, y, "toy", None if masks else 3)


def test_flip_mirrors_the_width_axis_of_the_drawn_samples():
    x = images()
    flips = RandomHorizontalFlip(0.5).draw(len(x), np.random.default_rng(0))
    out = RandomHorizontalFlip(0.5).apply(x, flips)
    assert 0 < flips.sum() < len(x)
    for i in range(len(x)):
        want = x[i][:, :, ::-1] if flips[i] else x[i]
        np.testing.assert_array_equal(out[i], want)
    np.testing.assert_array_equal(RandomHorizontalFlip(1.0)(x), x[..., ::-1])
    np.testing.assert_array_equal(RandomHorizontalFlip(0.0)(x), x)


@pytest.mark.parametrize("size, padding", [((5, 4), 1), ((3, 2), 0), ((6, 6), 2)])
def test_crop_is_a_window_of_the_zero_padded_image(size, padding):
    x = images(200)
    out = RandomCrop(size, padding)(x, np.random.default_rng(1))
    assert out.shape == (200, 2, *size)
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    seen = set()
    for i in range(len(x)):
        spots = [(a, b) for a in range(padded.shape[2] - size[0] + 1)
                 for b in range(padded.shape[3] - size[1] + 1)
                 if np.array_equal(padded[i, :, a:a + size[0], b:b + size[1]], out[i])]
        assert len(spots) == 1, f"sample {i} is no window of its padded image"
        seen.add(spots[0])
    # every position occurs (uniform draws over all of them)
    assert len(seen) == (padded.shape[2] - size[0] + 1) * (padded.shape[3] - size[1] + 1)


def test_crop_pads_with_zeros():
    x = np.ones((30, 1, 3, 3), np.float32)
    out = RandomCrop(3, padding=1)(x, np.random.default_rng(2))
    assert set(np.unique(out)) == {0.0, 1.0}
    assert (out == 0).any(axis=(1, 2, 3)).sum() > 0
    # a shift of at most one pixel: the centre is always an image pixel
    assert (out[:, :, 1, 1] == 1).all()


def test_compose_runs_in_order_and_leaves_the_input_alone():
    x = images()
    before = x.copy()
    t = Compose([RandomCrop((5, 4), padding=1), RandomHorizontalFlip()])
    params = t.draw(len(x), np.random.default_rng(3))
    out = t.apply(x, params)
    want = RandomHorizontalFlip().apply(RandomCrop((5, 4), 1).apply(x, params[0]), params[1])
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(x, before)
    rows = np.array([3, 1])
    np.testing.assert_array_equal(t.apply(x[rows], t.take(params, rows)), out[rows])


def batches(loader: DataLoader, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    loader.set_epoch(epoch)
    return list(loader)


AUGMENT = Compose([RandomCrop((5, 4), padding=1), RandomHorizontalFlip()])


def test_loader_same_seed_same_batches_and_resume_sees_the_same_epoch():
    a = batches(DataLoader(dataset(), 8, seed=5, augment=AUGMENT), 0)
    b = batches(DataLoader(dataset(), 8, seed=5, augment=AUGMENT), 0)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    walked = DataLoader(dataset(), 8, seed=5, augment=AUGMENT)
    for epoch in range(3):
        third = batches(walked, epoch)
    resumed = batches(DataLoader(dataset(), 8, seed=5, augment=AUGMENT), 2)
    for (xa, _), (xb, _) in zip(third, resumed):
        np.testing.assert_array_equal(xa, xb)
    other = batches(DataLoader(dataset(), 8, seed=6, augment=AUGMENT), 0)
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, other))


def test_loader_draws_anew_every_epoch_and_keeps_the_order():
    plain = DataLoader(dataset(), 8, shuffle=False, seed=5)
    aug = DataLoader(dataset(), 8, shuffle=False, seed=5, augment=AUGMENT)
    e0, e1 = np.concatenate([x for x, _ in batches(aug, 0)]), np.concatenate(
        [x for x, _ in batches(aug, 1)])
    assert not np.array_equal(e0, e1)
    # the augmentation draws do not disturb the order: labels as without augmentation
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches(aug, 1)]),
                                  np.concatenate([y for _, y in batches(plain, 1)]))


def test_loader_ranks_together_augment_as_one_process():
    one = np.concatenate([x for x, _ in batches(DataLoader(dataset(38), 8, seed=3,
                                                           augment=AUGMENT), 1)])
    ranks = [batches(DataLoader(dataset(38), 4, seed=3, augment=AUGMENT, rank=r, world=2), 1)
             for r in range(2)]
    joint = np.concatenate([np.concatenate([a[0], b[0]]) for a, b in zip(*ranks)])
    np.testing.assert_array_equal(joint, one)


def test_masks_get_their_images_crop_and_flip():
    for xb, yb in batches(DataLoader(dataset(masks=True), 8, seed=1, augment=AUGMENT), 0):
        np.testing.assert_array_equal(yb, xb[:, :1])


class Recording(Transform):
    """A flip of every sample that records the batches it transformed."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def draw(self, n, generator):
        return np.ones(n, bool)

    def apply(self, x, params):
        self.calls.append(x)
        return RandomHorizontalFlip().apply(x, params)


def test_trainer_augments_training_batches_only_and_resumes_identically(tmp_path):
    train, val = dataset(40), dataset(12)

    def run(epochs, resume=False, t=None):
        gpunet.seed(0)
        model = Sequential([Flatten(), Dense(40, 3)])
        trainer = Trainer(model, SoftmaxCrossEntropy(), optim.SGD(model.params(), lr=0.1),
                          progress=False)
        trainer.fit(train, epochs, 8, val=val, checkpoint=tmp_path / "run.ckpt",
                    resume=resume, seed=4, augment=t or AUGMENT)
        return trainer

    rec = Recording()
    trainer = run(2, t=rec)
    assert len(rec.calls) == 2 * 5 and all(len(c) == 8 for c in rec.calls)  # no val batches
    trainer.evaluate(val)
    assert len(rec.calls) == 10
    straight = run(3)
    run(1)
    resumed = run(3, resume=True)
    for k, p in straight.model.params().items():
        np.testing.assert_array_equal(resumed.model.params()[k].data, p.data)


@pytest.mark.parametrize("make, error, match", [
    (lambda: RandomHorizontalFlip(1.5), ValueError,
     r"RandomHorizontalFlip: expected p in \[0, 1\], got 1.5"),
    (lambda: RandomCrop(0), ValueError, "RandomCrop: expected size a positive int"),
    (lambda: RandomCrop((2, 3, 4)), ValueError, "RandomCrop: expected size"),
    (lambda: RandomCrop(3, padding=-1), ValueError,
     "RandomCrop: expected padding a non-negative int, got -1"),
    (lambda: Compose([RandomCrop(3), "flip"]), TypeError,
     "Compose: expected a Transform at position 1, got str"),
    (lambda: RandomCrop(7, padding=1)(images()), ShapeError,
     "RandomCrop: expected images of at least 5x5 for a 7x7 crop with padding 1, got 5x4"),
    (lambda: RandomHorizontalFlip()(np.zeros((4, 8), np.float32)), ShapeError,
     r"RandomHorizontalFlip: expected input of images \(N, C, H, W\), got shape \(4, 8\)"),
    (lambda: DataLoader(Dataset(np.zeros((6, 8)), np.zeros(6, int), "flat"),
                        augment=AUGMENT), ShapeError,
     r"DataLoader: augment: expected dataset 'flat' of images \(N, C, H, W\), got shape"),
    (lambda: DataLoader(dataset(), augment=lambda x: x), TypeError,
     "DataLoader: expected augment to be a gpunet.augment.Transform, got function"),
    (lambda: recipe("crop,rotate", (1, 8, 8)), ValueError,
     "--augment: expected a comma-separated choice of crop, flip, got 'crop,rotate'"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_recipe():
    t = recipe("crop", (1, 28, 28))
    assert repr(t) == "Compose([RandomCrop(size=(28, 28), padding=3)])"
    assert repr(recipe("flip,crop", (1, 8, 8))) == (
        "Compose([RandomCrop(size=(8, 8), padding=1), RandomHorizontalFlip(p=0.5)])")


def test_cli_augment_trains_and_refuses_non_images(tmp_path):
    metrics = train_command(["lenet", "--data", "digits", "--epochs", "2", "--augment", "crop"],
                            tmp_path)
    assert metrics["test_accuracy"] > 0.5
    done = subprocess.run([sys.executable, "-m", "gpunet", "train", "mlp", "--data", "spirals",
                           "--augment", "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--augment: dataset 'spirals' is not images (N, C, H, W)" in done.stderr
    helped = subprocess.run([sys.executable, "-m", "gpunet", "train", "--help"],
                            capture_output=True, text=True)
    assert "--augment [crop,flip]" in helped.stdout and "horizontal flip" in helped.stdout
