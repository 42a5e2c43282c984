"""Convert between ``torch.nn`` modules and gpunet layers, weights and buffers included.

``from_torch(module)`` builds the equivalent gpunet layer (a :class:`~gpunet.Sequential` for
``nn.Sequential``, recursively) on the CPU, in the module's float dtype (float32 or float64),
in the module's mode (``train``/``eval``); ``to_torch(layer)`` builds the ``torch.nn`` module
back, on the CPU, in the layer's dtype and mode. PyTorch is imported only when one of them is
called.

Rules where the two differ in names or layout (every conversion is exact: outputs and
gradients agree):

- ``nn.Linear`` <-> ``Dense``: ``weight (out, in)`` and ``bias`` under the same names.
- ``nn.Conv2d`` <-> ``Conv2D`` and ``nn.ConvTranspose2d`` <-> ``ConvTranspose2D``: the same
  weight layouts (``(out, in, kh, kw)`` and ``(in, out, kh, kw)``), stride and padding;
  integer padding only (``"same"``/``"valid"`` become numbers), zero padding mode;
  ``dilation`` other than 1 and ``groups`` other than 1 are errors.
- ``nn.BatchNorm1d/2d`` <-> ``BatchNorm``: ``weight``/``bias`` are ``gamma``/``beta``;
  ``running_mean``, ``running_var``, ``eps`` and ``momentum`` copy over (both update
  ``running = (1 - momentum) running + momentum batch`` with the unbiased batch variance).
  ``affine=False``, ``track_running_stats=False`` and ``momentum=None`` (cumulative
  average) are errors. ``num_batches_tracked`` is not kept (to_torch sets it to 0).
  gpunet's BatchNorm takes ``(N, F)`` and ``(N, C, H, W)``; ``to_torch`` gives back the
  class it came from, else, in a Sequential, ``BatchNorm2d`` after a convolution or pooling
  (or first, before one) and ``BatchNorm1d`` otherwise.
- ``nn.LSTM`` <-> ``LSTM``: the same gate order (i, f, g, o) and layouts
  (``weight_ih_l0 (4H, I)`` is ``W_x``, ``weight_hh_l0 (4H, H)`` is ``W_h``). gpunet has
  one bias: ``b = bias_ih_l0 + bias_hh_l0``; ``to_torch`` puts ``b`` into ``bias_ih_l0`` and
  zeros into ``bias_hh_l0``. ``nn.RNN`` <-> ``RNN`` likewise (``b`` the sum; ``tanh`` or
  ``relu``). ``nn.GRU`` <-> ``GRU`` (gates r, z, n) keeps both biases: ``b_x = bias_ih_l0``,
  ``b_h = bias_hh_l0``.
  All are time-major ``(T, N, F)``; ``batch_first=True``, ``num_layers > 1``,
  ``bias=False``, ``dropout``, ``proj_size`` are errors. ``bidirectional=True`` becomes
  :class:`~gpunet.layers.Bidirectional` (``merge="concat"``), the ``_reverse`` weights in
  its ``backward`` layer. gpunet's layers return the output sequence only (PyTorch's
  ``output`` of ``output, h_n``).
- ``nn.MultiheadAttention`` <-> ``MultiHeadAttention``: the same names
  (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``),
  ``num_heads``, ``dropout`` and ``batch_first``; separate ``kdim``/``vdim``,
  ``add_bias_kv`` and ``add_zero_attn`` are errors.
- ``nn.LayerNorm``, ``nn.Embedding`` (``padding_idx``; ``max_norm`` is an error): the same
  names. Activations: ``ReLU``, ``Tanh``, ``Sigmoid``, ``LeakyReLU(negative_slope)`` (gpunet's
  ``slope``), ``ELU(alpha)``, ``GELU(approximate)``, ``SELU``, ``Softplus`` (``beta=1``
  only), ``Softmax(dim)`` (``axis``; ``dim=None`` is an error).
- Pooling: ``MaxPool2d`` (no dilation, ``ceil_mode``, ``return_indices``), ``AvgPool2d``
  (``count_include_pad=True``, no ``ceil_mode``, no ``divisor_override``).
  ``AdaptiveAvgPool2d(1)`` followed by ``Flatten`` inside an ``nn.Sequential`` becomes
  ``GlobalAvgPool2D`` (which returns ``(N, C)``); ``to_torch(GlobalAvgPool2D())`` is
  ``nn.Sequential(AdaptiveAvgPool2d(1), Flatten())`` (spliced into an enclosing
  Sequential). ``AdaptiveAvgPool2d`` elsewhere is an error.
- ``Dropout(p)``, ``Flatten`` (``start_dim=1, end_dim=-1`` only), ``Identity``,
  ``Sequential``.

Training-mode randomness is not carried over: ``Dropout`` and attention dropout draw their
masks from gpunet's seeded stream, not torch's. A float16 or bfloat16 module converts to
float32.

Anything else raises ``TypeError("from_torch: no gpunet equivalent for torch.nn.X")`` (or
``to_torch: no torch.nn equivalent for gpunet X``); an unsupported option of a supported
module raises ``ValueError`` naming the module and the option.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> layer = from_torch(net)                   # gpunet Sequential([Dense(4, 8), ReLU()])
    >>> back = to_torch(layer)                    # torch.nn.Sequential, the same weights
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import layers as L
from .layers.base import Layer

__all__ = ["from_torch", "to_torch"]


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("gpunet.torch_convert needs PyTorch: pip install torch") from e
    return torch


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


def _dtype(module: Any) -> np.dtype:
    """float64 if the module's first floating-point tensor is float64, else float32."""
    torch = _torch()
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return np.dtype(np.float64) if t.dtype == torch.float64 else np.dtype(np.float32)
    return np.dtype(np.float32)


