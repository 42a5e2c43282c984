"""``cupy.cuda.driver`` of the stand-in: the driver API's error type (CuPy:
``cupy_backends/cuda/api/driver.pyx``), raised by kernel launches."""
from __future__ import annotations

from typing import Any

# CUresult codes and texts (cuGetErrorName / cuGetErrorString)
_ERRORS = {
    400: ("CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"),
    500: ("CUDA_ERROR_NOT_FOUND", "named symbol not found"),
    700: ("CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"),
}


class CUDADriverError(RuntimeError):
    """As CuPy's (``"<name>: <text>"``, ``status``); ``detail`` adds what the stand-in saw,
    which a GPU cannot say."""

    def __init__(self, status: int, detail: str = "") -> None:
        self.status, self.detail = status, detail
        name, text = _ERRORS[status]
        super().__init__(f"{name}: {text}" + (f" ({detail})" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.status, self.detail)
