"""Every .cu file compiles under NVRTC for compute capabilities 7.0, 8.0 and 9.0; the kernel
table, source expansion and the register report."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpunet import KernelCompileError, kernels, nvrtc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def needs_nvrtc():
    """Skip, saying why, where NVIDIA's NVRTC is not installed (the ``nvrtc`` extra; CI has it)."""
    try:
        nvrtc.library()
    except KernelCompileError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("arch", ["compute_70", "compute_80", "compute_90"])
@pytest.mark.parametrize("file", sorted(kernels.KERNELS))
def test_kernel_compiles_under_nvrtc(file, arch, needs_nvrtc):
    path = kernels.kernel_dir() / file
    exprs = kernels.name_expressions(file)
    ptx, lowered = nvrtc.compile_ptx(path.read_text(), str(path), arch,
                                     include_paths=[kernels.kernel_dir()], name_expressions=exprs)
    assert f".target sm_{arch[-2:]}" in ptx
    for expr in exprs:  # every instantiation is a real entry point in the PTX
        assert f".entry {lowered[expr]}(" in ptx


def test_every_kernel_file_is_in_the_table():
    on_disk = {p.name for p in kernels.kernel_dir().glob("*.cu")}
    assert on_disk == set(kernels.KERNELS)
    assert kernels.name_expression("bn_backward_dx", "float64") == "bn_backward_dx<double>"
    with pytest.raises(TypeError, match="kernel bn_reduce_nc: expected float32 or float64 data, got int32"):
        kernels.name_expression("bn_reduce_nc", "int32")
    with pytest.raises(KeyError, match="no kernel named 'nope'"):
        kernels.file_of("nope")


def test_expanded_source_inlines_headers_with_line_markers():
    text = kernels.expanded_source("batchnorm.cu")
    assert '#include "common.cuh"' not in text
    assert "gpunet_warp_sum" in text
    assert f'#line 1 "{kernels.kernel_dir() / "common.cuh"}"' in text


def test_the_expanded_source_compiles(needs_nvrtc):  # what CuPy is given on a GPU
    ptx, _ = nvrtc.compile_ptx(kernels.expanded_source("batchnorm.cu"), "batchnorm.cu",
                               "compute_80",
                               name_expressions=kernels.name_expressions("batchnorm.cu"))
    assert ".entry" in ptx


def test_compile_error_names_the_file_and_line(needs_nvrtc):
    source = kernels.expanded_source("batchnorm.cu").replace("acc[0] += g;",
                                                             "acc[0] += undefined_g;", 1)
    with pytest.raises(KernelCompileError) as info:
        nvrtc.compile_ptx(source, "batchnorm.cu", "compute_80",
                          name_expressions=kernels.name_expressions("batchnorm.cu"))
    assert f"{kernels.kernel_dir() / 'batchnorm.cu'}(" in str(info.value)
    assert 'identifier "undefined_g" is undefined' in str(info.value)


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas (CUDA toolkit) not installed")
def test_kernel_report_shows_registers_and_no_spills():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bn_backward_dx<float>" in out.stdout and "sm_90" in out.stdout
