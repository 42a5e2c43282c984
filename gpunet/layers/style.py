"""Layers of neural style transfer (Gatys et al. 2015): the Gram matrix of feature maps."""
from __future__ import annotations

from typing import Any

from .base import Layer


class Gram(Layer):
    """The Gram matrix of each sample's feature maps: ``(N, C, H, W) -> (N, C, C)``.

    With ``A`` the ``(C, H W)`` unrolled activations of a sample, ``G = A A^T``:
    ``G[i, j] = sum_k A[i, k] A[j, k]``, how strongly filters ``i`` and ``j`` fire together
    (the diagonal: how active filter ``i`` is). No normalisation: divide by ``C H W`` (or
    use :class:`~gpunet.losses.StyleLoss`, which scales its own sum) where you want one.
    Backward: ``dA = (dG + dG^T) A``. One batched matrix product each way::

        g = Gram().forward(features)  # features (1, 64, 32, 32) -> g (1, 64, 64)
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Any, training: bool | None = None) -> Any:
        self.check_input(x, ndims=(4,))
        n, c, h, w = x.shape
        a = x.reshape(n, c, h * w)
        self.save_for_backward(a, x.shape)
        return self.ops.bmm(a, a, trans_b=True)

    def backward(self, dy: Any) -> Any:
        a, shape = self.saved()
        n, c = shape[:2]
        self.check_grad(dy, (n, c, c))
        # G is quadratic in A: dA = dG A + dG^T A, one product with the symmetrised dG
        return self.ops.bmm(dy + dy.swapaxes(-1, -2), a).reshape(shape)