def _option(module: Any, what: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"from_torch: torch.nn.{type(module).__name__} with {what} has no "
                         f"gpunet equivalent")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


# --------------------------------------------------------------------------- torch -> gpunet

def _linear(m: Any) -> tuple[Layer, dict]:
    layer = L.Dense(m.in_features, m.out_features, bias=m.bias is not None)
    return layer, {"weight": m.weight, "bias": m.bias}


def _conv(m: Any) -> tuple[Layer, dict]:
    _option(m, f"dilation={m.dilation}", tuple(m.dilation) == (1, 1))
    _option(m, f"groups={m.groups}", m.groups == 1)
    _option(m, f"padding_mode={m.padding_mode!r}", m.padding_mode == "zeros")
    padding = m.padding
    if isinstance(padding, str):
        padding = "same" if padding == "same" else (0, 0)
    layer = L.Conv2D(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                     padding, bias=m.bias is not None)
    return layer, {"weight": m.weight, "bias": m.bias}


def _conv_transpose(m: Any) -> tuple[Layer, dict]:
    _option(m, f"dilation={m.dilation}", tuple(m.dilation) == (1, 1))
    _option(m, f"groups={m.groups}", m.groups == 1)
    layer = L.ConvTranspose2D(m.in_channels, m.out_channels, tuple(m.kernel_size),
                              tuple(m.stride), tuple(m.padding), tuple(m.output_padding),
                              bias=m.bias is not None)
    return layer, {"weight": m.weight, "bias": m.bias}


def _batchnorm(m: Any) -> tuple[Layer, dict]:
    _option(m, "affine=False", m.affine)
    _option(m, "track_running_stats=False", m.track_running_stats)
    _option(m, "momentum=None", m.momentum is not None)
    layer = L.BatchNorm(m.num_features, eps=m.eps, momentum=m.momentum)
    setattr(layer, "_torch_class", type(m).__name__)  # what to_torch gives back
    return layer, {"gamma": m.weight, "beta": m.bias, "running_mean": m.running_mean,
                   "running_var": m.running_var}


