"""Throughput of one config: tokens/s per phase, the RL step breakdown, MFU, memory, and the plain-HF update ratio.

    python tools/benchmark_throughput.py examples/configs/tiny_cpu.yaml [key=value ...] [--out F.json]
                                         [--warmup N] [--repeats N] [--no-hf-compare]

The same code as `mssr bench CONFIG ...` (mssr_megatron/bench/throughput.py, where the measurements are described);
torchrun --nproc_per_node N tools/benchmark_throughput.py ... runs it on N ranks (rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    from mssr_megatron.bench.throughput import add_bench_arguments, run_benchmark
    from mssr_megatron.cli import _setup_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_bench_arguments(parser).parse_args(argv)
    _setup_logging()
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
