"""`servelm simulate profile` and `servelm simulate run`. The workload flags are `bench
serve`'s, and the result file has its keys, so a simulated run reads like a measured one."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servelm.bench.harness import listed, progress, result_header, result_path, write_result
from servelm.cluster.router import POLICIES as ROUTERS
from servelm.config import SCHEDULING_POLICIES

_rates = listed(float, "rates (numbers > 0, or 'inf')", lambda r: r > 0)
_floats = listed(float, "numbers")
OVERRIDES = ("num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "scheduling_policy")


def add_simulate_parser(sub: Any, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    sim = sub.add_parser("simulate", help="simulate serving at scale with the real scheduler")
    ssub = sim.add_subparsers(dest="simulate_command", required=True)

    p = ssub.add_parser("profile", help="time the real engine's steps and fit a step-time model")
    p.add_argument("--output", required=True, help="the step-time model file to write (JSON)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the batch grid timed")
    p.add_argument("--from-step-trace", nargs="+", default=None, metavar="FILE",
                   help="fit on steps a server recorded while serving (servelm serve --step-trace "
                        "FILE) instead of timing the grid")
    add_engine_args(p)
    p.set_defaults(func=cmd_profile)

    p = ssub.add_parser("run", help="replay a bench-serve workload on simulated replicas")
    p.add_argument("--profile", required=True, help="step-time model from `simulate profile`")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--router", choices=ROUTERS, default="round-robin")
    g = p.add_argument_group("workload (as bench serve)")
    g.add_argument("--dataset-name", default="random", choices=["random", "shared-prefix"])
    g.add_argument("--trace", default=None, help="JSONL/CSV of prompt_len, output_len[, arrival_s, "
                   "prefix_id, prefix_len], or a bench serve result with --save-detailed")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--shared-prefix-len", type=int, default=512)
    g.add_argument("--shared-prefix-num-prefixes", type=int, default=1)
    g.add_argument("--request-rate", type=_rates, default=[math.inf], help="req/s, 'inf', or 1,2,4")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("engine (default: what was profiled)")
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default=None)
    g = p.add_argument_group("output")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS")
    g.add_argument("--metric-percentiles", type=_floats, default=[50.0, 90.0, 99.0])
    g.add_argument("--no-itl", action="store_true", help="keep first and last token times only "
                   "(memory for millions of requests; no ITL figures)")
    g.add_argument("--result-file", default=None, help="default: bench-results/simulate-<date>.json")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)


def cmd_profile(args: argparse.Namespace) -> int:
    from servelm.config import EngineConfig
    from servelm.engine_args import engine_kwargs
    from servelm.simulate.profile import describe, fit_step_trace, profile

    if args.from_step_trace:
        model = fit_step_trace(args.from_step_trace)
    else:
        model = profile(EngineConfig(model=args.model, **engine_kwargs(args)), args.repeats,
                        progress(False))
    model.save(args.output)
    print(json.dumps(describe(model), indent=1))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from servelm.bench.serve_metrics import parse_goodput
    from servelm.simulate.replica import SimEngineConfig
    from servelm.simulate.simulator import simulate
    from servelm.simulate.step_model import StepTimeModel
    from servelm.simulate.workload import from_file, synthetic

    model = StepTimeModel.load(args.profile)
    profiled = model.source.get("engine", {})
    config = SimEngineConfig(**{k: v for k, v in profiled.items()
                                if k in SimEngineConfig.__dataclass_fields__})
    config = dataclasses.replace(config, **{k: getattr(args, k) for k in OVERRIDES
                                            if getattr(args, k) is not None})
    slos = parse_goodput(args.goodput)
    say = progress(args.quiet)
    runs = []
    for i, rate in enumerate(args.request_rate):
        if args.trace:
            trace = from_file(args.trace, rate, args.burstiness, args.seed)
        else:
            trace = synthetic(args.dataset_name, args.num_prompts, args.random_input_len,
                              args.random_output_len, args.random_range_ratio, rate, args.burstiness,
                              args.seed + i, args.shared_prefix_len, args.shared_prefix_num_prefixes,
                              arrival_seed=args.seed)
        say(f"rate {rate} req/s: {len(trace)} requests on {args.replicas} simulated replicas ...")
        result = simulate(trace, config, model, args.replicas, args.router, not args.no_itl,
                          args.metric_percentiles, slos)
        runs.append({"request_rate": "inf" if math.isinf(rate) else rate, **result})
        say(f"  {result['completed']} done in {result['wall_s']:.1f}s ({result['events_per_s']:.0f} "
            f"events/s): mean TTFT {result['mean_ttft_ms']:.1f} ms, mean TPOT "
            f"{result['mean_tpot_ms']:.2f} ms, {result['output_throughput']:.1f} tok/s")
    out = result_path(args.result_file, "simulate")
    doc = {**result_header("simulate"), "profile": str(Path(args.profile)), "engine": vars(config),
           "replicas": args.replicas, "router": args.router, "runs": runs,
           **(runs[0] if len(runs) == 1 else {})}
    write_result(doc, out)
    print(f"results: {out}", file=sys.stderr)
    return 0
