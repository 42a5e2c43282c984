"""The benchmark runs and reports (its numbers are read by people, never asserted on)."""
from __future__ import annotations

import json
import sys

import pytest

from gpunet import bench
from gpunet.cli import main

# a sweep of the real workloads at shapes small enough to take a second
TINY_SWEEPS = {"lstm-seq": bench.Sweep("lstm", "seq", (2, 4), "LSTM over sequence length"),
               "bn-batch": bench.Sweep("bn", "batch", (2, 4), "bn over batch size")}


def test_bench_reports_every_field(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "mlp", "--steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["workload"] == "mlp"
    for key in ("median_ms", "min_ms", "max_ms"):
        assert result["gpunet"]["train"][key] > 0 and result["gpunet"]["infer"][key] > 0
    assert result["gpunet"]["peak_mb"] > 0
    if report["environment"]["torch"]:  # the peer is optional: CI does not install PyTorch
        assert result["ratio_train"] > 0 and result["torch"]["peak_mb"] > 0
    assert "blas_threads" in report["environment"] and "sweep" not in report
    assert "mlp" in capsys.readouterr().out
    assert set(bench.WORKLOADS) >= {"mlp"}


def test_workload_shapes_are_parameters_of_one_definition():
    assert bench.workload("lstm").description == bench.WORKLOADS["lstm"].description
    w = bench.workload("lstm", batch=8, seq=100)
    assert w.x_shape == (8, 100, 64) and w.target_shape == (8, 1)
    assert w.gpunet_model is bench.WORKLOADS["lstm"].gpunet_model
    assert bench.workload("bn", batch=16).x_shape == (16, 3, 32, 32)
    with pytest.raises(ValueError, match="no sequence length"):
        bench.workload("bn", seq=10)
    with pytest.raises(ValueError, match="unknown workload"):
        bench.workload("resnet")


def test_sweep_has_one_row_per_size_in_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SWEEPS", TINY_SWEEPS)
    monkeypatch.setattr(bench, "peak_memory", lambda *a: 1.0)  # its own test is above
    rows = bench.sweep(steps=2, warmup=1)
    assert [(r["sweep"], r["size"]) for r in rows] == [
        ("lstm-seq", 2), ("lstm-seq", 4), ("bn-batch", 2), ("bn-batch", 4)]
    assert all(r["gpunet"]["median_ms"] > 0 for r in rows)
    assert rows[1]["description"].startswith("batch 32, 4 steps")
    assert "lstm-seq" in bench.sweep_table(rows)

    out = tmp_path / "b.json"
    assert main(["bench", "mlp", "--steps", "1", "--sweep", "--sweep-steps", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["size"] for r in report["sweep"]] == [2, 4, 2, 4]
    assert "bn-batch" in capsys.readouterr().out


def test_plot_writes_a_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "SWEEPS", TINY_SWEEPS)
    monkeypatch.setattr(bench, "peak_memory", lambda *a: 1.0)
    png = tmp_path / "b.png"
    assert main(["bench", "mlp", "--steps", "1", "--sweep-steps", "1", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_pytorch_shows_gpunet_alone(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "SWEEPS", TINY_SWEEPS)
    monkeypatch.setattr(bench, "_import_torch", lambda: None)
    rows = bench.sweep(steps=1, warmup=0)
    assert all("torch" not in r and "ratio" not in r for r in rows)
    result = {"workload": "mlp", "device": "cpu", "gpunet": {}}  # what measure() gives then
    png = tmp_path / "b.png"
    bench.plot([result], rows, bench.environment(), str(png))
    assert png.stat().st_size > 10_000


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # makes its import fail
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured before failing"))
    with pytest.raises(SystemExit) as e:
        bench.main(["mlp", "--plot", "b.png"])
    assert e.value.code == 2
    assert 'pip install "gpunet[bench]"' in capsys.readouterr().err


def test_reexec_sets_the_blas_and_idle_variables():
    command = ["python", "-m", "gpunet", "bench", "--threads", "2"]
    argv, env = bench.reexec_environment(2, {"PATH": "/bin", "OMP_NUM_THREADS": "8"}, command)
    assert argv == [sys.executable, "-m", "gpunet", "bench", "--threads", "2"]
    assert env == {"PATH": "/bin", "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2",
                   "MKL_NUM_THREADS": "2", "GPUNET_NUM_THREADS": "2",
                   "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    # the re-run finds them set and goes on instead of re-running itself
    assert bench.reexec_environment(2, env, command) is None
    # without --threads only the idle policy is set, and a caller's own choice is kept
    argv, env = bench.reexec_environment(None, {"OMP_WAIT_POLICY": "ACTIVE"}, command)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    assert bench.reexec_environment(None, env, command) is None


class _Exec(Exception):
    pass


def test_threads_option_re_executes_the_command_line(monkeypatch):
    calls = []

    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise _Exec  # instead of replacing the test process

    monkeypatch.setattr(bench.os, "execve", execve)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "GPUNET_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    # as `gpunet bench mlp --threads 1`: the console script is sys.argv[0]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/gpunet", "bench", "mlp", "--threads", "1"])
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", *sys.argv])
    with pytest.raises(_Exec):
        main(sys.argv[1:])
    ((path, argv, env),) = calls
    assert path == sys.executable
    assert argv == [sys.executable, "/venv/bin/gpunet", "bench", "mlp", "--threads", "1"]
    assert (env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"]
            == env["GPUNET_NUM_THREADS"] == "1")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OPENBLAS_THREAD_TIMEOUT"] == "4"


def test_threads_in_process_does_not_re_execute(monkeypatch, capsys):
    monkeypatch.setattr(bench.os, "execve", lambda *a: pytest.fail("re-executed"))
    monkeypatch.setattr(bench, "measure", lambda *a, **k: {"workload": "mlp", "gpunet": {
        "train": {"median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0}}})
    assert bench.main(["mlp", "--threads", "1"]) == 0
    assert "limits PyTorch only" in capsys.readouterr().err
