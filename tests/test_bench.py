"""The benchmark runs and reports (its numbers are read by people, never asserted on)."""
from __future__ import annotations

import json

from gpunet import bench
from gpunet.cli import main


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
    assert "mlp" in capsys.readouterr().out
    assert set(bench.WORKLOADS) >= {"mlp"}
