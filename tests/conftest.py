"""Shared fixtures: the devices every device-dependent test runs on."""
from __future__ import annotations

import pytest

import gpunet
from helpers import DEVICE_SPECS, open_device
from standin import standin_cupy


@pytest.fixture(params=DEVICE_SPECS)
def device(request):
    yield from open_device(request.param)


@pytest.fixture
def standin():
    """The CuPy stand-in as ``cupy`` for the test's duration (two GPUs, current device 0)."""
    with standin_cupy() as cupy:
        yield cupy


@pytest.fixture(autouse=True)
def _seeded():
    gpunet.seed(1234)
