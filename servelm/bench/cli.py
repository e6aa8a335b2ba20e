"""`servelm bench ...` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_bench_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_subparsers(dest="bench_command", required=True)
