"""gpunet.torch_convert: from_torch / to_torch round trips, and outputs and gradients that
agree with PyTorch's autograd on the same input and output gradient."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from gpunet import layers as L  # noqa: E402
from gpunet.torch_convert import from_torch, to_torch  # noqa: E402

TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}
DTYPES = [np.float32, np.float64]


def _torch_name(name):
    """The torch parameter whose gradient is gpunet parameter ``name``'s."""
    parts = name.split(".")
    last, prefix = parts[-1], parts[:-1]
    suffix = ""
    if prefix and prefix[-1] in ("forward", "backward"):  # Bidirectional
        suffix = "_reverse" if prefix[-1] == "backward" else ""
        prefix = prefix[:-1]
    last = {"gamma": "weight", "beta": "bias", "W_x": f"weight_ih_l0{suffix}",
            "W_h": f"weight_hh_l0{suffix}", "b": f"bias_ih_l0{suffix}",
            "b_x": f"bias_ih_l0{suffix}", "b_h": f"bias_hh_l0{suffix}"}.get(last, last)
    return ".".join(prefix + [last])


def _call(module, x):
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    y = module(x)
    return y[0] if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)) else y


def _torch_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def check(module, shape, dtype, ints=None, merged_bias=False, rename=lambda name: name):
    """Round trip, eval-mode forward and one backward of ``module`` against its conversion;
    ``rename`` maps a gpunet parameter name to the torch name (after ``_torch_name``)."""
    rng = np.random.default_rng(0)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    module = module.to(tdtype).eval()
    # a module without tensors (an activation) has no dtype of its own: say which
    layer = from_torch(module, None if list(module.parameters()) else dtype)
    assert layer.dtype == dtype and not layer.training
    # round trip: parameters equal
    back = to_torch(layer)
    assert not back.training
    assert all(p.dtype == tdtype for p in back.parameters())
    a, b = _torch_state(module), _torch_state(back)
    assert sorted(a) == sorted(b)
    for k in a:
        if merged_bias and "bias_" in k:
            continue
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    if merged_bias:  # one gpunet bias: b_ih + b_hh, all in b_ih on the way back
        for k in a:
            if k.startswith("bias_ih"):
                kh = k.replace("bias_ih", "bias_hh")
                np.testing.assert_allclose(b[k], a[k] + a[kh], rtol=1e-6)
                np.testing.assert_array_equal(b[kh], 0)
    again = from_torch(back, dtype).state_dict()
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, again[k], err_msg=k)
    # forward
    if ints is not None:
        x = rng.integers(0, ints, shape)
        xt = torch.from_numpy(x)
    else:
        x = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = _call(module, xt)
    y = layer.forward(x, training=False)
    assert y.dtype == dtype and y.shape == tuple(yt.shape)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL[dtype])
    with torch.no_grad():  # the module converted back computes the same
        np.testing.assert_allclose(_call(back, xt).numpy(), y, **TOL[dtype])
    # backward
    dy = rng.standard_normal(y.shape).astype(dtype)
    module.zero_grad()
    yt.backward(torch.from_numpy(dy))
    layer.zero_grad()
    dx = layer.backward(dy)
    if ints is None:
        np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL[dtype])
    tgrads = dict(module.named_parameters())
    for name, p in layer.params().items():
        tg = tgrads[rename(_torch_name(name))].grad
        np.testing.assert_allclose(p.grad, tg.numpy(), **TOL[dtype], err_msg=name)
    return layer


def rand_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


