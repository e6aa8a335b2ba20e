"""`servelm bench ...` subcommands and their flags.

Each benchmark is its own sub-subcommand (`throughput`, `latency`, `roofline`, `serve`,
`cold-start`, `spec`) so they share engine flags but keep their own options and result formats. A
benchmark's flags carry the names of its config dataclass's fields, so one function turns
parsed flags into that config. Heavy imports happen only when a benchmark actually runs,
keeping `servelm --help` fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from servelm.bench.cold_start import add_cold_start_parser
from servelm.bench.datasets import DATASETS
from servelm.bench.harness import SYSTEMS, listed
from servelm.bench.migration import add_migration_parser
from servelm.bench.serve_cli import add_serve_parser
from servelm.bench.spec_datasets import SPEC_DATASETS
from servelm.bench.spec_report import PROPOSERS

AddEngineArgs = Callable[[argparse.ArgumentParser], None]
positive_ints = listed(int, "positive integers", lambda v: v >= 1)


def names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    return listed(str, "names from " + ",".join(allowed), lambda v: v in allowed)


def config_from_args(cls: type, args: argparse.Namespace,
                     engine: dict[str, Any] | None = None) -> Any:
    """Dataclass `cls` from the parsed flags of the same names; `engine` defaults to the
    engine flags with the model."""
    from servelm.engine_args import engine_kwargs

    if engine is None:
        engine = {"model": args.model, **engine_kwargs(args)}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if f.name != "engine" and hasattr(args, f.name)}
    return cls(engine=engine, **given)


def add_bench_parser(sub: Any, add_engine_args: AddEngineArgs) -> None:
    """Register `bench` and its subcommands on the top-level subparsers `sub`."""
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    _add_throughput(bsub, add_engine_args)
    _add_roofline(bsub, add_engine_args)
    add_serve_parser(bsub)
    add_cold_start_parser(bsub)
    add_migration_parser(bsub)
    _add_latency(bsub, add_engine_args)
    _add_parallel(bsub, add_engine_args)
    _add_spec(bsub, add_engine_args)


def _bench(bsub: Any, add_engine_args: AddEngineArgs, name: str, help: str,
           run: str, config: str) -> argparse.ArgumentParser:
    """The `bench NAME` parser, with the engine flags; it runs `run` of
    servelm.bench.NAME (imported only then) on its dataclass `config` built from the flags."""
    p = bsub.add_parser(name, help=help)
    add_engine_args(p)

    def cmd(args: argparse.Namespace) -> int:
        module = importlib.import_module(f"servelm.bench.{name}")
        getattr(module, run)(config_from_args(getattr(module, config), args))
        return 0

    p.set_defaults(func=cmd)
    return p


def _output_group(p: argparse.ArgumentParser, benchmark: str, detailed: bool = False) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--result-file", default=None,
                   help=f"default: bench-results/{benchmark}-<date>.json")
    g.add_argument("--quiet", action="store_true", help="no progress or table")
    if detailed:
        g.add_argument("--save-detailed", action="store_true",
                       help="per-request timings and output token ids in the JSON")


def _lengths(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    g.add_argument("--output-len", type=int, default=128, help="output tokens per request")


def _peer_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    g.add_argument("--skip-llamacpp", action="store_true", help="do not run llama.cpp")


# ---- throughput ----------------------------------------------------------------------------

def _add_throughput(bsub: Any, add_engine_args: AddEngineArgs) -> None:
    p = _bench(bsub, add_engine_args, "throughput",
               "offline batch throughput vs transformers and llama.cpp",
               "run_throughput", "ThroughputConfig")
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
    _peer_flags(g)
    _output_group(p, "throughput", detailed=True)


# ---- latency -------------------------------------------------------------------------------

def _add_latency(bsub: Any, add_engine_args: AddEngineArgs) -> None:
    p = _bench(bsub, add_engine_args, "latency",
               "batch-1 TTFT and per-token latency vs transformers and llama.cpp",
               "run_latency", "LatencyConfig")
    g = p.add_argument_group("workload")
    _lengths(g)
    g.add_argument("--batch-size", type=int, default=1, help="requests sent together")
    g.add_argument("--num-iters", type=int, default=5, help="measured iterations")
    g.add_argument("--num-iters-warmup", type=int, default=1, help="untimed iterations first")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    g = p.add_argument_group("peers")
    _peer_flags(g)
    g.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-bench binary, run on the same GGUF as a peer "
                        "(default: $SERVELM_LLAMA_BENCH, else llama-bench on PATH)")
    _output_group(p, "latency", detailed=True)


# ---- parallel ------------------------------------------------------------------------------

def _add_parallel(bsub: Any, add_engine_args: AddEngineArgs) -> None:
    p = _bench(bsub, add_engine_args, "parallel",
               "tensor x pipeline-parallel layouts side by side: latency, throughput, all-reduce "
               "time and bytes per step", "run_parallel", "ParallelConfig")
    g = p.add_argument_group("workload")
    g.add_argument("--layouts", type=listed(str, "TxP layouts"), default=["1x1", "2x1", "1x2"],
                   help="comma-separated T x P layouts (1x1 is always measured)")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens of the latency requests")
    g.add_argument("--output-len", type=int, default=64, help="output tokens of the latency requests")
    g.add_argument("--num-iters", type=int, default=3, help="latency requests per round")
    g.add_argument("--num-prompts", type=int, default=64, help="throughput requests per round")
    g.add_argument("--max-output-len", type=int, default=128, help="throughput: longest output")
    g.add_argument("--rounds", type=int, default=2, help="times every layout runs, in turn")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    _output_group(p, "parallel")


# ---- roofline ------------------------------------------------------------------------------

def _add_roofline(bsub: Any, add_engine_args: AddEngineArgs) -> None:
    p = _bench(bsub, add_engine_args, "roofline",
               "peak FLOP/s and bandwidth of this machine; servelm's MFU and MBU",
               "run_roofline", "RooflineConfig")
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=64, help="requests in the throughput run")
    _lengths(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quick", action="store_true", help="tiny machine probes (tests only)")
    _output_group(p, "roofline")


# ---- spec ----------------------------------------------------------------------------------

def _add_spec(bsub: Any, add_engine_args: AddEngineArgs) -> None:
    p = _bench(bsub, add_engine_args, "spec", "batch-1 decode speed-up of speculation per "
               "proposer, servelm vs transformers and llama.cpp", "run_spec", "SpecBenchConfig")
    g = p.add_argument_group("workload")
    g.add_argument("--datasets", type=names(SPEC_DATASETS), default=list(SPEC_DATASETS),
                   help="comma-separated, from " + ",".join(SPEC_DATASETS))
    g.add_argument("--num-prompts", type=int, default=10, help="requests per dataset")
    g.add_argument("--max-tokens", type=int, default=128, help="output cap (EOS also stops)")
    g.add_argument("--dataset-path", default=None,
                   help="self-instruct JSONL ('instruction', 'input') for grounded "
                        "(default: ../shared/data/self-instruct/predictions.jsonl)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompt order")
    g = p.add_argument_group("speculation")
    g.add_argument("--proposers", type=names(PROPOSERS), default=["ngram"],
                   help="servelm proposers to measure, comma-separated, from "
                        + ",".join(PROPOSERS) + " (default ngram)")
    g.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="drafts per step (k); layer_skip and draft_model take len(tree) "
                        "with --spec-tree")
    g.add_argument("--prompt-lookup-max", type=int, default=3, help="ngram: longest n-gram")
    g.add_argument("--prompt-lookup-min", type=int, default=1,
                   help="ngram: shortest n-gram (servelm only; the peers go down to 1)")
    g.add_argument("--spec-num-layers", type=int, default=None,
                   help="layer_skip: how many of the target's first layers draft (required)")
    g.add_argument("--draft-model", default=None,
                   help="draft_model: the draft's HF folder or GGUF (same tokenizer)")
    g.add_argument("--draft-num-layers", type=int, default=None,
                   help="draft_model without --draft-model: a draft of the target's first L "
                        "layers, saved once under the servelm cache")
    g.add_argument("--distilled-model", default=None, metavar="DIR",
                   help="distilled: a draft model from `servelm train-draft --method distill`")
    g.add_argument("--medusa-model", default=None, metavar="DIR",
                   help="medusa: heads trained by `servelm train-draft --method medusa`")
    g.add_argument("--eagle-model", default=None, metavar="DIR",
                   help="eagle: a draft trained by `servelm train-draft --method eagle`")
    g.add_argument("--spec-tree", type=positive_ints, default=None,
                   help="layer_skip, draft_model, distilled, medusa: token tree, children per "
                        "depth (e.g. 3,2,1); eagle drafts a chain of --num-speculative-tokens")
    g.add_argument("--held-out", action="store_true",
                   help="only the prompts train-draft never trains on (a quarter of each dataset)")
    g = p.add_argument_group("systems")
    g.add_argument("--systems", type=names(SYSTEMS), default=list(SYSTEMS),
                   help="comma-separated, from " + ",".join(SYSTEMS))
    _output_group(p, "spec")
    p.set_defaults(func=cmd_spec)  # its own: speculation is set by its flags, not the engine's


def cmd_spec(args: argparse.Namespace) -> int:
    from servelm.bench.spec import SpecBenchConfig, run_spec
    from servelm.engine_args import engine_kwargs

    if args.speculative_config is not None:
        raise ValueError("bench spec sets speculation itself: use --proposers and the flags of "
                         "its 'speculation' group instead of --speculative-config")
    engine = engine_kwargs(args)
    engine.pop("speculative_config")
    run_spec(config_from_args(SpecBenchConfig, args, {"model": args.model, **engine}))
    return 0
