"""`servelm bench ...` subcommands.

Each benchmark is its own sub-subcommand (`throughput`, `latency`, `roofline`, `serve`,
`spec`) so they share engine flags but keep their own options and result formats. Heavy
imports happen only when a benchmark actually runs, keeping `servelm --help` fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from servelm.bench.datasets import DATASETS
from servelm.bench.latency import add_latency_parser
from servelm.bench.roofline import add_roofline_parser
from servelm.bench.serve_cli import add_serve_parser
from servelm.bench.spec import add_spec_parser, positive_ints


def add_bench_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `bench` and its subcommands on the top-level subparsers `sub`."""
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    p = bsub.add_parser("throughput", help="offline batch throughput vs transformers and llama.cpp")
    add_engine_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=256)
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: self-instruct if its file is found, else synthetic")
    g.add_argument("--dataset-path", default=None, help="JSONL with 'prompt' and 'response'")
    g.add_argument("--max-output-len", type=int, default=256, help="cap on output lengths")
    g.add_argument("--max-prompt-len", type=int, default=None,
                   help="drop (self-instruct) or cap (synthetic, default 400) longer prompts")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("baseline")
    g.add_argument("--hf-batch-sizes", type=positive_ints, default=[8, 16, 32, 64],
                   help="candidate static batch sizes for transformers (comma-separated)")
    g.add_argument("--hf-probe-batches", type=int, default=2,
                   help="batches per candidate size when picking the best one")
    g.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    g.add_argument("--skip-llamacpp", action="store_true", help="do not run llama.cpp")
    g = p.add_argument_group("output")
    g.add_argument("--result-file", default=None,
                   help="default: bench-results/throughput-<date>.json")
    g.add_argument("--quiet", action="store_true", help="no progress or table")
    p.set_defaults(func=cmd_throughput)
    add_roofline_parser(bsub, add_engine_args)
    add_serve_parser(bsub)
    add_latency_parser(bsub, add_engine_args)
    add_spec_parser(bsub, add_engine_args)


def cmd_throughput(args: argparse.Namespace) -> int:
    from servelm.bench.throughput import ThroughputConfig, run_throughput
    from servelm.engine_args import engine_kwargs

    cfg = ThroughputConfig(
        engine={"model": args.model, **engine_kwargs(args)}, num_prompts=args.num_prompts,
        dataset=args.dataset, dataset_path=args.dataset_path, max_output_len=args.max_output_len,
        max_prompt_len=args.max_prompt_len, hf_batch_sizes=args.hf_batch_sizes,
        hf_probe_batches=args.hf_probe_batches, skip_hf=args.skip_hf,
        skip_llamacpp=args.skip_llamacpp, seed=args.seed,
        result_file=args.result_file, quiet=args.quiet,
    )
    run_throughput(cfg)
    return 0
