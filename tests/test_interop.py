"""Weights in and out: safetensors files (gpunet.save_safetensors / load_safetensors) and DLPack
arrays (gpunet.from_dlpack), checked against PyTorch where it is installed."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

import gpunet
from gpunet import CheckpointError, Sequential
from gpunet.layers import BatchNorm, Dense, ReLU

#: the safetensors tests need the interop extra (CI installs it); the DLPack ones run without it
needs_safetensors = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None,
    reason='safetensors is not installed: pip install -e ".[interop]"')


def mlp() -> Sequential:
    return Sequential([Dense(6, 8), ReLU(), Dense(8, 3)])


def bn_mlp() -> Sequential:
    return Sequential([Dense(6, 8), BatchNorm(8), ReLU(), Dense(8, 3)])


def trained_bn_mlp() -> Sequential:
    """A BatchNorm MLP whose running statistics are no longer the initial ones."""
    model = bn_mlp()
    model.forward(np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32),
                  training=True)
    return model


def x_of() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)


# -- safetensors --------------------------------------------------------------------------------
@needs_safetensors
@pytest.mark.parametrize("make", [mlp, trained_bn_mlp])
def test_a_model_round_trips_through_safetensors(tmp_path, make):
    model = make()
    gpunet.save_safetensors(model, tmp_path / "m.safetensors")
    back = gpunet.load_safetensors(tmp_path / "m.safetensors")
    assert back.config() == model.config()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
    np.testing.assert_array_equal(back.forward(x_of(), training=False),
                                  model.forward(x_of(), training=False))


@needs_safetensors
def test_the_file_holds_state_dict_names_and_the_architecture_in_its_metadata(tmp_path):
    model = trained_bn_mlp()
    path = tmp_path / "m.safetensors"
    gpunet.save_safetensors(model, path)
    import safetensors
    from safetensors.numpy import load_file
    tensors = load_file(str(path))
    assert set(model.state_dict()) == {
        "0.weight", "0.bias", "1.gamma", "1.beta", "1.running_mean", "1.running_var",
        "3.weight", "3.bias"}
    assert set(tensors) == {  # PyTorch's names for the same model
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "3.weight", "3.bias"}
    np.testing.assert_array_equal(tensors["1.weight"], model.state_dict()["1.gamma"])
    assert tensors["0.weight"].shape == (8, 6)  # (out, in), as torch.nn.Linear
    with safetensors.safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "gpunet" and meta["version"] == "1"
    assert meta["dtype"] == "float32"
    assert json.loads(meta["architecture"]) == json.loads(json.dumps(model.config()))


@needs_safetensors
def test_float64_and_shared_weights_are_kept(tmp_path):
    tied = Sequential([Dense(4, 4), ReLU(), Dense(4, 4)]).to(dtype=np.float64)
    tied.share("2.weight", tied[0].weight)
    gpunet.save_safetensors(tied, tmp_path / "t.safetensors")
    back = gpunet.load_safetensors(tmp_path / "t.safetensors")
    assert back.dtype == np.float64
    assert back[2].weight is back[0].weight
    assert back.shared() == {"2.weight": "0.weight"}


@needs_safetensors
def test_load_onto_a_gpu(tmp_path, standin):
    model = mlp()
    gpunet.save_safetensors(model, tmp_path / "m.safetensors")
    back = gpunet.load_safetensors(tmp_path / "m.safetensors", device="cuda:1")
    assert back[0].weight.data.device.id == 1
    np.testing.assert_array_equal(gpunet.to_numpy(back[2].bias.data), model[2].bias.data)


@needs_safetensors
def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        gpunet.load_safetensors(tmp_path / "nothing.safetensors")


def _saved(tmp_path) -> bytes:
    gpunet.save_safetensors(trained_bn_mlp(), tmp_path / "good.safetensors")
    return (tmp_path / "good.safetensors").read_bytes()


@needs_safetensors
@pytest.mark.parametrize("damage, match", [
    (lambda b: b"", "not a readable safetensors file"),
    (lambda b: b"PK\x03\x04 certainly not safetensors", "not a readable safetensors file"),
    (lambda b: b[:len(b) // 2], "not a readable safetensors file"),
    (lambda b: b[:20], "not a readable safetensors file"),
])
def test_damaged_files_are_checkpoint_errors_naming_the_path(tmp_path, damage, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damage(_saved(tmp_path)))
    with pytest.raises(CheckpointError, match=match) as e:
        gpunet.load_safetensors(path)
    assert str(path) in str(e.value)


@needs_safetensors
def test_a_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        gpunet.load_safetensors(tmp_path)


def _write(path, tensors, metadata):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata=metadata)


def _good_metadata(model) -> dict[str, str]:
    return {"format": "gpunet", "version": "1", "architecture": json.dumps(model.config()),
            "dtype": "float32"}


@needs_safetensors
@pytest.mark.parametrize("edit, match", [
    (lambda t, m: m.clear(), "without gpunet's metadata"),
    (lambda t, m: m.update(format="other"), "without gpunet's metadata"),
    (lambda t, m: m.update(version="7"), "version '7'"),
    (lambda t, m: m.update(architecture="{not json"), "cannot be built: JSONDecodeError"),
    (lambda t, m: m.pop("architecture"), "cannot be built"),
    (lambda t, m: m.update(architecture=json.dumps({"type": "os.system", "args": {}})),
     "unknown layer type"),
    (lambda t, m: m.update(dtype="int8"), "cannot be built"),
    (lambda t, m: t.pop("0.bias"), r"missing '0.bias'"),
    (lambda t, m: t.update(extra=np.zeros(2, np.float32)), r"unexpected \['extra'\]"),
    (lambda t, m: t.update({"0.weight": np.zeros((6, 8), np.float32)}), "0.weight has shape"),
    (lambda t, m: t.update({"0.bias": np.zeros(8, np.int32)}), "floating-point"),
])
def test_foreign_or_unfitting_files_are_checkpoint_errors(tmp_path, edit, match):
    model = mlp()
    tensors, metadata = model.state_dict(), _good_metadata(model)
    edit(tensors, metadata)
    path = tmp_path / "foreign.safetensors"
    _write(path, tensors, metadata)
    with pytest.raises(CheckpointError, match=match) as e:
        gpunet.load_safetensors(path)
    assert str(path) in str(e.value)


def test_without_the_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "safetensors"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[interop\]"'):
        gpunet.save_safetensors(mlp(), tmp_path / "m.safetensors")
    with pytest.raises(ImportError, match="load_safetensors needs the safetensors package"):
        gpunet.load_safetensors(tmp_path / "m.safetensors")


@needs_safetensors
def test_a_failed_save_leaves_no_file_behind(tmp_path, monkeypatch):
    import safetensors.numpy as stn

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(stn, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        gpunet.save_safetensors(mlp(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- safetensors with PyTorch -------------------------------------------------------------------
def _torch_mlp(torch):
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


@needs_safetensors
def test_pytorch_loads_a_gpunet_mlp_and_computes_the_same(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch
    model = mlp()
    gpunet.save_safetensors(model, tmp_path / "m.safetensors")
    net = _torch_mlp(torch)
    net.load_state_dict(safetensors.torch.load_file(str(tmp_path / "m.safetensors")))  # strict
    with torch.no_grad():
        out = net(torch.from_numpy(x_of())).numpy()
    np.testing.assert_allclose(out, model.forward(x_of(), training=False), rtol=1e-5,
                               atol=1e-6)


@needs_safetensors
def test_pytorch_loads_a_gpunet_batchnorm_mlp_strictly_and_computes_the_same(tmp_path):
    """gpunet's BatchNorm calls its parameters gamma/beta; the file uses PyTorch's names."""
    torch = pytest.importorskip("torch")
    import safetensors.torch
    model = trained_bn_mlp()
    gpunet.save_safetensors(model, tmp_path / "m.safetensors")
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 3))
    net.load_state_dict(safetensors.torch.load_file(str(tmp_path / "m.safetensors")))  # strict
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(x_of())).numpy()
    np.testing.assert_allclose(out, model.forward(x_of(), training=False), rtol=1e-5,
                               atol=1e-6)


@needs_safetensors
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_pytorch_loads_gpunet_recurrent_layers_and_back(kind, tmp_path):
    """gpunet's LSTM and RNN have one bias, PyTorch's two: written as bias_ih_l0 and a zero
    bias_hh_l0, read back as their sum (so a file PyTorch saved loads too)."""
    torch = pytest.importorskip("torch")
    import safetensors.torch
    from gpunet.layers import GRU, LSTM, RNN
    gpunet.seed(3)
    layer = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}[kind](3, 5).to(dtype=np.float64)
    for p in layer.params().values():  # nonzero biases take part
        p.data[...] = np.random.default_rng(1).normal(size=p.shape)
    gpunet.save_safetensors(layer, tmp_path / "r.safetensors")
    net = getattr(torch.nn, kind)(3, 5).double()
    net.load_state_dict(safetensors.torch.load_file(str(tmp_path / "r.safetensors")))  # strict
    x = np.random.default_rng(2).normal(size=(4, 2, 3))
    with torch.no_grad():
        want = net(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(layer.forward(x, training=False), want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # PyTorch's own nonzero bias_hh, loaded back into gpunet
        for name, value in net.named_parameters():
            value.copy_(torch.from_numpy(np.random.default_rng(4).normal(size=value.shape)))
        want = net(torch.from_numpy(x))[0].numpy()
    import safetensors.numpy
    meta = {"format": "gpunet", "version": "1", "dtype": "float64",
            "architecture": json.dumps(layer.config())}
    safetensors.numpy.save_file({k: v.numpy() for k, v in net.state_dict().items()},
                                str(tmp_path / "t.safetensors"), metadata=meta)
    back = gpunet.load_safetensors(tmp_path / "t.safetensors")
    np.testing.assert_allclose(back.forward(x, training=False), want, rtol=1e-10, atol=1e-12)


# -- DLPack -------------------------------------------------------------------------------------
def test_a_numpy_array_round_trips_without_a_copy():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = gpunet.from_dlpack(a)
    assert isinstance(b, np.ndarray) and np.shares_memory(a, b)
    np.testing.assert_array_equal(b, a)
    c = np.from_dlpack(b)  # a gpunet array is a NumPy array: it exports itself
    assert np.shares_memory(a, c)


def test_device_moves_a_copy_only_when_different(standin):
    a = np.arange(4, dtype=np.float32)
    assert np.shares_memory(gpunet.from_dlpack(a, device="cpu"), a)
    assert np.shares_memory(gpunet.from_dlpack(a, device="emulated"), a)
    g = gpunet.from_dlpack(a, device="cuda:1")
    assert g.device.id == 1
    np.testing.assert_array_equal(gpunet.to_numpy(g), a)


def test_a_cuda_object_goes_through_cupy_from_dlpack_on_its_gpu(standin, monkeypatch):
    """A CUDA producer (a PyTorch or JAX tensor on GPU 1) is handed to cupy.from_dlpack with
    GPU 1 current. The stand-in models no DLPack: its from_dlpack here is a recording fake."""
    calls = []

    class OnGpu1:
        def __dlpack__(self, **kwargs):
            raise AssertionError("only cupy.from_dlpack reads the capsule")

        def __dlpack_device__(self):
            return (2, 1)  # kDLCUDA, device 1

    def fake_from_dlpack(obj):
        calls.append((obj, standin.cuda.Device().id))
        return standin.arange(3.0)  # lands on the current device
    monkeypatch.setattr(standin, "from_dlpack", fake_from_dlpack, raising=False)
    producer = OnGpu1()
    a = gpunet.from_dlpack(producer)
    assert calls == [(producer, 1)] and a.device.id == 1
    assert gpunet.from_dlpack(a) is a  # a CuPy array is a gpunet array already
    host = gpunet.from_dlpack(a, device="cpu")  # a copy to the host
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, [0.0, 1.0, 2.0])
    assert gpunet.from_dlpack(a, device="cuda:0").device.id == 0


@pytest.mark.parametrize("obj", [[1.0, 2.0], 3.0, "tensor", None])
def test_an_object_without_dlpack_is_a_type_error_naming_from_dlpack(obj):
    with pytest.raises(TypeError, match=r"gpunet\.from_dlpack: expected an object "
                                        r"implementing __dlpack__"):
        gpunet.from_dlpack(obj)


def test_an_unknown_dlpack_device_is_refused():
    class OnAnAccelerator:
        def __dlpack__(self, **kwargs):
            raise AssertionError("must not be called")

        def __dlpack_device__(self):
            return (14, 0)  # kDLOneAPI

    with pytest.raises(gpunet.DeviceError, match="DLPack device type 14"):
        gpunet.from_dlpack(OnAnAccelerator())


def test_a_torch_tensor_becomes_a_gpunet_array_on_the_same_memory():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    a = gpunet.from_dlpack(t)
    assert isinstance(a, np.ndarray) and a.shape == (2, 3) and a.dtype == np.float32
    assert a.ctypes.data == t.data_ptr()
    a[0, 0] = 42.0  # written through the gpunet array, seen in the tensor
    assert t[0, 0].item() == 42.0
    t[1, 2] = -1.0  # and the other way round
    assert a[1, 2] == -1.0
    y = Dense(3, 2).forward(a)  # and layers take it
    assert y.shape == (2, 2)


def test_torch_from_dlpack_takes_a_gpunet_array_without_a_copy():
    torch = pytest.importorskip("torch")
    model = mlp()
    w = model[0].weight.data
    t = torch.from_dlpack(w)
    assert t.data_ptr() == w.ctypes.data and tuple(t.shape) == w.shape
    t[0, 0] = 7.0
    assert w[0, 0] == 7.0
