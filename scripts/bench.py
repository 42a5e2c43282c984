"""Benchmarks of gpunet against PyTorch: the same as `gpunet bench` (see its --help)."""
import sys

from gpunet.bench import main

if __name__ == "__main__":
    sys.exit(main())