def _layernorm(m: Any) -> tuple[Layer, dict]:
    _option(m, "bias=False", not m.elementwise_affine or m.bias is not None)
    layer = L.LayerNorm(tuple(m.normalized_shape), eps=m.eps,
                        elementwise_affine=m.elementwise_affine)
    return layer, ({"weight": m.weight, "bias": m.bias} if m.elementwise_affine else {})


def _embedding(m: Any) -> tuple[Layer, dict]:
    _option(m, f"max_norm={m.max_norm}", m.max_norm is None)
    _option(m, "sparse=True", not m.sparse)
    layer = L.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
    return layer, {"weight": m.weight}


def _recurrent(m: Any) -> tuple[Layer, dict]:
    torch = _torch()
    _option(m, "batch_first=True", not m.batch_first)
    _option(m, f"num_layers={m.num_layers}", m.num_layers == 1)
    _option(m, "bias=False", m.bias)
    _option(m, f"dropout={m.dropout}", m.dropout == 0)
    _option(m, f"proj_size={getattr(m, 'proj_size', 0)}", getattr(m, "proj_size", 0) == 0)
    i, h = m.input_size, m.hidden_size
    if isinstance(m, torch.nn.LSTM):
        make: Callable[[], Layer] = lambda: L.LSTM(i, h)
    elif isinstance(m, torch.nn.GRU):
        make = lambda: L.GRU(i, h)
    else:
        _option(m, f"nonlinearity={m.nonlinearity!r}", m.nonlinearity in ("tanh", "relu"))
        make = lambda: L.RNN(i, h, activation=m.nonlinearity)
    gru = isinstance(m, torch.nn.GRU)

    def weights(prefix: str, suffix: str) -> dict:
        g = lambda n: getattr(m, f"{n}_l0{suffix}")
        out = {f"{prefix}W_x": g("weight_ih"), f"{prefix}W_h": g("weight_hh")}
        if gru:
            out.update({f"{prefix}b_x": g("bias_ih"), f"{prefix}b_h": g("bias_hh")})
        else:
            out[f"{prefix}b"] = g("bias_ih") + g("bias_hh")
        return out

    if m.bidirectional:
        return (L.Bidirectional(make()),
                {**weights("forward.", ""), **weights("backward.", "_reverse")})
    return make(), weights("", "")


def _attention(m: Any) -> tuple[Layer, dict]:
    _option(m, "kdim or vdim other than embed_dim", m._qkv_same_embed_dim)
    _option(m, "add_bias_kv=True", m.bias_k is None)
    _option(m, "add_zero_attn=True", not m.add_zero_attn)
    bias = m.in_proj_bias is not None
    layer = L.MultiHeadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=bias,
                                 batch_first=m.batch_first)
    return layer, {"in_proj_weight": m.in_proj_weight, "in_proj_bias": m.in_proj_bias,
                   "out_proj.weight": m.out_proj.weight, "out_proj.bias": m.out_proj.bias}


def _maxpool(m: Any) -> tuple[Layer, dict]:
    _option(m, f"dilation={m.dilation}", _pair(m.dilation) == (1, 1))
    _option(m, "ceil_mode=True", not m.ceil_mode)
    _option(m, "return_indices=True", not m.return_indices)
    return L.MaxPool2D(_pair(m.kernel_size), _pair(m.stride), _pair(m.padding)), {}


def _avgpool(m: Any) -> tuple[Layer, dict]:
    _option(m, "ceil_mode=True", not m.ceil_mode)
    _option(m, "count_include_pad=False", m.count_include_pad)
    _option(m, f"divisor_override={m.divisor_override}", m.divisor_override is None)
    return L.AvgPool2D(_pair(m.kernel_size), _pair(m.stride), _pair(m.padding)), {}


