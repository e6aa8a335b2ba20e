"""`servelm simulate plan`'s flags, table and result file; the search itself is plan.py,
imported only when the command runs, so building the CLI's parser stays cheap."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from servelm.cluster.router import POLICIES as ROUTERS
from servelm.simulate.hardware import GPUSpec

if TYPE_CHECKING:
    from servelm.bench.harness import Table
    from servelm.simulate.plan import Candidate, PlanSpec, Workload
    from servelm.simulate.workload import TraceRequest

ENGINE_FLAGS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
                "preemption_mode", "swap_space_gb", "scheduling_policy")
GPU_FIGURES = tuple(f.name for f in dataclasses.fields(GPUSpec) if f.name not in ("name", "source"))


def add_plan_parser(ssub: Any, add_hardware_args: Callable[[Any], None]) -> None:
    """`simulate plan`; the roofline model's dtype, efficiency and GPU-figure flags come from
    `add_hardware_args` (cli.py), shared with `simulate profile --roofline`. Figure overrides
    (--memory-gib, --usd-per-gpu-hour, ...) apply to every --gpu given."""
    from servelm.bench.harness import listed
    from servelm.config import EngineConfig
    from servelm.engine_args import _flag_options
    from servelm.simulate.hardware import GPU_CHOICES
    from servelm.simulate.model_shape import MODEL_PRESETS

    ints = listed(int, "integers >= 1", lambda v: v >= 1)
    p = ssub.add_parser("plan", help="pick the GPU and replicas x tp x pp that serve a target "
                        "rate within latency SLOs at least cost (roofline step times)")
    p.add_argument("--gpu", nargs="+", required=True, metavar="NAME",
                   help=f"GPU types to choose from: {', '.join(GPU_CHOICES)}")
    p.add_argument("--model-config", required=True, metavar="PATH_OR_PRESET",
                   help=f"a config.json, a model folder, or one of {', '.join(MODEL_PRESETS)}")
    p.add_argument("--target-rate", type=float, required=True, metavar="REQ_PER_S")
    p.add_argument("--slo", nargs="+", required=True, metavar="NAME:MS",
                   help="latency bounds in ms (ttft, tpot, e2el), as bench serve --goodput; a "
                        "ttft or e2el bound is required")
    p.add_argument("--slo-percentile", type=float, default=90.0,
                   help="the percentile of each metric over the requests that the SLO bounds")
    p.add_argument("--max-gpus", type=int, default=64, help="GPUs the whole deployment may use")
    p.add_argument("--tp-options", type=ints, default=[1, 2, 4, 8], help="tensor-parallel sizes")
    p.add_argument("--pp-options", type=ints, default=[1, 2], help="pipeline-parallel sizes")
    p.add_argument("--router", choices=ROUTERS, default="prefix-aware")
    g = p.add_argument_group("workload (as simulate run; arrivals at each rate tried)")
    g.add_argument("--dataset-name", default="random", choices=["random", "shared-prefix"])
    g.add_argument("--trace", default=None, help="JSONL/CSV of prompt_len, output_len[, prefix_id, "
                   "prefix_len] (recorded arrival times are not used), or a one-run bench serve "
                   "result saved with --save-detailed")
    g.add_argument("--num-prompts", type=int, default=300,
                   help="requests per replica in each simulation")
    g.add_argument("--max-validate-prompts", type=int, default=3000,
                   help="at most this many requests in a whole-cluster validation")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--shared-prefix-len", type=int, default=512)
    g.add_argument("--shared-prefix-num-prefixes", type=int, default=1)
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("engine of each replica")
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    for name in ENGINE_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), **_flag_options(fields[name]))
    add_hardware_args(p.add_argument_group("roofline model (see servelm/simulate/roofline.py)"))
    g = p.add_argument_group("output")
    g.add_argument("--result-file", default=None,
                   help="default: bench-results/simulate-plan-<date>.json")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_plan)


def workload_from_args(args: Any) -> Workload:
    """The plan's Workload from the flags: a trace file's requests, or synthetic ones."""
    from servelm.simulate.plan import Workload
    from servelm.simulate.workload import from_file, synthetic

    if args.trace:
        pool = from_file(args.trace, math.inf, 1.0, args.seed)
        return Workload.cycled(pool, args.burstiness, args.seed)
    for flag in ("random_input_len", "random_output_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    ratio = args.random_range_ratio
    if not 0 <= ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    prefix = args.shared_prefix_len if args.dataset_name == "shared-prefix" else 0

    def draw(n: int) -> list[TraceRequest]:
        return synthetic(args.dataset_name, n, args.random_input_len, args.random_output_len,
                         ratio, math.inf, 1.0, args.seed, args.shared_prefix_len,
                         args.shared_prefix_num_prefixes)

    longest = prefix + sum(max(1, round(m * (1 + ratio)))
                           for m in (args.random_input_len, args.random_output_len))
    return Workload(draw, longest, args.burstiness, args.seed)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _reason(c: Candidate) -> str:
    """Why a candidate is out, short enough for a line under the table."""
    reason = c.reason or ""
    return "its weights leave no room for a KV cache" if "leaving no KV cache" in reason else reason


def plan_table(candidates: list[Candidate], best: Candidate | None, spec: PlanSpec,
               title: str) -> tuple[Table, list[str]]:
    """Every candidate, one row each, the chosen one starred; and why the others are out."""
    from servelm.bench.harness import Table

    p = spec.pkey
    t = Table(title, ["gpu", "tp", "pp", "req/s/replica", "replicas", "GPUs", "$/hour",
                      f"{p} TTFT ms", f"{p} TPOT ms", "meets SLO"])
    for c in candidates:
        t.add_row(c.gpu + (" *" if c is best else ""), str(c.tp), str(c.pp),
                  _cell(c.max_rate, ".2f"), _cell(c.replicas, "d"), _cell(c.gpus, "d"),
                  _cell(c.usd_per_hour, ".2f"), _cell(c.p_ttft_ms, ".0f"),
                  _cell(c.p_tpot_ms, ".1f"), "yes" if c.meets_slo else "no")
    notes = [f"{c.gpu} tp={c.tp} pp={c.pp}: {_reason(c)}" for c in candidates if c.reason]
    return t, notes


def cmd_plan(args: Any) -> int:
    from servelm.bench import harness
    from servelm.bench.serve_metrics import parse_goodput
    from servelm.simulate.hardware import PRICE_ASSUMPTION, gpu_spec
    from servelm.simulate.model_shape import model_shape
    from servelm.simulate.plan import PlanSpec, plan

    try:
        slos = parse_goodput(args.slo)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--goodput", "--slo")) from None
    gpus = [gpu_spec(name, **{f: getattr(args, f) for f in GPU_FIGURES}) for name in args.gpu]
    shape = model_shape(args.model_config)
    spec = PlanSpec(
        args.target_rate, slos, args.slo_percentile, tuple(args.tp_options),
        tuple(args.pp_options), args.max_gpus, args.router, args.num_prompts,
        args.max_validate_prompts,
        {"weight_dtype": args.weight_dtype, "kv_dtype": args.kv_dtype,
         "compute_efficiency": args.compute_efficiency,
         "bandwidth_efficiency": args.bandwidth_efficiency,
         "link_efficiency": args.link_efficiency, "step_overhead_s": args.step_overhead_ms / 1e3},
        {"gpu_memory_utilization": args.gpu_memory_utilization,
         **{k: getattr(args, k) for k in ENGINE_FLAGS}})
    workload = workload_from_args(args)
    say = harness.progress(args.quiet)
    started = time.perf_counter()
    candidates, best = plan(shape, gpus, spec, workload, say)
    wall = time.perf_counter() - started
    bounds = ", ".join(f"{k} <= {v:g} ms" for k, v in slos.items())
    title = (f"simulate plan: {shape.name} at {spec.target_rate:g} req/s, {spec.pkey} {bounds} "
             f"(roofline step times: analytical)")
    out = harness.result_path(args.result_file, "simulate-plan")
    doc = {**harness.result_header("simulate-plan"), "model": shape.to_dict(),
           "gpus": [g.to_dict() for g in gpus],
           "price": "given" if args.usd_per_gpu_hour is not None else PRICE_ASSUMPTION,
           "plan": dataclasses.asdict(spec),
           "workload": {k: getattr(args, k) for k in (
               "dataset_name", "trace", "num_prompts", "max_validate_prompts", "random_input_len",
               "random_output_len", "random_range_ratio", "shared_prefix_len",
               "shared_prefix_num_prefixes", "burstiness", "seed")},
           "candidates": [c.to_dict() for c in candidates],
           "chosen": best.to_dict() if best else None, "wall_s": wall,
           "simulations": sum(c.simulations for c in candidates)}
    harness.write_result(doc, out)
    table, notes = plan_table(candidates, best, spec, title)
    if best:
        notes.append(f"* the plan: {best.replicas} x {best.gpu} tp={best.tp} pp={best.pp} = "
                     f"{best.gpus} GPUs, ${best.usd_per_hour:.2f}/hour")
    else:
        notes.append(f"no candidate meets the SLO at {spec.target_rate:g} req/s within --max-gpus "
                     f"{spec.max_gpus}: raise --max-gpus, add --gpu types, or loosen --slo")
    harness.print_report([table], [*notes, f"{doc['simulations']} simulations in {wall:.0f} s; "
                           f"results: {out}"])
    return 0 if best else 1
