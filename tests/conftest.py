"""Shared fixtures: the devices every device-dependent test runs on."""
from __future__ import annotations

import pytest

import gpunet
from gpunet import backends

# CUDA entries are always listed, and skipped with a reason where no GPU is visible, so the
# report shows what did not run.
DEVICE_SPECS = ["cpu", "emulated", "cuda"]


@pytest.fixture(params=DEVICE_SPECS)
def device(request):
    if request.param == "cuda" and not backends._cuda_available():
        pytest.skip("no CUDA device visible (CuPy missing or no GPU)")
    return gpunet.device(request.param)


@pytest.fixture(autouse=True)
def _seeded():
    gpunet.seed(1234)
