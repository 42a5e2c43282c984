"""Tests for gpunet.data: the embedded digits set, IDX/MNIST reading, synthetic sets, and the
reproducible DataLoader."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from gpunet import data, rng


# --- Dataset -------------------------------------------------------------------------------

def test_dataset_converts_dtypes_and_indexes():
    ds = data.Dataset(np.arange(12).reshape(6, 2), np.array([0, 1, 2, 0, 1, 2], np.int32),
                      "toy", 3)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert len(ds) == 6 and ds.input_shape == (2,)
    xb, yb = ds[np.array([4, 1])]
    np.testing.assert_array_equal(xb, [[8, 9], [2, 3]])
    np.testing.assert_array_equal(yb, [1, 1])
    assert data.Dataset(np.zeros((2, 1)), np.array([0.5, 1.5])).y.dtype == np.float32


def test_dataset_rejects_length_mismatch_and_bad_labels():
    with pytest.raises(ValueError, match="5 samples but y has 4"):
        data.Dataset(np.zeros((5, 2)), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        data.Dataset(np.zeros((2, 2)), np.array([0, 3]), num_classes=3)


# --- digits --------------------------------------------------------------------------------

def test_digits_shapes_dtypes_and_ranges():
    train, test = data.digits()
    assert train.x.shape == (1437, 64) and test.x.shape == (360, 64)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.num_classes == 10 and train.name == "digits"
    for ds in (train, test):
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
        # Pixels were integers 0..16 divided by 16.
        np.testing.assert_array_equal(ds.x * 16, np.round(ds.x * 16))
    assert set(np.unique(test.y)) == set(range(10))
    assert set(np.unique(train.y)) == set(range(10))


def test_digits_split_is_stratified_and_disjoint():
    train, test = data.digits()
    train_counts = np.bincount(train.y, minlength=10)
    test_counts = np.bincount(test.y, minlength=10)
    total = train_counts + test_counts
    assert total.sum() == 1797
    assert np.all(test_counts >= np.floor(0.2 * total))
    assert np.all(test_counts <= np.ceil(0.2 * total))
    # No image is in both sets (digits has no exact duplicates across these rows).
    rows = {r.tobytes() for r in train.x}
    assert sum(r.tobytes() in rows for r in test.x) == 0


def test_digits_split_ignores_global_seed():
    rng.seed(1)
    state = rng.get_state()
    a_train, a_test = data.digits()
    assert rng.get_state() == state, "digits() must not draw from gpunet's stream"
    rng.seed(987654)
    b_train, b_test = data.digits()
    np.testing.assert_array_equal(a_test.x, b_test.x)
    np.testing.assert_array_equal(a_test.y, b_test.y)
    np.testing.assert_array_equal(a_train.y, b_train.y)


def test_digits_flat_and_image_agree():
    flat_train, flat_test = data.digits(flat=True)
    img_train, img_test = data.digits(flat=False)
    assert img_train.x.shape == (1437, 1, 8, 8) and img_test.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(img_test.x.reshape(-1, 64), flat_test.x)
    np.testing.assert_array_equal(img_train.y, flat_train.y)


def test_digits_test_fraction():
    train, test = data.digits(test_fraction=0.5)
    assert len(test) == 899 and len(train) == 898
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits(test_fraction=1.0)


# --- read_idx ------------------------------------------------------------------------------

def _idx_bytes(array: np.ndarray, type_byte: int) -> bytes:
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, payload: bytes, gz: bool) -> None:
    path.write_bytes(gzip.compress(payload) if gz else payload)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_images_and_labels(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 5), dtype=np.uint8)
    labels = np.array([3, 0, 9, 255], np.uint8)
    # Names without .gz: compression is detected from the content.
    _write(tmp_path / "images", _idx_bytes(images, 0x08), gz)
    _write(tmp_path / "labels", _idx_bytes(labels, 0x08), gz)
    got = data.read_idx(tmp_path / "images")
    assert got.dtype == np.uint8 and got.shape == (4, 3, 5)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "labels")), labels)


@pytest.mark.parametrize("dtype,type_byte", [(np.float32, 0x0D), (np.int16, 0x0B),
                                             (np.int32, 0x0C), (np.float64, 0x0E),
                                             (np.int8, 0x09)])
def test_read_idx_other_types_are_big_endian(tmp_path, dtype, type_byte):
    values = np.array([[-1.5, 2.0, 100.25], [7.0, -3.0, 0.5]])
    array = values.astype(dtype)
    _write(tmp_path / "a.idx", _idx_bytes(array, type_byte), gz=False)
    got = data.read_idx(tmp_path / "a.idx")
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_bad_magic(tmp_path):
    payload = bytearray(_idx_bytes(np.zeros(3, np.uint8), 0x08))
    payload[0] = 1
    (tmp_path / "bad").write_bytes(bytes(payload))
    with pytest.raises(ValueError, match="bad.*magic"):
        data.read_idx(tmp_path / "bad")
    payload[0], payload[2] = 0, 0x07  # unknown type byte
    (tmp_path / "bad").write_bytes(bytes(payload))
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(tmp_path / "bad")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_rejects_truncated_and_trailing(tmp_path, gz):
    payload = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)
    _write(tmp_path / "short", payload[:-1], gz)
    with pytest.raises(ValueError, match="short.*truncated"):
        data.read_idx(tmp_path / "short")
    _write(tmp_path / "header", payload[:9], gz)
    with pytest.raises(ValueError, match="truncated IDX header"):
        data.read_idx(tmp_path / "header")
    _write(tmp_path / "long", payload + b"\x00", gz)
    with pytest.raises(ValueError, match="long.*trailing"):
        data.read_idx(tmp_path / "long")


def test_read_idx_rejects_truncated_gzip(tmp_path):
    compressed = gzip.compress(_idx_bytes(np.arange(100, dtype=np.uint8), 0x08))
    (tmp_path / "cut.gz").write_bytes(compressed[:-10])
    with pytest.raises(ValueError, match="cut.gz.*gzip"):
        data.read_idx(tmp_path / "cut.gz")


# --- mnist ---------------------------------------------------------------------------------

def _fake_mnist(directory, n_train=5, n_test=3, gz_test=True):
    generator = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": generator.integers(0, 256, (n_train, 28, 28), np.uint8),
        "train-labels-idx1-ubyte": generator.integers(0, 10, n_train, np.uint8),
        "t10k-images-idx3-ubyte": generator.integers(0, 256, (n_test, 28, 28), np.uint8),
        "t10k-labels-idx1-ubyte": generator.integers(0, 10, n_test, np.uint8),
    }
    for name, array in arrays.items():
        gz = gz_test and name.startswith("t10k")
        _write(directory / (name + ".gz" if gz else name), _idx_bytes(array, 0x08), gz)
    return arrays


def test_mnist_reads_fake_directory(tmp_path):
    arrays = _fake_mnist(tmp_path)
    train, test = data.mnist(tmp_path)
    assert train.x.shape == (5, 784) and test.x.shape == (3, 784)
    assert train.x.dtype == np.float32 and test.y.dtype == np.int64 and test.num_classes == 10
    np.testing.assert_allclose(train.x, arrays["train-images-idx3-ubyte"].reshape(5, 784) / 255,
                               rtol=1e-6)
    np.testing.assert_array_equal(test.y, arrays["t10k-labels-idx1-ubyte"])
    img_train, img_test = data.mnist(str(tmp_path), flat=False)
    assert img_train.x.shape == (5, 1, 28, 28) and img_test.input_shape == (1, 28, 28)
    np.testing.assert_allclose(img_test.x[:, 0], arrays["t10k-images-idx3-ubyte"] / 255,
                               rtol=1e-6)


def test_mnist_missing_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*download"):
        data.mnist(tmp_path / "nowhere")
    _fake_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        data.mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path):
    _fake_mnist(tmp_path)
    labels = np.zeros(4, np.uint8)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels, 0x08), gz=False)
    with pytest.raises(ValueError, match="5 images.*4 labels"):
        data.mnist(tmp_path)


# --- synthetic sets and the registry -------------------------------------------------------

@pytest.mark.parametrize("make,kwargs,features,classes", [
    (data.spirals, {}, 2, 3),
    (data.spirals, {"n": 100, "classes": 5, "noise": 0.0}, 2, 5),
    (data.blobs, {}, 2, 4),
    (data.blobs, {"n": 300, "classes": 3, "features": 7}, 7, 3),
])
def test_synthetic_shapes(make, kwargs, features, classes):
    train, test = make(**kwargs)
    n = kwargs.get("n", 600)
    assert len(train) == n - len(test) and len(test) == round(0.2 * n)
    assert train.x.shape[1:] == (features,) and train.x.dtype == np.float32
    assert train.y.dtype == np.int64 and train.num_classes == classes
    assert set(np.unique(test.y)) == set(range(classes))


@pytest.mark.parametrize("make", [data.spirals, data.blobs])
def test_synthetic_determinism(make):
    rng.seed(3)
    a_train, a_test = make(seed=7)
    rng.seed(4)
    b_train, b_test = make(seed=7)
    np.testing.assert_array_equal(a_train.x, b_train.x)
    np.testing.assert_array_equal(a_test.y, b_test.y)
    c_train, _ = make(seed=8)
    assert not np.array_equal(a_train.x, c_train.x)


def test_spirals_radius_and_noise():
    train, _ = data.spirals(noise=0.0)
    radius = np.linalg.norm(train.x, axis=1)
    assert radius.max() <= 1.0
    # Without noise, arm c has angle 2*pi*c/3 + 4*r (mod 2*pi).
    angle = np.arctan2(train.x[:, 0], train.x[:, 1])
    expected = 2 * np.pi * train.y / 3 + 4 * radius
    np.testing.assert_allclose(np.cos(angle - expected), 1.0, atol=1e-4)


def test_load_and_registry():
    assert set(data.DATASETS) >= {"digits", "mnist", "spirals", "blobs"}
    train, test = data.load("blobs", n=50, classes=2)
    assert len(train) + len(test) == 50 and train.num_classes == 2
    with pytest.raises(ValueError, match="known: .*blobs, digits, .*mnist, .*spirals"):
        data.load("cifar")


# --- DataLoader ----------------------------------------------------------------------------

def _indexed(n: int) -> data.Dataset:
    """x[i] == [i, -i], y[i] == i, so a batch tells which samples it holds."""
    i = np.arange(n)
    return data.Dataset(np.stack([i, -i], axis=1), i)


def _epoch_order(loader: data.DataLoader) -> np.ndarray:
    return np.concatenate([yb for _, yb in loader])


def test_loader_visits_every_sample_once_in_batches():
    loader = data.DataLoader(_indexed(103), batch_size=10, seed=5)
    batches = list(loader)
    assert len(loader) == 11 and len(batches) == 11
    assert [len(yb) for _, yb in batches] == [10] * 10 + [3]
    for xb, yb in batches:
        assert xb.shape == (len(yb), 2) and xb.flags.c_contiguous and xb.dtype == np.float32
        np.testing.assert_array_equal(xb[:, 0], yb)
    order = _epoch_order(loader)
    np.testing.assert_array_equal(np.sort(order), np.arange(103))
    assert not np.array_equal(order, np.arange(103))


def test_loader_order_depends_only_on_seed_and_epoch():
    ds = _indexed(64)
    loader = data.DataLoader(ds, batch_size=8, seed=11)
    first = _epoch_order(loader)
    assert loader.epoch == 1  # a pass advances the epoch: the next one is shuffled anew
    second = _epoch_order(loader)
    assert not np.array_equal(first, second)
    loader.set_epoch(0)
    np.testing.assert_array_equal(_epoch_order(loader), first)
    loader.set_epoch(1)
    np.testing.assert_array_equal(_epoch_order(loader), second)
    # A fresh loader "resumed" at epoch 1 sees the same batches.
    resumed = data.DataLoader(ds, batch_size=8, seed=11)
    resumed.set_epoch(1)
    np.testing.assert_array_equal(_epoch_order(resumed), second)
    other = data.DataLoader(ds, batch_size=8, seed=12)
    assert not np.array_equal(_epoch_order(other), first)


def test_loader_without_shuffle_keeps_order():
    loader = data.DataLoader(_indexed(10), batch_size=4, shuffle=False, seed=0)
    loader.set_epoch(3)
    np.testing.assert_array_equal(_epoch_order(loader), np.arange(10))


def test_loader_drop_last():
    loader = data.DataLoader(_indexed(103), batch_size=10, drop_last=True, seed=0)
    batches = list(loader)
    assert len(loader) == 10 and len(batches) == 10
    assert all(len(yb) == 10 for _, yb in batches)
    assert len(np.unique(_epoch_order(loader))) == 100
    assert len(data.DataLoader(_indexed(100), batch_size=10, drop_last=True)) == 10
    assert len(data.DataLoader(_indexed(5), batch_size=10, drop_last=True)) == 0
    assert len(data.DataLoader(_indexed(5), batch_size=10)) == 1


def test_loader_seed_none_follows_global_seed():
    ds = _indexed(50)
    rng.seed(42)
    a = _epoch_order(data.DataLoader(ds, batch_size=7))
    rng.seed(42)
    b = _epoch_order(data.DataLoader(ds, batch_size=7))
    rng.seed(43)
    c = _epoch_order(data.DataLoader(ds, batch_size=7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_loader_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        data.DataLoader(_indexed(4), batch_size=batch_size, seed=0)
