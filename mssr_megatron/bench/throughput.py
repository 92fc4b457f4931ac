"""Throughput benchmark of one config (`mssr bench CONFIG`). Work in progress: see issue 6."""

from __future__ import annotations

import argparse


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", nargs="?", default=None, help="YAML config to benchmark")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser


def run_benchmark(args: argparse.Namespace) -> int:
    raise NotImplementedError("mssr bench: the throughput benchmark is being written")
