"""Containers: a chain of layers, and a graph of named nodes (residual blocks, U-Nets)."""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import ShapeError
from .base import Layer


class Sequential(Layer):
    """``y = f_k(... f_2(f_1(x)))``; backward runs the layers in reverse.
    Parameters are named ``"<index>.<name>"``, e.g. ``"0.weight"``. Like every layer, a
    container lives on the CPU in float32 until ``to`` moves it and its children.

    >>> import numpy as np
    >>> from gpunet.layers import Dense, ReLU
    >>> model = Sequential([Dense(4, 32), ReLU(), Dense(32, 3)])
    >>> sorted(model.params())
    ['0.bias', '0.weight', '2.bias', '2.weight']
    >>> y = model(np.ones((8, 4), np.float32))
    >>> model.backward(np.ones_like(y)).shape    # dx; every layer's gradients accumulated
    (8, 4)
    >>> model = model.to("cpu", "float64")       # or "cuda", "emulated"
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        super().__init__()
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: expected a Layer at position {i}, "
                                f"got {type(layer).__name__}")
            layer.to(self.ops, self.dtype)

    def children(self) -> dict[str, Layer]:
        return {str(i): layer for i, layer in enumerate(self.layers)}

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: Any, training: bool | None = None) -> Any:
        for layer in self.layers:
            x = layer.forward(x, training)
        self.save_for_backward()
        return x

    def backward(self, dy: Any) -> Any:
        for layer in reversed(self.layers):
            if dy is None:  # a leading layer without parameters whose input needs no gradient
                layer.forget()
                continue
            dy = layer.backward(dy)
        return dy

    def set_input_grad(self, needed: bool) -> "Sequential":
        """Tell the layers that read the chain's input (see :meth:`Layer.set_input_grad`):
        without an input gradient a leading layer that has no parameters (``TimeMajor``,
        ``Flatten``) needs no output gradient either, so the next layer is told as well, up
        to and including the first layer with parameters."""
        for layer in self.layers:
            layer.set_input_grad(needed)
            if layer.params():
                break
        return super().set_input_grad(needed)


class Graph(Layer):
    """A directed acyclic graph of named nodes.

    ``inputs`` names the graph's inputs (one name: ``forward`` takes an array; several: a list
    in that order). Each node is ``(name, layer, sources)``: ``sources`` is one name (the layer
    gets that array) or a list of names (the layer gets a list: fan-in, as for ``Sum`` and
    ``Concat``). A node may only read inputs and earlier nodes, so the order of ``add`` is a
    topological order. A node read by several others (fan-out) receives the sum of their
    gradients. ``outputs`` names the result (a list gives several); by default the last node.

    Example, a residual block ``out = relu(fc(x)) + x``:

    >>> import numpy as np
    >>> from gpunet.layers import Dense, ReLU, Sum
    >>> g = Graph("x")
    >>> g = g.add("fc", Dense(16, 16), "x").add("act", ReLU(), "fc")
    >>> g = g.add("out", Sum(), ["act", "x"])
    >>> y = g(np.ones((2, 16), np.float32))
    >>> g.backward(np.ones_like(y)).shape        # dx: the block's path and the skip add up
    (2, 16)
    """

    def __init__(self, inputs: str | Sequence[str] = "x",
                 nodes: Sequence[Sequence[Any]] = (),
                 outputs: str | Sequence[str] | None = None) -> None:
        super().__init__()
        self.input_names = [inputs] if isinstance(inputs, str) else list(inputs)
        self._single_input = isinstance(inputs, str)
        self._nodes: list[tuple[str, Layer, str | list[str]]] = []
        self._args["nodes"] = []
        if not isinstance(nodes, (list, tuple)):
            raise TypeError(f"Graph: expected nodes as a list of [name, layer, sources], got "
                            f"{type(nodes).__name__}")
        for i, node in enumerate(nodes):
            if not isinstance(node, (list, tuple)) or len(node) != 3:
                raise TypeError(f"Graph: expected node {i} as [name, layer, sources], got "
                                f"{node!r}")
            self.add(*node)
        self.set_outputs(outputs)

    def add(self, name: str, layer: Layer, sources: str | Sequence[str]) -> "Graph":
        """Append node ``name`` computing ``layer`` of ``sources``; returns the graph."""
        known = set(self.input_names) | {n for n, _, _ in self._nodes}
        if name in known:
            raise ValueError(f"Graph: node name {name!r} is already taken")
        if not isinstance(layer, Layer):
            raise TypeError(f"Graph: expected a Layer for node {name!r}, got {type(layer).__name__}")
        if any(layer is other for _, other, _ in self._nodes):
            raise ValueError(f"Graph: the layer of node {name!r} is already used by another "
                             "node (a layer keeps one forward's state; share weights otherwise)")
        srcs = sources if isinstance(sources, str) else list(sources)
        for src in [srcs] if isinstance(srcs, str) else srcs:
            if src not in known:
                raise ValueError(f"Graph: node {name!r} reads {src!r}, which is neither an "
                                 f"input nor an earlier node")
        layer.to(self.ops, self.dtype)
        self._nodes.append((name, layer, srcs))
        self._args["nodes"].append([name, layer, srcs])
        if self._args.get("outputs") is None:
            self.output_names = [name]
        return self

    def set_outputs(self, outputs: str | Sequence[str] | None) -> None:
        self._args["outputs"] = outputs
        self._single_output = outputs is None or isinstance(outputs, str)
        if outputs is None:
            self.output_names = [self._nodes[-1][0]] if self._nodes else []
            return
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        known = set(self.input_names) | {n for n, _, _ in self._nodes}
        for n in names:
            if n not in known:
                raise ValueError(f"Graph: output {n!r} is not a node or input")
        self.output_names = names

    def children(self) -> dict[str, Layer]:
        return {name: layer for name, layer, _ in self._nodes}

    def forward(self, x: Any, training: bool | None = None) -> Any:
        xs = [x] if self._single_input else x
        if not isinstance(xs, (list, tuple)) or len(xs) != len(self.input_names):
            got = f"{len(xs)} inputs" if isinstance(xs, (list, tuple)) else type(xs).__name__
            raise ShapeError(f"Graph: expected a list of {len(self.input_names)} inputs "
                             f"{self.input_names}, got {got}")
        if not self.output_names:
            raise ValueError("Graph: the graph has no nodes")
        values = dict(zip(self.input_names, xs))
        for name, layer, srcs in self._nodes:
            arg = values[srcs] if isinstance(srcs, str) else [values[s] for s in srcs]
            values[name] = layer.forward(arg, training)
        self.save_for_backward([values[n].shape for n in self.input_names])
        outs = [values[n] for n in self.output_names]
        return outs[0] if self._single_output else outs

    def backward(self, dy: Any) -> Any:
        (input_shapes,) = self.saved()
        dys = [dy] if self._single_output else list(dy)
        if len(dys) != len(self.output_names):
            raise ShapeError(f"Graph: expected {len(self.output_names)} output gradients, "
                             f"got {len(dys)}")
        grads: dict[str, Any] = {}

        def accumulate(name: str, g: Any) -> None:
            # out of place: a gradient array may be shared (Sum hands one to every input)
            grads[name] = g if name not in grads else grads[name] + g

        for name, g in zip(self.output_names, dys):
            accumulate(name, g)
        for name, layer, srcs in reversed(self._nodes):
            if name not in grads:
                continue  # this node does not reach an output: its gradient is zero
            dx = layer.backward(grads.pop(name))
            if isinstance(srcs, str):
                accumulate(srcs, dx)
            else:
                for src, d in zip(srcs, dx):
                    accumulate(src, d)
        dxs = [grads[n] if n in grads else self.ops.zeros(shape, self.dtype)
               for n, shape in zip(self.input_names, input_shapes)]
        return dxs[0] if self._single_input else dxs
