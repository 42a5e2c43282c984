"""``scripts/gpu_check.py`` runs end to end on the CuPy stand-in, so the command for the day a
GPU is there is known to work before one is seen."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from standin import standin_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _gpu_check(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = standin_env()
    env["OPENBLAS_NUM_THREADS"] = "1"  # the stages share two cores with each other's BLAS
    return subprocess.run([sys.executable, str(SCRIPT), "--stand-in", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _report(out_dir: Path) -> tuple[dict, str, Path]:
    (json_path,) = out_dir.glob("gpu-*.json")
    (md_path,) = out_dir.glob("gpu-*.md")
    assert md_path.stem == json_path.stem
    return json.loads(json_path.read_text()), md_path.read_text(), json_path


@pytest.fixture(scope="module")
def standin_run(tmp_path_factory):
    """One full run on the stand-in (about 15 s on two cores), shared by the tests below."""
    out = tmp_path_factory.mktemp("gpu_check")
    done = _gpu_check("--out-dir", str(out), cwd=out)
    return done, out


def test_runs_every_stage_on_the_standin_and_writes_both_files(standin_run):
    done, out = standin_run
    assert done.returncode == 0, done.stdout + done.stderr
    report, md, json_path = _report(out)
    assert "stand-in" in json_path.name and json_path.name.endswith(f"{report['date']}.json")
    names = [s["name"] for s in report["stages"]]
    assert names == ["device", "parity", "bench", "bandwidth", "kernels", "sanitizer"]
    for s in report["stages"]:  # ok, or skipped with a reason: nothing crashed or timed out
        assert s["status"] in ("ok", "skipped"), s
        assert s["status"] == "ok" or s["reason"], s
        assert s["seconds"] <= s["budget_s"]
    # progress lines as it goes, one per stage, then where the files are
    assert sum(f"{n}: " in done.stdout for n in names) == len(names)
    assert str(json_path) in done.stdout


def test_standin_parity_passes_and_every_figure_is_labelled(standin_run):
    done, out = standin_run
    report, md, _ = _report(out)
    stages = {s["name"]: s for s in report["stages"]}
    assert report["standin"] and "means nothing" in report["label"]
    # the device and its versions, recorded
    device = stages["device"]["data"]
    assert device["device"]["name"] == "gpunet CuPy stand-in (not a GPU)"
    assert device["cuda_driver"] and device["cupy"].endswith("+gpunet.standin")
    assert {"python", "numpy", "gpunet", "git", "torch", "tools"} <= set(device)
    # parity on the stand-in's GPU: all passed, in both dtypes
    parity = stages["parity"]["data"]
    assert parity["failed"] == [] and set(parity["per_dtype"]) == {"float32", "float64"}
    assert all(c["passed"] > 0 and c["failed"] == 0 for c in parity["per_dtype"].values())
    # the benchmark ran through its opt-in, every result labelled
    results = stages["bench"]["data"]["results"]
    assert [r["workload"] for r in results] == ["mlp", "lenet", "lstm", "bn"]
    for r in results:
        assert r["standin"] and "means nothing" in r["label"]
        assert r["gpunet"]["train"]["median_ms"] > 0 and r["gpunet"]["peak_mb"] > 0
        assert r["gpunet"]["peak_method"].startswith("CuPy memory pool")
    # BatchNorm backward against a copy: both GB/s, their ratio, per kernel
    rows = stages["bandwidth"]["data"]["rows"]
    assert rows and all(r["ratio"] > 0 and "means nothing" in r["label"] for r in rows)
    assert {"bn_backward_dx"} <= {k["kernel"] for r in rows for k in r["kernels"]}
    # the sanitizer's cases ran without the tool, and launched gpunet's kernels
    plain = stages["sanitizer"]["data"]["without_the_tool"]
    assert plain["status"] == "ok" and "bn_backward_dx" in plain["data"]["kernels_launched"]
    # the Markdown: the banner, and every table's section says stand-in
    assert md.count("means nothing") >= 6
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections and all("(stand-in)" in line for line in sections)
    assert "| parity | ok |" in md


def test_sanitizer_command_runs_under_the_tool(tmp_path):
    """With a compute-sanitizer that runs its command and reports no errors, the stage runs
    both tools on the parity cases and reads their summaries."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import subprocess, sys
        args = sys.argv[1:]
        tool = args[args.index("--tool") + 1]
        while args[0].startswith("--"):
            args = args[2:]
        rc = subprocess.call(args)
        print("========= " + ("RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
                               if tool == "racecheck" else "ERROR SUMMARY: 0 errors"))
        sys.exit(rc)
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    done = _gpu_check("--stages", "sanitizer", "--sanitizer", str(fake), "--out-dir",
                      str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report, md, _ = _report(tmp_path)
    (stage,) = report["stages"]
    assert stage["status"] == "ok", stage
    tools = stage["data"]["tools"]
    assert set(tools) == {"memcheck", "racecheck"}
    for entry in tools.values():
        assert entry["status"] == "clean" and entry["parity"]["status"] == "ok"
        assert "bn_reduce_nchw" in entry["parity"]["data"]["kernels_launched"]
    assert tools["memcheck"]["summary"] == ["ERROR SUMMARY: 0 errors"]
    assert "| memcheck | clean |" in md


def test_a_stage_out_of_time_is_stopped_and_the_rest_still_runs(tmp_path):
    """The benchmark given one second: it is stopped there (its subprocesses too), recorded
    as a timeout, the next stage runs, and both files are written."""
    done = _gpu_check("--stages", "device,bench,kernels", "--limit", "bench=1", "--out-dir",
                      str(tmp_path), cwd=tmp_path, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    report, md, _ = _report(tmp_path)
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["device"]["status"] == "ok"
    assert stages["bench"]["status"] == "timeout" and stages["bench"]["seconds"] < 5
    assert stages["kernels"]["status"] in ("ok", "skipped")
    assert "| bench | timeout |" in md


def test_stages_past_the_total_budget_are_skipped(tmp_path):
    done = _gpu_check("--stages", "parity,kernels", "--budget", "6", "--out-dir", str(tmp_path),
                      cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    report, _, _ = _report(tmp_path)
    assert [(s["status"], s["reason"]) for s in report["stages"]] == [
        ("skipped", "no time left of the 6 s budget")] * 2


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclass looks itself up
    spec.loader.exec_module(module)
    return module


def test_budgets_fit_in_eight_minutes_and_files_are_never_overwritten(tmp_path, gpu_check):
    assert sum(s.budget_s for s in gpu_check.STAGES) <= gpu_check.TOTAL_BUDGET_S <= 480
    md, js = gpu_check._output_paths(tmp_path, "NVIDIA H200", False, "2026-12-01")
    assert md.name == "gpu-nvidia-h200-2026-12-01.md"
    assert js.name == "gpu-nvidia-h200-2026-12-01.json"
    md.write_text("earlier run")
    again, _ = gpu_check._output_paths(tmp_path, "NVIDIA H200", False, "2026-12-01")
    assert again.name == "gpu-nvidia-h200-2026-12-01-2.md"
    standin, _ = gpu_check._output_paths(tmp_path, "some device", True, "2026-12-01")
    assert "stand-in" in standin.name


def test_stages_see_the_standin_only_when_asked(monkeypatch, gpu_check):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(gpu_check.STANDIN_PATH), "/elsewhere"]))
    plain = gpu_check._child_env(standin=False)["PYTHONPATH"].split(os.pathsep)
    assert plain == [str(REPO), "/elsewhere"]  # a real GPU run never picks up the stand-in
    standin = gpu_check._child_env(standin=True)["PYTHONPATH"].split(os.pathsep)
    assert standin[:2] == [str(gpu_check.STANDIN_PATH), str(REPO)]
