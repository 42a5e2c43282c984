"""Throughput and scaling efficiency of data-parallel training on 1 and N ranks.

Runs ``gpunet train MODEL --data DATASET --distributed`` under ``mpirun -np 1`` and
``mpirun -np N`` with the same per-rank batch, and prints samples per second and the scaling
efficiency ``throughput(N) / (N * throughput(1))``. On one machine without GPUs the ranks share
its cores, so this measures the overhead of the communication, not the speed-up a cluster
gets; see the README for running the same command across GPUs and machines.

    python scripts/bench_distributed.py [--model mlp] [--data digits] [--ranks 2] [--epochs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date


def run(ranks: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.json")
        cmd = ["mpirun", "-np", str(ranks), sys.executable, "-m", "gpunet", "train", args.model,
               "--data", args.data, "--epochs", str(args.epochs), "--batch-size",
               str(args.batch_size), "--device", args.device, "--distributed", "--no-progress",
               "--val-fraction", "0", "--metrics-out", out]
        env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "OMPI_MCA_rmaps_base_oversubscribe": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        with open(out) as f:
            return json.load(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--data", default="digits")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from gpunet import data
    train, _ = data.DATASETS[args.data]()
    samples = len(train) * args.epochs
    print(f"# {date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; {args.model} on {args.data}, batch {args.batch_size} per "
          f"rank, {args.epochs} epochs, device {args.device}")
    print(f"{'ranks':>5} {'seconds':>8} {'samples/s':>10} {'efficiency':>10} {'test acc':>8}")
    base = None
    for ranks in (1, args.ranks):
        m = run(ranks, args)
        throughput = samples / m["seconds"]
        base = base or throughput
        print(f"{ranks:>5} {m['seconds']:>8.2f} {throughput:>10.0f} "
              f"{throughput / (ranks * base):>10.2f} {m['test_accuracy']:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