def _simple(m: Any) -> tuple[Layer, dict]:
    torch = _torch()
    nn = torch.nn
    if isinstance(m, nn.LeakyReLU):
        return L.LeakyReLU(m.negative_slope), {}
    if isinstance(m, nn.ELU):
        return L.ELU(m.alpha), {}
    if isinstance(m, nn.GELU):
        return L.GELU(m.approximate), {}
    if isinstance(m, nn.Softmax):
        _option(m, "dim=None", m.dim is not None)
        return L.Softmax(m.dim), {}
    if isinstance(m, nn.Softplus):
        _option(m, f"beta={m.beta}", m.beta == 1)
        return L.Softplus(), {}
    if isinstance(m, nn.Dropout):
        return L.Dropout(m.p), {}
    if isinstance(m, nn.Flatten):
        _option(m, f"start_dim={m.start_dim}, end_dim={m.end_dim}",
                (m.start_dim, m.end_dim) == (1, -1))
        return L.Flatten(), {}
    plain = {nn.ReLU: L.ReLU, nn.Tanh: L.Tanh, nn.Sigmoid: L.Sigmoid, nn.SELU: L.SELU,
             nn.Identity: L.Identity}
    return plain[type(m)](), {}


def _converters() -> dict[Any, Callable[[Any], tuple[Layer, dict]]]:
    nn = _torch().nn
    table: dict[Any, Callable[[Any], tuple[Layer, dict]]] = {
        nn.Linear: _linear, nn.Conv2d: _conv, nn.ConvTranspose2d: _conv_transpose,
        nn.BatchNorm1d: _batchnorm, nn.BatchNorm2d: _batchnorm, nn.LayerNorm: _layernorm,
        nn.Embedding: _embedding, nn.LSTM: _recurrent, nn.GRU: _recurrent, nn.RNN: _recurrent,
        nn.MultiheadAttention: _attention, nn.MaxPool2d: _maxpool, nn.AvgPool2d: _avgpool,
    }
    for cls in (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Softmax,
                nn.SELU, nn.Softplus, nn.Dropout, nn.Flatten, nn.Identity):
        table[cls] = _simple
    return table


def _is_global_pool(m: Any) -> bool:
    nn = _torch().nn
    return isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1)


def from_torch(module: Any, dtype: Any = None) -> Layer:
    """The gpunet layer (or :class:`~gpunet.Sequential`) equivalent to ``torch.nn`` module
    ``module``, with copies of its weights and buffers, on the CPU in its mode and in
    ``dtype``: by default the dtype of its first floating-point tensor (float32 or float64),
    float32 for a module without tensors (an activation, a pooling). See the module
    docstring for what converts and how."""
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    dtype = _dtype(module) if dtype is None else np.dtype(dtype)
    if isinstance(module, torch.nn.Sequential):
        children, out, k = list(module), list[Layer](), 0
        while k < len(children):
            child = children[k]
            if _is_global_pool(child) and k + 1 < len(children) \
                    and isinstance(children[k + 1], torch.nn.Flatten) \
                    and (children[k + 1].start_dim, children[k + 1].end_dim) == (1, -1):
                out.append(L.GlobalAvgPool2D())
                k += 2
                continue
            out.append(from_torch(child, dtype))
            k += 1
        layer: Layer = L.Sequential(out).to(dtype=dtype)
        return layer.train(module.training)
    if isinstance(module, torch.nn.AdaptiveAvgPool2d):
        raise ValueError("from_torch: torch.nn.AdaptiveAvgPool2d converts only as "
                         "AdaptiveAvgPool2d(1) followed by Flatten() in an nn.Sequential "
                         "(to GlobalAvgPool2D)")
    convert = _converters().get(type(module))
    if convert is None:
        raise TypeError(f"from_torch: no gpunet equivalent for torch.nn."
                        f"{type(module).__name__}")
    layer, tensors = convert(module)
    layer.to(dtype=dtype)
    state = {k: _np(v) for k, v in tensors.items() if v is not None}
    if state:
        layer.load_state_dict(state)
    return layer.train(module.training)


# --------------------------------------------------------------------------- gpunet -> torch

