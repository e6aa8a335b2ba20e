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

    p = ssub.add_parser("profile", help="time the real engine's steps and fit a step-time model, "
                        "or (--roofline) compute one for a GPU that is not here")
    p.add_argument("--output", required=True, help="the step-time model file to write (JSON)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the batch grid timed")
    p.add_argument("--from-step-trace", nargs="+", default=None, metavar="FILE",
                   help="fit on steps a server recorded while serving (servelm serve --step-trace "
                        "FILE) instead of timing the grid")
    add_engine_args(p)
    _add_roofline_args(p)
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
    g.add_argument("--fluidity", default=None, metavar="TTFT_MS:TBT_MS",
                   help="report Etalon's fluidity-index for these token deadlines")
    g.add_argument("--metric-percentiles", type=_floats, default=[50.0, 90.0, 99.0])
    g.add_argument("--no-itl", action="store_true", help="keep first and last token times only "
                   "(memory for millions of requests; no ITL figures)")
    g.add_argument("--result-file", default=None, help="default: bench-results/simulate-<date>.json")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)


def _add_roofline_args(p: argparse.ArgumentParser) -> None:
    from servelm.simulate.hardware import GPU_CHOICES
    from servelm.simulate.model_shape import MODEL_PRESETS
    from servelm.simulate.roofline import KV_DTYPES, WEIGHT_DTYPES

    g = p.add_argument_group("roofline (no engine runs; engine flags that apply: --block-size, "
                             "--max-num-seqs, --max-num-batched-tokens, --max-model-len, "
                             "--num-kv-blocks, scheduling and preemption)")
    g.add_argument("--roofline", action="store_true", help="compute step times from FLOPs and "
                   "bytes on --gpu instead of timing this machine (see servelm/simulate/roofline.py)")
    g.add_argument("--gpu", default=None, metavar="NAME", help=f"one of {', '.join(GPU_CHOICES)} "
                   "(custom: give --peak-tflops, --mem-bandwidth-gbs and --memory-gib)")
    g.add_argument("--model-config", default=None, metavar="PATH_OR_PRESET",
                   help=f"a config.json, a model folder, or one of {', '.join(MODEL_PRESETS)}")
    g.add_argument("--tp", dest="tensor_parallel_size", type=int, default=argparse.SUPPRESS,
                   help="short for --tensor-parallel-size")
    g.add_argument("--pp", dest="pipeline_parallel_size", type=int, default=argparse.SUPPRESS,
                   help="short for --pipeline-parallel-size")
    g.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="bf16")
    g.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="bf16")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory for weights, activations and the KV cache")
    g.add_argument("--compute-efficiency", type=float, default=0.7,
                   help="achievable share of the peak FLOP/s (assumption)")
    g.add_argument("--bandwidth-efficiency", type=float, default=0.8,
                   help="achievable share of the memory bandwidth (assumption)")
    g.add_argument("--link-efficiency", type=float, default=0.8,
                   help="achievable share of the GPU link bandwidth (assumption)")
    g.add_argument("--step-overhead-ms", type=float, default=1.5,
                   help="fixed cost of every step: scheduling, sampling, launches (assumption)")
    for flag, what in (("--peak-tflops", "dense bf16 TFLOP/s"),
                       ("--mem-bandwidth-gbs", "memory bandwidth, GB/s"),
                       ("--memory-gib", "memory per GPU, GiB"),
                       ("--link-gbs", "GPU-to-GPU bandwidth one way, GB/s"),
                       ("--link-latency-us", "latency per all-reduce, us"),
                       ("--usd-per-gpu-hour", "price of a GPU-hour")):
        g.add_argument(flag, type=float, default=None, help=f"{what} (default: the preset's)")


def _roofline(args: argparse.Namespace):
    from servelm.simulate.hardware import PRICE_ASSUMPTION, gpu_spec
    from servelm.simulate.model_shape import model_shape
    from servelm.simulate.roofline import RooflineStepModel, replica_engine

    if args.gpu is None or args.model_config is None:
        raise ValueError("--roofline needs --gpu and --model-config")
    gpu = gpu_spec(args.gpu, peak_tflops=args.peak_tflops, mem_bandwidth_gbs=args.mem_bandwidth_gbs,
                   memory_gib=args.memory_gib, link_gbs=args.link_gbs,
                   link_latency_us=args.link_latency_us, usd_per_gpu_hour=args.usd_per_gpu_hour)
    model = RooflineStepModel(
        gpu, model_shape(args.model_config), args.tensor_parallel_size,
        args.pipeline_parallel_size, args.weight_dtype, args.kv_dtype, args.compute_efficiency,
        args.bandwidth_efficiency, args.link_efficiency, args.step_overhead_ms / 1e3)
    engine = replica_engine(
        model, args.block_size, args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len,
        args.gpu_memory_utilization, args.num_kv_blocks, args.swap_space_gb,
        enable_prefix_caching=args.enable_prefix_caching, preemption_mode=args.preemption_mode,
        scheduling_policy=args.scheduling_policy)
    model.source = {"engine": engine, "gpu_memory_utilization": args.gpu_memory_utilization,
                    "price": PRICE_ASSUMPTION if args.usd_per_gpu_hour is None else "given"}
    return model


def cmd_profile(args: argparse.Namespace) -> int:
    from servelm.config import EngineConfig
    from servelm.engine_args import engine_kwargs
    from servelm.simulate.profile import describe, fit_step_trace, profile
    from servelm.simulate.roofline import describe_roofline

    if args.roofline:
        model = _roofline(args)
        model.save(args.output)
        print(json.dumps(describe_roofline(model), indent=1))
        return 0
    if args.gpu is not None or args.model_config is not None:
        raise ValueError("--gpu and --model-config go with --roofline")
    if args.from_step_trace:
        model = fit_step_trace(args.from_step_trace)
    else:
        model = profile(EngineConfig(model=args.model, **engine_kwargs(args)), args.repeats,
                        progress(False))
    model.save(args.output)
    print(json.dumps(describe(model), indent=1))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from servelm.bench.serve_metrics import parse_fluidity, parse_goodput
    from servelm.simulate.replica import SimEngineConfig
    from servelm.simulate.simulator import simulate
    from servelm.simulate.step_model import load_step_model
    from servelm.simulate.workload import from_file, synthetic

    model = load_step_model(args.profile)
    profiled = model.source.get("engine", {})
    config = SimEngineConfig(**{k: v for k, v in profiled.items()
                                if k in SimEngineConfig.__dataclass_fields__})
    config = dataclasses.replace(config, **{k: getattr(args, k) for k in OVERRIDES
                                            if getattr(args, k) is not None})
    slos, fluidity = parse_goodput(args.goodput), parse_fluidity(args.fluidity)
    if fluidity and args.no_itl:
        raise ValueError("--fluidity needs every token's time: drop --no-itl")
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
                          args.metric_percentiles, slos, fluidity)
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
