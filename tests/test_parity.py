"""The device-parity suite under pytest: every registered case on every device."""
from __future__ import annotations

import numpy as np
import pytest

import gpunet
from gpunet import parity
from gpunet.backends import Backend, _cuda_available
from gpunet.cli import main
from gpunet.layers import LAYERS

# emulated runs the kernels with the threads of a block resumed in launch order; the
# reverse and shuffled orders (for the cases that launch kernels) show that no result
# depends on the order between barriers.
DEVICES = ["cpu", "emulated", "cuda"]
KERNEL_CASES = [name for name in parity.CASES
                if name.startswith(("BatchNorm", "Conv2D", "MaxPool2D", "LSTM"))]


def get(spec: str) -> Backend:
    if spec == "cuda" and not _cuda_available():
        pytest.skip("no CUDA device visible (CuPy missing or no GPU)")
    return gpunet.device(spec)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", DEVICES)
@pytest.mark.parametrize("case", parity.CASES)
def test_parity(case, spec, dtype):
    result = parity.run_case(case, get(spec), dtype)
    assert result.ok, parity.table([result])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", ["emulated:reverse", "emulated:shuffled"])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_parity_in_every_thread_order(case, spec, dtype):
    result = parity.run_case(case, get(spec), dtype)
    assert result.ok, parity.table([result])


def test_every_layer_has_a_parity_case():
    covered = {type(parity.CASES[name].build()).__name__ for name in parity.CASES}
    assert set(LAYERS) <= covered, f"layers without a parity case: {set(LAYERS) - covered}"


class _OffByALittle(Backend):
    """A device whose tanh is wrong in the fourth digit: parity must notice."""

    def __init__(self) -> None:
        super().__init__(np, "cpu-broken")

    def tanh(self, x):
        return np.tanh(x) * (1 + 1e-3)


def test_parity_catches_a_wrong_device():
    result = parity.run_case("Tanh", _OffByALittle(), "float32")
    assert not result.ok and result.errors["forward"] > 1
    assert "FAIL" in parity.table([result])


def test_command_line(capsys):
    assert main(["parity", "--devices", "cpu,emulated", "--cases", "BatchNorm-4d,Dense"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm-4d" in out and "emulated" in out and "8 passed, 0 failed" in out
    with pytest.raises(SystemExit):
        main(["parity", "--nonsense"])
    assert main(["parity", "--cases", "NoSuchLayer"]) == 2