CASES = {
    "linear": (lambda: nn.Linear(5, 3), (4, 5), {}),
    "linear_nobias": (lambda: nn.Linear(5, 3, bias=False), (4, 5), {}),
    "conv": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 7), {}),
    "conv_rect": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0), bias=False),
                  (2, 2, 5, 6), {}),
    "conv_same": (lambda: nn.Conv2d(2, 3, 3, padding="same"), (1, 2, 5, 5), {}),
    "conv_transpose": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1,
                                                  output_padding=1), (2, 3, 4, 4), {}),
    "batchnorm1d": (lambda: rand_bn(nn.BatchNorm1d(5, eps=1e-3, momentum=0.2)), (6, 5), {}),
    "batchnorm2d": (lambda: rand_bn(nn.BatchNorm2d(3)), (2, 3, 4, 4), {}),
    "layernorm": (lambda: nn.LayerNorm((3, 4), eps=1e-4), (2, 5, 3, 4), {}),
    "layernorm_noaffine": (lambda: nn.LayerNorm(4, elementwise_affine=False), (3, 4), {}),
    "embedding": (lambda: nn.Embedding(10, 4, padding_idx=2), (3, 5), {"ints": 10}),
    "lstm": (lambda: nn.LSTM(3, 4), (5, 2, 3), {"merged_bias": True}),
    "lstm_bi": (lambda: nn.LSTM(3, 4, bidirectional=True), (5, 2, 3), {"merged_bias": True}),
    "gru": (lambda: nn.GRU(3, 4), (5, 2, 3), {}),
    "gru_bi": (lambda: nn.GRU(3, 4, bidirectional=True), (5, 2, 3), {}),
    "rnn_tanh": (lambda: nn.RNN(3, 4), (5, 2, 3), {"merged_bias": True}),
    "rnn_relu": (lambda: nn.RNN(3, 4, nonlinearity="relu"), (5, 2, 3), {"merged_bias": True}),
    "mha": (lambda: _mha(nn.MultiheadAttention(8, 2)), (5, 3, 8), {}),
    "mha_batch_first": (lambda: _mha(nn.MultiheadAttention(8, 4, batch_first=True)),
                        (3, 5, 8), {}),
    "relu": (nn.ReLU, (3, 4), {}),
    "tanh": (nn.Tanh, (3, 4), {}),
    "sigmoid": (nn.Sigmoid, (3, 4), {}),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), (3, 4), {}),
    "elu": (lambda: nn.ELU(0.7), (3, 4), {}),
    "gelu": (nn.GELU, (3, 4), {}),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), (3, 4), {}),
    "softmax": (lambda: nn.Softmax(dim=1), (3, 4, 2), {}),
    "selu": (nn.SELU, (3, 4), {}),
    "softplus": (nn.Softplus, (3, 4), {}),
    "maxpool": (lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 7), {}),
    "avgpool": (lambda: nn.AvgPool2d(2, padding=1), (2, 3, 5, 5), {}),
    "dropout": (lambda: nn.Dropout(0.3), (3, 4), {}),
    "flatten": (nn.Flatten, (2, 3, 4), {}),
    "identity": (nn.Identity, (3, 4), {}),
}


def _mha(m):
    with torch.no_grad():
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    return m


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_module_round_trip_forward_backward(case, dtype):
    torch.manual_seed(0)
    make, shape, kw = CASES[case]
    check(make(), shape, dtype, **kw)


def test_layer_types():
    assert isinstance(from_torch(nn.Linear(2, 3)), L.Dense)
    assert isinstance(from_torch(nn.LSTM(2, 3, bidirectional=True)), L.Bidirectional)
    assert from_torch(nn.LeakyReLU(0.3)).slope == pytest.approx(0.3)
    assert from_torch(nn.Embedding(5, 2, padding_idx=-1)).padding_idx == 4
    bn = from_torch(nn.BatchNorm2d(3, eps=1e-3, momentum=0.3))
    assert (bn.eps, bn.momentum) == (1e-3, 0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_sequential_cnn(dtype):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), rand_bn(nn.BatchNorm2d(6)), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(8, 4), nn.Softmax(dim=-1))
    def rename(name):  # AdaptiveAvgPool2d(1) + Flatten became one GlobalAvgPool2D
        i, rest = name.split(".", 1)
        return f"{int(i) + (int(i) >= 6)}.{rest}"

    layer = check(model, (3, 3, 8, 8), dtype, rename=rename)
    assert isinstance(layer, L.Sequential)
    assert isinstance(layer[6], L.GlobalAvgPool2D) and len(layer.layers) == 10
    assert len(to_torch(layer)) == 11


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_sequential_mlp_batchnorm(dtype):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), rand_bn(nn.BatchNorm1d(16)), nn.Tanh(),
                          nn.Sequential(nn.Linear(16, 8), nn.GELU()), nn.Linear(8, 3))
    check(model, (5, 6), dtype)


