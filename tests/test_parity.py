"""The device-parity suite under pytest: every registered case on every device."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy as np
import pytest

from gpunet import parity
from helpers import STANDIN_SPECS, open_device
from standin import standin_env
from gpunet.backends import Backend
from gpunet.cli import main
from gpunet.layers import LAYERS

# emulated runs the kernels with the threads of a block resumed in launch order; the
# reverse and shuffled orders (for the cases that launch kernels) show that no result
# depends on the order between barriers.
DEVICES = ["cpu", "emulated", "cuda", *STANDIN_SPECS]
KERNEL_CASES = [name for name in parity.CASES
                if name.startswith(("BatchNorm", "Conv2D", "ConvTranspose2D", "MaxPool2D", "LSTM",
                                    "Bidirectional-LSTM", "LayerNorm", "Embedding", "GELU"))]


@pytest.fixture
def get():
    """``get(spec)``: the device, the stand-in staying installed until the test ends."""
    with contextlib.ExitStack() as stack:
        def open_(spec: str) -> Backend:
            gen = open_device(spec)
            stack.callback(gen.close)
            return next(gen)
        yield open_


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", DEVICES)
@pytest.mark.parametrize("case", parity.CASES)
def test_parity(case, spec, dtype, get):
    device = get(spec)
    result = parity.run_case(case, device, dtype)
    assert result.ok, parity.table([result])
    if spec.startswith("standin-"):
        assert result.device == f"{spec[len('standin-'):]} (CuPy stand-in)"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", ["emulated:reverse", "emulated:shuffled"])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_parity_in_every_thread_order(case, spec, dtype, get):
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


def test_command_line_labels_the_standin():
    """``gpunet parity`` on the stand-in's two GPUs, in a fresh process: every row passes and
    says it ran on the stand-in, not on a GPU."""
    done = subprocess.run([sys.executable, "-m", "gpunet", "parity", "--devices",
                           "cuda:0,cuda:1", "--cases", "BatchNorm-4d,Conv2D,Dense"],
                          env=standin_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("BatchNorm", "Conv2D",
                                                                          "Dense "))]
    assert len(rows) == 12 and all("(CuPy stand-in)" in row for row in rows)
    assert "12 passed, 0 failed" in done.stdout
