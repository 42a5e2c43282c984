"""``cupy.lib.stride_tricks`` of the stand-in: NumPy's, under the stand-in's rules (the
results are views of their input, on its device)."""
from numpy.lib import stride_tricks as _np_stride_tricks

from .._core import wrap_function

as_strided = wrap_function(_np_stride_tricks.as_strided, "as_strided")
sliding_window_view = wrap_function(_np_stride_tricks.sliding_window_view,
                                    "sliding_window_view")

__all__ = ["as_strided", "sliding_window_view"]