def _recurrent_to_torch(layer: Any) -> tuple[Any, dict]:
    nn = _torch().nn
    bi = isinstance(layer, L.Bidirectional)
    base = layer.forward_layer if bi else layer
    if bi and layer.merge != "concat":
        raise ValueError("to_torch: gpunet Bidirectional with merge='sum' has no torch.nn "
                         "equivalent")
    if getattr(base, "return_state", False):
        raise ValueError(f"to_torch: gpunet {type(base).__name__} with return_state=True has "
                         f"no torch.nn equivalent (torch's always returns (output, h_n))")
    i, h = base.input_sizes[0], base.hidden_size
    if isinstance(base, L.LSTM):
        module = nn.LSTM(i, h, bidirectional=bi)
    elif isinstance(base, L.GRU):
        module = nn.GRU(i, h, bidirectional=bi)
    else:
        if base.activation not in ("tanh", "relu"):
            raise ValueError(f"to_torch: gpunet RNN with activation={base.activation!r} has "
                             f"no torch.nn equivalent (tanh or relu)")
        module = nn.RNN(i, h, nonlinearity=base.activation, bidirectional=bi)
    state: dict[str, np.ndarray] = {}
    parts = [(layer.forward_layer, ""), (layer.backward_layer, "_reverse")] if bi \
        else [(layer, "")]
    for part, suffix in parts:
        p = {k: v for k, v in part.state_dict().items()}
        state[f"weight_ih_l0{suffix}"] = p["W_x"]
        state[f"weight_hh_l0{suffix}"] = p["W_h"]
        if isinstance(base, L.GRU):
            state[f"bias_ih_l0{suffix}"], state[f"bias_hh_l0{suffix}"] = p["b_x"], p["b_h"]
        else:
            state[f"bias_ih_l0{suffix}"] = p["b"]
            state[f"bias_hh_l0{suffix}"] = np.zeros_like(p["b"])
    return module, state


_SPATIAL = (L.Conv2D, L.ConvTranspose2D, L.MaxPool2D, L.AvgPool2D)
_FLAT = (L.Dense, L.Flatten, L.GlobalAvgPool2D)


def _batchnorm_classes(layers: list[Layer]) -> dict[int, str]:
    """``BatchNorm1d`` or ``BatchNorm2d`` for each gpunet BatchNorm of a Sequential: its
    input is 4-D after a convolution or pooling, 2-D after Dense, Flatten or
    GlobalAvgPool2D; at the start, what follows decides (a convolution, Flatten or global
    pooling after it: 4-D)."""
    out: dict[int, str] = {}
    rank = 0
    for i, layer in enumerate(layers):
        if isinstance(layer, _SPATIAL):
            rank = 4
        elif isinstance(layer, _FLAT):
            rank = 2
        elif isinstance(layer, L.BatchNorm):
            if rank == 0:
                after = [x for x in layers[i + 1:] if isinstance(x, _SPATIAL + _FLAT)]
                rank = 2 if not after or isinstance(after[0], L.Dense) else 4
            out[i] = "BatchNorm2d" if rank == 4 else "BatchNorm1d"
    return out


