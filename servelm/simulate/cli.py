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
OVERRIDES = ("num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "scheduling_policy",
             "enable_prefix_caching", "num_speculative_tokens", "spec_acceptance_rate")


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
    p.add_argument("--calibrate-on", nargs="+", default=None, metavar="RESULT",
                   help="bench serve results (--save-detailed) of those serving runs: fit the "
                        "front-end delay that brings the replayed runs' TTFT closest to them "
                        "(runs before and after the ones to predict average out a drifting "
                        "machine)")
    add_engine_args(p)
    _add_roofline_args(p)
    p.set_defaults(func=cmd_profile)

    p = ssub.add_parser("run", help="replay a bench-serve workload on simulated replicas")
    p.add_argument("--profile", required=True, nargs="+", metavar="FILE",
                   help="step-time model from `simulate profile`; several make a cluster of "
                        "unlike replicas (mixed GPU generations, edge devices)")
    p.add_argument("--replicas", type=int, nargs="+", default=None, metavar="N",
                   help="replicas of each --profile (default 1 each)")
    p.add_argument("--router", choices=ROUTERS, default="round-robin")
    g = p.add_argument_group("workload (as bench serve)")
    g.add_argument("--dataset-name", default="random", choices=["random", "shared-prefix"])
    g.add_argument("--trace", default=None, help="JSONL/CSV of prompt_len, output_len[, arrival_s, "
                   "prefix_id, prefix_len], or a bench serve result with --save-detailed")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="requests (default 100; with --trace: its rows, or this many drawn from "
                        "a trace of lengths without arrival times)")
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
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="off saves the prefix cache's memory where prompts share nothing")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="speculative decoding: drafts per decode (a chain)")
    g.add_argument("--spec-acceptance-rate", type=float, default=None,
                   help="the chance each draft is accepted (after the ones before it)")
    _add_cluster_args(p)
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

    from servelm.simulate.fidelity import add_compare_parser
    from servelm.simulate.plan_cli import add_plan_parser

    add_plan_parser(ssub, add_hardware_args)
    add_compare_parser(ssub)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    from servelm.simulate.replica import ROLES
    from servelm.simulate.spot import RECOVERIES

    g = p.add_argument_group("disaggregation (prefill/decode replicas) and the K/V link")
    g.add_argument("--roles", nargs="+", choices=ROLES, default=None, metavar="ROLE",
                   help="role of each --profile's replicas: both (default), or prefill and "
                        "decode (one --profile file may be given twice)")
    g.add_argument("--kv-link-gbs", type=float, default=25.0,
                   help="replica-to-replica K/V bandwidth, GB/s one way (assumption: a 200 Gb/s "
                        "NIC); handovers, migrations")
    g.add_argument("--kv-link-latency-ms", type=float, default=1.0, help="per move (assumption)")
    g.add_argument("--kv-bytes-per-token", type=float, default=None,
                   help="K/V bytes of one token (default: a roofline profile's own; 131072, "
                        "Llama-3-8B in bf16, for a fitted one)")
    g = p.add_argument_group("spot replicas (preemptible: a notice, then gone after a grace period)")
    g.add_argument("--spot-replicas", type=int, nargs="+", default=None, metavar="N",
                   help="how many of each --profile's replicas are spot (the first N)")
    g.add_argument("--spot-kill-times", type=float, nargs="+", default=None, metavar="S",
                   help="simulated seconds of the notices, each to a random live spot replica")
    g.add_argument("--spot-mean-lifetime-s", type=float, default=None,
                   help="or: each spot replica gets its notice after an exponential lifetime")
    g.add_argument("--spot-grace-s", type=float, default=30.0, help="notice to vanishing")
    g.add_argument("--spot-recovery", choices=RECOVERIES, default="migrate",
                   help="migrate: move running requests with their K/V during the grace period; "
                        "restart: recompute them elsewhere once the replica is gone")
    g.add_argument("--spot-replacement-delay-s", type=float, default=None,
                   help="a fresh spot replica joins this long after one vanishes (default: none)")
    g.add_argument("--spot-seed", type=int, default=0)
    g.add_argument("--migrate-imbalance", type=int, default=0, metavar="N",
                   help="move a decoding request from the busiest replica to the idlest when "
                        "they differ by N requests, once a second (servelm serve's balancer; "
                        "it defaults to 4 there, off here)")


def _add_roofline_args(p: argparse.ArgumentParser) -> None:
    from servelm.simulate.hardware import GPU_CHOICES
    from servelm.simulate.model_shape import MODEL_PRESETS

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
    add_hardware_args(g, memory_flag=False)  # the engine's --gpu-memory-utilization serves


def add_hardware_args(g: Any, memory_flag: bool = True) -> None:
    """The roofline model's dtype, memory, efficiency and GPU-figure flags, shared by
    `simulate profile --roofline` and `simulate plan`."""
    from servelm.simulate.roofline import KV_DTYPES, WEIGHT_DTYPES

    g.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="bf16")
    g.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="bf16")
    if memory_flag:
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
    from servelm.simulate.profile import calibrate_frontend_delay, describe, fit_step_trace, profile
    from servelm.simulate.roofline import describe_roofline

    if args.roofline:
        model = _roofline(args)
        model.save(args.output)
        print(json.dumps(describe_roofline(model), indent=1))
        return 0
    if args.gpu is not None or args.model_config is not None:
        raise ValueError("--gpu and --model-config go with --roofline")
    if args.calibrate_on and not args.from_step_trace:
        raise ValueError("--calibrate-on goes with --from-step-trace (the run it recorded)")
    if args.from_step_trace:
        model = fit_step_trace(args.from_step_trace)
        if args.calibrate_on:
            model.frontend_delay_s = calibrate_frontend_delay(model, args.calibrate_on)
    else:
        model = profile(EngineConfig(model=args.model, **engine_kwargs(args)), args.repeats,
                        progress(False))
    model.save(args.output)
    print(json.dumps(describe(model), indent=1))
    return 0


