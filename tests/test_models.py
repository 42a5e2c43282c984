"""Sequential and Graph containers, and saving and loading models."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import gpunet
from gpunet import CheckpointError, Graph, Sequential, ShapeError, gradcheck
from gpunet.layers import Concat, Dense, Dropout, ReLU, SigmoidGenerator, Sum, Tanh

R = np.random.default_rng(11)


def residual_block() -> Graph:
    g = Graph("x")
    g.add("fc1", Dense(4, 4), "x")
    g.add("act", Tanh(), "fc1")
    g.add("fc2", Dense(4, 4), "act")
    g.add("out", Sum("tanh"), ["fc2", "x"])
    return g


def test_sequential_names_and_formula():
    model = Sequential([Dense(3, 4), ReLU(), Dense(4, 2)]).to(dtype=np.float64)
    assert list(model.params()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = R.normal(size=(5, 3))
    p = {k: v.data for k, v in model.params().items()}
    want = np.maximum(x @ p["0.weight"].T + p["0.bias"], 0) @ p["2.weight"].T + p["2.bias"]
    np.testing.assert_allclose(model.forward(x), want, rtol=1e-12)
    assert gradcheck(model, x).ok


def test_graph_residual_formula_and_gradcheck():
    g = residual_block().to(dtype=np.float64)
    assert sorted(g.params()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    x = R.normal(size=(3, 4))
    p = {k: v.data for k, v in g.params().items()}
    h = np.tanh(x @ p["fc1.weight"].T + p["fc1.bias"])
    want = np.tanh(h @ p["fc2.weight"].T + p["fc2.bias"] + x)
    np.testing.assert_allclose(g.forward(x), want, rtol=1e-12)
    report = gradcheck(g, x)
    assert report.ok, str(report)


def test_graph_fan_out_adds_gradients():
    # y = a + a with a = x (identity fan-out through two Sum inputs): dx = 2 * dy
    g = Graph("x")
    g.add("a", Sum(), ["x"])
    g.add("y", Sum(), ["a", "a"])
    x = R.normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(g.forward(x), 2 * x)
    np.testing.assert_allclose(g.backward(np.ones_like(x)), 2.0)


def test_graph_several_inputs_and_outputs():
    g = Graph(["a", "b"], outputs=None)
    g.add("cat", Concat(axis=1), ["a", "b"])
    g.add("fc", Dense(5, 2), "cat")
    g.add("gen", SigmoidGenerator(2, alpha=0.5), "fc")
    g.set_outputs(["gen", "cat"])
    a, b = R.normal(size=(3, 2)), R.normal(size=(3, 3))
    report = gradcheck(g, [a, b])
    assert report.ok, str(report)
    assert set(report.errors) == {"input 0", "input 1", "fc.weight", "fc.bias", "gen.alpha"}
    outs = g.forward([a.astype(np.float32), b.astype(np.float32)])
    assert [o.shape for o in outs] == [(3, 2), (3, 5)]


def test_graph_input_that_reaches_no_output_gets_zero_gradient():
    g = Graph(["a", "b"])
    g.add("out", Tanh(), "a")
    a, b = np.ones((2, 2), np.float32), np.ones((4, 1), np.float32)
    g.forward([a, b])
    da, db = g.backward(np.ones((2, 2), np.float32))
    assert db.shape == (4, 1) and not db.any()
    assert da.shape == (2, 2) and da.all()


@pytest.mark.parametrize("build, match", [
    (lambda g: g.add("x", ReLU(), "x"), "node name 'x' is already taken"),
    (lambda g: g.add("h", ReLU(), "nowhere"), "reads 'nowhere', which is neither an input"),
    (lambda g: [g.add("h", (r := ReLU()), "x"), g.add("k", r, "h")], "already used by another node"),
    (lambda g: g.set_outputs("nowhere"), "output 'nowhere' is not a node or input"),
])
def test_graph_construction_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build(Graph("x"))


def test_graph_forward_errors():
    g = Graph(["a", "b"])
    g.add("s", Sum(), ["a", "b"])
    with pytest.raises(ShapeError, match=r"Graph: expected a list of 2 inputs \['a', 'b'\], got 1 inputs"):
        g.forward([np.zeros((1, 1), np.float32)])
    with pytest.raises(ShapeError, match="Sum: expected every input of shape"):
        g.forward([np.zeros((1, 1), np.float32), np.zeros((1, 2), np.float32)])


# -- saving and loading --------------------------------------------------------------------
def make_model() -> Sequential:
    return Sequential([Dense(6, 5), SigmoidGenerator(5, 0.2), Dropout(0.1), residual_block_5(),
                       Dense(5, 3)])


def residual_block_5() -> Graph:
    g = Graph("x")
    g.add("fc", Dense(5, 5), "x")
    g.add("out", Sum("relu"), ["fc", "x"])
    return g


def test_save_load_round_trip(tmp_path):
    model = make_model()
    x = R.normal(size=(4, 6)).astype(np.float32)
    path = tmp_path / "model.npz"
    gpunet.save(model, path)
    loaded = gpunet.load(path)
    assert loaded.config() == json.loads(json.dumps(model.config()))
    np.testing.assert_array_equal(loaded.forward(x, training=False), model.forward(x, training=False))
    assert list(loaded.params()) == list(model.params())
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_save_load_float64_keeps_dtype(tmp_path):
    model = Sequential([Dense(2, 2)]).to(dtype=np.float64)
    gpunet.save(model, tmp_path / "m.npz")
    assert gpunet.load(tmp_path / "m.npz").params()["0.weight"].data.dtype == np.float64


def test_load_on_another_device(tmp_path, device):
    model = make_model()
    gpunet.save(model, tmp_path / "m.npz")
    loaded = gpunet.load(tmp_path / "m.npz", device=device)
    assert loaded.device == device
    x = R.normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_allclose(gpunet.to_numpy(loaded.forward(gpunet.asarray(x, device), False)),
                               model.forward(x, False), rtol=1e-5, atol=1e-6)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "m.npz"
    gpunet.save(make_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable gpunet file"):
        gpunet.load(path)


def test_tampered_weights_are_refused(tmp_path):
    path = tmp_path / "m.npz"
    gpunet.save(make_model(), path)
    # rewrite one weight array consistently inside a valid zip: only the header checksum catches it
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = "param/0.weight.npy"
    raw = bytearray(members[name])
    raw[-1] ^= 0x55
    members[name] = bytes(raw)
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        gpunet.load(path)


def test_pickled_arrays_are_never_loaded(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, __header__=np.array([{"format": "gpunet"}], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable gpunet file"):
        gpunet.load(path)


def test_unknown_layer_type_is_refused(tmp_path):
    path = tmp_path / "m.npz"
    from gpunet.serialize import _write
    _write(path, {"kind": "model", "architecture": {"type": "os.system", "args": {}},
                  "dtype": "float32"}, {})
    with pytest.raises(CheckpointError, match="unknown layer type 'os.system'"):
        gpunet.load(path)


def test_not_a_gpunet_file(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(CheckpointError):
        gpunet.load(path)
