"""Registers, spills and shared memory of every gpunet kernel, per target architecture.

Each ``kernels/*.cu`` file is compiled to PTX by NVRTC (as CuPy does at run time) and the PTX
is assembled by ``ptxas -v`` (the assembler ``nvcc -Xptxas -v`` runs) for each ``--arch``.
Needs the NVRTC library (``pip install nvidia-cuda-nvrtc-cu12``) and ``ptxas`` from a CUDA
toolkit on PATH; no GPU. Spills are a defect to fix or explain: the exit status is 1 when
any kernel spills.

    python scripts/kernel_report.py [--arch sm_80 --arch sm_90]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gpunet import kernels, nvrtc

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def report(arch: str) -> list[dict]:
    """One row per kernel instantiation: name, registers, shared bytes, spill bytes."""
    rows = []
    for file in kernels.KERNELS:
        exprs = kernels.name_expressions(file)
        ptx, lowered = nvrtc.compile_ptx(kernels.expanded_source(file), file,
                                         arch.replace("sm_", "compute_"), name_expressions=exprs)
        readable = {v: k for k, v in lowered.items()}
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            out = subprocess.run(["ptxas", "-v", f"--gpu-name={arch}", str(src),
                                  "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr
        row: dict = {}
        for line in out.splitlines():
            if m := _ENTRY.search(line):
                row = {"file": file, "kernel": readable.get(m.group(1), m.group(1)), "arch": arch}
                rows.append(row)
            elif (m := _SPILL.search(line)) and row:
                row.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
            elif (m := _USED.search(line)) and row:
                row.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="target, e.g. sm_80 (repeatable; "
                        "default sm_80 and sm_90)")
    args = parser.parse_args()
    if shutil.which("ptxas") is None:
        print("kernel_report: ptxas not found (it comes with the CUDA toolkit)", file=sys.stderr)
        return 2
    print(f"NVRTC {'.'.join(map(str, nvrtc.version()))}")
    rows = [r for arch in args.arch or ["sm_80", "sm_90"] for r in report(arch)]
    width = max([len("kernel"), *(len(r["kernel"]) for r in rows)])
    print(f"{'kernel':<{width}} {'arch':<6} {'regs':>5} {'smem':>6} {'stack':>6} {'spills':>7}")
    spilled = False
    for r in rows:
        spills = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        spilled |= spills > 0
        print(f"{r['kernel']:<{width}} {r['arch']:<6} {r.get('registers', 0):>5} "
              f"{r.get('smem', 0):>6} {r.get('stack', 0):>6} {spills:>7}")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