def test_batchnorm_training_step_updates_running_statistics_alike():
    """torch's and gpunet's momentum follow the same rule (unbiased batch variance); the
    training-mode (batch statistics) gradients agree too."""
    torch.manual_seed(3)
    bn = rand_bn(nn.BatchNorm2d(3, momentum=0.3)).double().train()
    layer = from_torch(bn)
    assert layer.training
    rng = np.random.default_rng(1)
    x, dy = rng.normal(2.0, 3.0, (4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y_t = bn(xt)
    y_t.backward(torch.from_numpy(dy))
    y = layer.forward(x)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(layer.gamma.grad, bn.weight.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(layer.beta.grad, bn.bias.grad.numpy(), rtol=1e-9)
    st = layer.state_dict()
    np.testing.assert_allclose(st["running_mean"], bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(st["running_var"], bn.running_var.numpy(), rtol=1e-12)
    back = to_torch(layer)
    assert back.training
    np.testing.assert_array_equal(back.running_var.numpy(), st["running_var"])


@pytest.mark.parametrize("model, shape", [
    (lambda: [L.BatchNorm(1), L.Conv2D(1, 2, 3), L.BatchNorm(2), L.ReLU(), L.GlobalAvgPool2D(),
              L.BatchNorm(2), L.Dense(2, 3)], (4, 1, 6, 6)),
    (lambda: [L.BatchNorm(5), L.Dense(5, 3), L.BatchNorm(3), L.ELU()], (4, 5)),
])
def test_to_torch_from_gpunet_model(model, shape):
    """BatchNorm becomes BatchNorm2d or 1d by its place in the Sequential."""
    model = L.Sequential(model()).to(dtype="float64").eval()
    tm = to_torch(model)
    x = np.random.default_rng(0).standard_normal(shape)
    np.testing.assert_allclose(tm(torch.from_numpy(x)).detach().numpy(), model(x),
                               rtol=1e-10, atol=1e-12)
    assert type(to_torch(L.BatchNorm(3))) is nn.BatchNorm1d
    assert type(to_torch(from_torch(nn.BatchNorm2d(3)))) is nn.BatchNorm2d


@pytest.mark.parametrize("module, message", [
    (lambda: nn.Conv1d(2, 3, 3), "no gpunet equivalent for torch.nn.Conv1d"),
    (lambda: nn.Bilinear(2, 2, 3), "no gpunet equivalent for torch.nn.Bilinear"),
    (lambda: nn.PReLU(), "no gpunet equivalent for torch.nn.PReLU"),
])
def test_unsupported_module(module, message):
    with pytest.raises(TypeError, match=message):
        from_torch(module())
    with pytest.raises(TypeError, match="no gpunet equivalent for torch.nn.Conv3d"):
        from_torch(nn.Sequential(nn.Linear(2, 2), nn.Conv3d(1, 1, 1)))


@pytest.mark.parametrize("module, option", [
    (lambda: nn.Conv2d(2, 3, 3, dilation=2), "dilation"),
    (lambda: nn.Conv2d(2, 4, 3, groups=2), "groups"),
    (lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (lambda: nn.ConvTranspose2d(2, 4, 3, dilation=2), "dilation"),
    (lambda: nn.BatchNorm2d(3, affine=False), "affine"),
    (lambda: nn.BatchNorm1d(3, track_running_stats=False), "track_running_stats"),
    (lambda: nn.BatchNorm1d(3, momentum=None), "momentum"),
    (lambda: nn.LSTM(3, 4, batch_first=True), "batch_first"),
    (lambda: nn.GRU(3, 4, num_layers=2), "num_layers"),
    (lambda: nn.RNN(3, 4, bias=False), "bias"),
    (lambda: nn.LSTM(3, 4, proj_size=2), "proj_size"),
    (lambda: nn.MultiheadAttention(8, 2, kdim=4), "kdim"),
    (lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True), "add_bias_kv"),
    (lambda: nn.Embedding(5, 2, max_norm=1.0), "max_norm"),
    (lambda: nn.Softplus(beta=2), "beta"),
    (lambda: nn.Softmax(), "dim=None"),
    (lambda: nn.AvgPool2d(2, padding=1, count_include_pad=False), "count_include_pad"),
    (lambda: nn.AvgPool2d(2, ceil_mode=True), "ceil_mode"),
    (lambda: nn.MaxPool2d(2, dilation=2), "dilation"),
    (lambda: nn.MaxPool2d(2, return_indices=True), "return_indices"),
    (lambda: nn.Flatten(0), "start_dim"),
    (lambda: nn.AdaptiveAvgPool2d(1), "AdaptiveAvgPool2d"),
    (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()), "AdaptiveAvgPool2d"),
])
def test_unsupported_option(module, option):
    with pytest.raises(ValueError, match=option):
        from_torch(module())


def test_bad_arguments():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        from_torch(L.Dense(2, 2))
    with pytest.raises(TypeError, match="expected a gpunet Layer"):
        to_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="no torch.nn equivalent for gpunet Gram"):
        to_torch(L.Gram())
    with pytest.raises(ValueError, match="return_state"):
        to_torch(L.LSTM(2, 3, return_state=True))
    with pytest.raises(ValueError, match="causal"):
        to_torch(L.MultiHeadAttention(4, 2, causal=True))