def replica_specs(profiles: list[str], counts: list[int] | None, args: argparse.Namespace):
    """One ReplicaSpec per step-time model file, with the engine it was profiled on (less the
    options given on the command line) and its count from --replicas."""
    from servelm.simulate.replica import ReplicaSpec, SimEngineConfig
    from servelm.simulate.step_model import load_step_model

    counts = counts or [1] * len(profiles)
    roles = getattr(args, "roles", None) or ["both"] * len(profiles)
    spots = getattr(args, "spot_replicas", None) or [0] * len(profiles)
    for flag, given in (("--replicas", counts), ("--roles", roles), ("--spot-replicas", spots)):
        if len(given) != len(profiles):
            raise ValueError(f"{flag}: give one per --profile ({len(profiles)}), got {given}")
    stems = [Path(p).stem + ("" if role == "both" else f"-{role}") for p, role in zip(profiles, roles)]
    names = stems if len(set(stems)) == len(stems) else [f"{s}-{i}" for i, s in enumerate(stems)]
    specs = []
    for i, (path, count) in enumerate(zip(profiles, counts)):
        model = load_step_model(path)
        profiled = model.source.get("engine", {})
        config = SimEngineConfig(**{k: v for k, v in profiled.items()
                                    if k in SimEngineConfig.__dataclass_fields__})
        config = dataclasses.replace(config, **{k: getattr(args, k) for k in OVERRIDES
                                                if getattr(args, k) is not None})
        specs.append(ReplicaSpec(model, config, count, names[i], roles[i], spots[i]))
    return specs


def cluster_options(args: argparse.Namespace):
    """The K/V link, and the spot options when any replica is spot (None otherwise)."""
    from servelm.simulate.disagg import KVLink
    from servelm.simulate.spot import SpotOptions

    link = KVLink(args.kv_link_gbs, args.kv_link_latency_ms, args.kv_bytes_per_token)
    spot_flags = (args.spot_kill_times, args.spot_mean_lifetime_s, args.spot_replacement_delay_s)
    if not any(args.spot_replicas or ()):
        if any(f is not None for f in spot_flags):
            raise ValueError("--spot-kill-times, --spot-mean-lifetime-s and "
                             "--spot-replacement-delay-s need --spot-replicas")
        return link, None
    return link, SpotOptions(args.spot_kill_times, args.spot_mean_lifetime_s, args.spot_grace_s,
                             args.spot_recovery, args.spot_replacement_delay_s, args.spot_seed)


def cmd_run(args: argparse.Namespace) -> int:
    from servelm.bench.serve_metrics import parse_fluidity, parse_goodput
    from servelm.simulate.simulator import simulate
    from servelm.simulate.workload import from_file, synthetic

    specs = replica_specs(args.profile, args.replicas, args)
    link, spot = cluster_options(args)
    slos, fluidity = parse_goodput(args.goodput), parse_fluidity(args.fluidity)
    if fluidity and args.no_itl:
        raise ValueError("--fluidity needs every token's time: drop --no-itl")
    say = progress(args.quiet)
    runs = []
    for i, rate in enumerate(args.request_rate):
        if args.trace:
            trace = from_file(args.trace, rate, args.burstiness, args.seed, args.num_prompts)
        else:
            trace = synthetic(args.dataset_name, args.num_prompts or 100, args.random_input_len,
                              args.random_output_len, args.random_range_ratio, rate, args.burstiness,
                              args.seed + i, args.shared_prefix_len, args.shared_prefix_num_prefixes,
                              arrival_seed=args.seed)
        say(f"rate {rate} req/s: {len(trace)} requests on "
            f"{sum(s.count for s in specs)} simulated replicas ...")
        result = simulate(trace, specs, args.router, not args.no_itl, args.metric_percentiles,
                          slos, fluidity, link, spot, args.migrate_imbalance)
        runs.append({"request_rate": "inf" if math.isinf(rate) else rate, **result})
        say(f"  {result['completed']} done in {result['wall_s']:.1f}s ({result['events_per_s']:.0f} "
            f"events/s): mean TTFT {result['mean_ttft_ms']:.1f} ms, mean TPOT "
            f"{result['mean_tpot_ms']:.2f} ms, {result['output_throughput']:.1f} tok/s")
        if spot is not None or result["num_handovers"]:
            say(f"  {result['num_handovers']} handovers, {result['num_migrations']} migrations, "
                f"{result['num_restarted_requests']} restarted ({result['recomputed_tokens']} "
                f"tokens recomputed), {result['replicas_lost']} replicas lost")
    out = result_path(args.result_file, "simulate")
    doc = {**result_header("simulate"), "replicas": [
               {"name": s.name, "count": s.count, "role": s.role, "spot": s.spot,
                "profile": str(Path(p)), "engine": vars(s.config), "decode_tokens_per_s": s.decode_rate,
                "kv_bytes_per_token": link.bytes_per_token_of(s.model)}
               for s, p in zip(specs, args.profile)],
           "router": args.router, "kv_link": vars(link), "spot": spot and vars(spot), "runs": runs,
           **(runs[0] if len(runs) == 1 else {})}
    write_result(doc, out)
    print(f"results: {out}", file=sys.stderr)
    return 0
