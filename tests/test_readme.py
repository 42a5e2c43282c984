"""The README's Python examples run as written, each on its own, in a fresh process."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_a_readme_example_runs_on_its_own(index, tmp_path):
    for module in ("torch", "safetensors", "onnxruntime"):  # the interoperability examples
        if f"import {module}" in EXAMPLES[index]:          # need the interop extra and torch
            pytest.importorskip(module)
    # one BLAS thread: on a shared 2-core machine a second one makes small GEMMs crawl
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "GPUNET_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-c", EXAMPLES[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README example {index + 1} failed:\n{done.stderr}"