def _to_torch_one(layer: Any, batchnorm: str | None = None) -> tuple[Any, dict]:
    nn = _torch().nn
    st = layer.state_dict()
    if isinstance(layer, L.Dense):
        return nn.Linear(layer.in_features, layer.out_features,
                         bias=layer.bias is not None), st
    if isinstance(layer, L.Conv2D):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride,
                         layer.padding, bias=layer.bias is not None), st
    if isinstance(layer, L.ConvTranspose2D):
        return nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel,
                                  layer.stride, layer.padding, layer.output_padding,
                                  bias=layer.bias is not None), st
    if isinstance(layer, L.BatchNorm):
        if layer.sync:
            raise ValueError("to_torch: gpunet BatchNorm with sync=True: use "
                             "torch.nn.SyncBatchNorm by hand")
        # BatchNorm1d and 2d differ only in the input ranks they accept (2-D, 4-D): the
        # class it came from, else what its neighbours in a Sequential tell, else 1d
        cls = getattr(layer, "_torch_class", None) or batchnorm or "BatchNorm1d"
        return getattr(nn, cls)(layer.features, eps=layer.eps, momentum=layer.momentum), \
            {"weight": st["gamma"], "bias": st["beta"], "running_mean": st["running_mean"],
             "running_var": st["running_var"]}
    if isinstance(layer, L.LayerNorm):
        return nn.LayerNorm(layer.normalized_shape, eps=layer.eps,
                            elementwise_affine=layer.elementwise_affine), st
    if isinstance(layer, L.Embedding):
        return nn.Embedding(layer.num_embeddings, layer.embedding_dim,
                            padding_idx=layer.padding_idx), st
    if isinstance(layer, (L.LSTM, L.GRU, L.RNN, L.Bidirectional)):
        return _recurrent_to_torch(layer)
    if isinstance(layer, L.MultiHeadAttention):
        if layer.causal:
            raise ValueError("to_torch: gpunet MultiHeadAttention with causal=True: torch's "
                             "takes the causal mask as an argument of forward; convert with "
                             "causal=False and pass attn_mask")
        return nn.MultiheadAttention(layer.embed_dim, layer.num_heads, dropout=layer.dropout,
                                     bias=layer.in_proj_bias is not None,
                                     batch_first=layer.batch_first), st
    simple: dict[type, Callable[[], Any]] = {
        L.ReLU: nn.ReLU, L.Tanh: nn.Tanh, L.Sigmoid: nn.Sigmoid, L.SELU: nn.SELU,
        L.Softplus: nn.Softplus, L.Flatten: nn.Flatten, L.Identity: nn.Identity,
        L.LeakyReLU: lambda: nn.LeakyReLU(layer.slope), L.ELU: lambda: nn.ELU(layer.alpha),
        L.GELU: lambda: nn.GELU(layer.approximate), L.Softmax: lambda: nn.Softmax(layer.axis),
        L.Dropout: lambda: nn.Dropout(layer.p),
        L.MaxPool2D: lambda: nn.MaxPool2d(layer.kernel, layer.stride, layer.padding),
        L.AvgPool2D: lambda: nn.AvgPool2d(layer.kernel, layer.stride, layer.padding),
        L.GlobalAvgPool2D: lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    }
    make = simple.get(type(layer))
    if make is None:
        raise TypeError(f"to_torch: no torch.nn equivalent for gpunet {type(layer).__name__}")
    return make(), {}


def to_torch(layer: Layer) -> Any:
    """The ``torch.nn`` module equivalent to gpunet ``layer`` (``nn.Sequential`` for
    :class:`~gpunet.Sequential`, recursively), with copies of its weights and buffers, on
    the CPU in the layer's dtype and mode. See the module docstring for the rules."""
    return _to_torch(layer, None)


def _to_torch(layer: Layer, batchnorm: str | None) -> Any:
    """:func:`to_torch`; ``batchnorm`` the class a BatchNorm becomes (None: its own)."""
    torch = _torch()
    if not isinstance(layer, Layer):
        raise TypeError(f"to_torch: expected a gpunet Layer, got {type(layer).__name__}")
    tdtype = torch.float64 if layer.dtype == np.float64 else torch.float32
    if isinstance(layer, L.Sequential):
        mods, bns = [], _batchnorm_classes(layer.layers)
        for i, child in enumerate(layer.layers):
            m = _to_torch(child, bns.get(i))
            if isinstance(child, L.GlobalAvgPool2D):
                mods.extend(m)
            else:
                mods.append(m)
        return torch.nn.Sequential(*mods).to(tdtype).train(layer.training)
    module, state = _to_torch_one(layer, batchnorm)
    module = module.to(tdtype)
    if state:
        with torch.no_grad():
            own = module.state_dict()
            for k, v in state.items():
                own[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    return module.train(layer.training)
