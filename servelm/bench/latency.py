"""`servelm bench latency`: how long one small batch takes, servelm against its peers.

The question this answers: for a user waiting on a single request (batch 1 by default), how
soon does the first token arrive (TTFT: prefill plus the first sampled token) and how fast do
the rest follow (TPOT: mean time per output token after the first)? servelm, transformers
`generate` and llama.cpp (llama-cpp-python, skipped with a message when not installed) get
the same random prompt token ids, from the same weights file, greedy, exactly `output_len`
tokens each, the same thread count, and model loading and warm-up iterations are untimed.

Each iteration uses fresh prompts (seeded, identical across systems), so no system can serve
a repeated prompt from a prefix cache. How each system is timed:

- servelm: one `LLM.generate` of the batch; per request, TTFT = first_token_time -
  arrival_time and TPOT = (finished_time - first_token_time) / (output_len - 1) from the
  engine's `RequestOutput.metrics`; end-to-end is the wall time of the `generate` call.
- transformers: one `generate` of the batch (equal-length prompts, so no padding) with a
  stopping criterion that never stops but notes the time each token step completes; TTFT is
  the first note minus the call start, TPOT the mean gap after it, end-to-end the call.
- llama.cpp: the requests of a batch run one after another (its high-level API holds one
  sequence); TTFT is counted from the start of the batch (so with batch > 1 it includes the
  wait for earlier requests, as a client sending them together would see), TPOT is the mean
  gap between tokens within a request, end-to-end the wall time of the whole batch.

Latency ratios are peer / servelm, so above 1 means servelm is faster, like the throughput
ratios. Energy per output token is read from hardware counters around the measured
iterations where readable, otherwise reported as unavailable with the reason.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from servelm.bench.report import energy_note, make_table, print_report

SYSTEMS = ("servelm", "transformers", "llama.cpp")
METRICS = ("ttft_s", "tpot_s", "e2e_s")


@dataclass
class LatencyConfig:
    """Everything one latency run depends on (recorded in the result file)."""

    engine: dict[str, Any] = field(default_factory=dict)  # LLM(**engine) kwargs incl. model
    input_len: int = 128
    output_len: int = 128
    batch_size: int = 1
    num_iters: int = 5
    num_iters_warmup: int = 1
    skip_hf: bool = False
    skip_llamacpp: bool = False
    seed: int = 0
    result_file: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        for name, low in (("input_len", 1), ("output_len", 1), ("batch_size", 1),
                          ("num_iters", 1), ("num_iters_warmup", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def add_latency_parser(bsub: Any, add_engine_args: Callable[[argparse.ArgumentParser], None],
                       ) -> None:
    """Register `bench latency` on the bench subparsers `bsub`."""
    p = bsub.add_parser("latency", help="batch-1 TTFT and per-token latency vs transformers "
                        "and llama.cpp")
    add_engine_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    g.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    g.add_argument("--batch-size", type=int, default=1, help="requests sent together")
    g.add_argument("--num-iters", type=int, default=5, help="measured iterations")
    g.add_argument("--num-iters-warmup", type=int, default=1, help="untimed iterations first")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    g = p.add_argument_group("peers")
    g.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    g.add_argument("--skip-llamacpp", action="store_true", help="do not run llama.cpp")
    g = p.add_argument_group("output")
    g.add_argument("--result-file", default=None,
                   help="default: bench-results/latency-<date>.json")
    g.add_argument("--quiet", action="store_true", help="no progress or table")
    p.set_defaults(func=cmd_latency)


def cmd_latency(args: argparse.Namespace) -> int:
    from servelm.engine_args import engine_kwargs

    cfg = LatencyConfig(
        engine={"model": args.model, **engine_kwargs(args)}, input_len=args.input_len,
        output_len=args.output_len, batch_size=args.batch_size, num_iters=args.num_iters,
        num_iters_warmup=args.num_iters_warmup, skip_hf=args.skip_hf,
        skip_llamacpp=args.skip_llamacpp, seed=args.seed, result_file=args.result_file,
        quiet=args.quiet,
    )
    run_latency(cfg)
    return 0


# ---- workload and statistics ---------------------------------------------------------------

def random_prompts(tokenizer: Any, input_len: int, batch_size: int, num_sets: int,
                   seed: int = 0) -> list[list[list[int]]]:
    """`num_sets` batches of `batch_size` prompts of `input_len` random ids.

    Ids avoid special tokens (which could act as stop or control tokens), as in the synthetic
    throughput workload. Every batch is different, so no prefix cache can help."""
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [[[rng.choice(vocab) for _ in range(input_len)] for _ in range(batch_size)]
            for _ in range(num_sets)]


def describe(values: list[float]) -> dict[str, float] | None:
    """mean/median/p90/p99/min/max of `values` (linear-interpolated percentiles)."""
    if not values:
        return None
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99)),
            "min": float(arr.min()), "max": float(arr.max()), "n": len(values)}


@dataclass
class Samples:
    """Raw timings of one system: one TTFT/TPOT per request, one e2e per iteration."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    def add_request(self, ids: list[int], start: float, times: list[float]) -> None:
        """One request from its token timestamps (`times[i]`: token i+1 ready)."""
        self.token_ids.append(list(ids))
        self.ttft.append(times[0] - start)
        if len(times) > 1:
            self.tpot.append((times[-1] - times[0]) / (len(times) - 1))

    def figures(self, output_len: int, batch_size: int, energy: dict[str, Any]) -> dict[str, Any]:
        n_out = sum(len(t) for t in self.token_ids)
        e2e_mean = statistics.fmean(self.e2e)
        return {"ttft_s": describe(self.ttft), "tpot_s": describe(self.tpot),
                "e2e_s": describe(self.e2e),
                "output_tok_s": batch_size * output_len / e2e_mean,
                "output_tokens": n_out,
                "output_tokens_match": all(len(t) == output_len for t in self.token_ids),
                **energy}


# ---- the three systems ---------------------------------------------------------------------

def run_servelm(llm: Any, batches: list[list[list[int]]], output_len: int) -> Samples:
    """`generate` per batch; TTFT/TPOT from the engine's per-request metrics."""
    from servelm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    s = Samples()
    for batch in batches:
        prompts = [{"prompt_token_ids": p} for p in batch]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        s.e2e.append(time.perf_counter() - start)
        for o in outs:
            m, ids = o.metrics, list(o.outputs[0].token_ids)
            s.token_ids.append(ids)
            s.ttft.append(m.first_token_time - m.arrival_time)
            if len(ids) > 1:
                s.tpot.append((m.finished_time - m.first_token_time) / (len(ids) - 1))
    return s


def run_transformers(hf: Any, batches: list[list[list[int]]], output_len: int) -> Samples:
    """One `generate` per batch, token step times from a never-stopping stopping criterion."""
    from servelm.bench.hf_peer import generate_timed

    s = Samples()
    for batch in batches:
        ids, start, times = generate_timed(hf, batch, output_len)
        s.e2e.append(time.perf_counter() - start)
        for row in ids:
            s.add_request(row, start, times)
    return s


def run_llamacpp(lm: Any, batches: list[list[list[int]]], output_len: int) -> Samples:
    """Each batch's requests one after another; TTFT counted from the batch start."""
    from servelm.bench.llamacpp_peer import generate_timed

    s = Samples()
    for batch in batches:
        batch_start, done = time.perf_counter(), []
        for prompt in batch:
            ids, _, times = generate_timed(lm, prompt, output_len)
            done.append((ids, times))
        s.e2e.append(time.perf_counter() - batch_start)
        for ids, times in done:
            s.add_request(ids, batch_start, times)
    return s


def _timed_system(run: Callable[[list[list[list[int]]]], Samples],
                  batches: list[list[list[int]]], cfg: LatencyConfig) -> tuple[dict, Samples]:
    """Warm-up iterations untimed and unmetered, then the measured ones under the meter."""
    from servelm.bench.energy import EnergyMeter

    warm, measured = batches[: cfg.num_iters_warmup], batches[cfg.num_iters_warmup:]
    if warm:
        run(warm)
    meter = EnergyMeter()
    meter.start()
    s = run(measured)
    energy = meter.stop().as_dict(sum(len(t) for t in s.token_ids))
    return s.figures(cfg.output_len, cfg.batch_size, energy), s


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


def run_latency(cfg: LatencyConfig) -> dict[str, Any]:
    """Build the prompts, run every system, write and return the result dict."""
    from servelm.bench import llamacpp_peer as lcp
    from servelm.bench.results import result_header, result_path, write_result
    from servelm.llm import LLM

    engine = dict(cfg.engine)
    model = engine.pop("model", None)
    dtype = engine.get("dtype", "float32")
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    llm = LLM(model, **engine)  # sets torch's thread count; transformers then reuses it
    max_len = llm.engine.max_model_len
    if cfg.input_len + cfg.output_len > max_len:
        raise ValueError(f"input_len + output_len = {cfg.input_len + cfg.output_len} exceeds "
                         f"servelm's max_model_len {max_len}")
    n_sets = cfg.num_iters_warmup + cfg.num_iters
    batches = random_prompts(llm.get_tokenizer(), cfg.input_len, cfg.batch_size, n_sets, cfg.seed)
    result: dict[str, Any] = {
        **result_header("latency", dtype),
        "config": {**{k: v for k, v in vars(cfg).items() if k != "engine"},
                   "engine": {"model": model, **engine}},
    }
    say(f"latency: batch {cfg.batch_size}, {cfg.input_len} prompt + {cfg.output_len} output "
        f"tokens, {cfg.num_iters_warmup} warm-up + {cfg.num_iters} measured iterations")
    say("running servelm ...")
    sv, sv_s = _timed_system(partial(run_servelm, llm, output_len=cfg.output_len), batches, cfg)
    result["servelm"] = sv
    del llm
    say(f"servelm: TTFT median {sv['ttft_s']['median'] * 1e3:.1f} ms")
    ids: dict[str, list[list[int]]] = {"servelm": sv_s.token_ids}
    if not cfg.skip_hf:
        from servelm.bench.hf_peer import load_hf_model

        say("loading transformers model ...")
        hf = load_hf_model(model, dtype)
        say("running transformers ...")
        tf, tf_s = _timed_system(partial(run_transformers, hf, output_len=cfg.output_len),
                                 batches, cfg)
        tf["attn_implementation"] = hf.config._attn_implementation
        result["transformers"] = tf
        ids["transformers"] = tf_s.token_ids
        del hf
    if not cfg.skip_llamacpp:
        why = lcp.unavailable_reason(model)
        if why is not None:
            say(why)
            result["llama.cpp"] = {"skipped": why}
        else:
            say("loading llama.cpp model ...")
            lm = lcp.load_llamacpp(model, lcp.default_threads(engine),
                                   cfg.input_len + cfg.output_len, cfg.seed)
            say(f"running llama.cpp ({lm.n_threads} threads) ...")
            lc, lc_s = _timed_system(partial(run_llamacpp, lm, output_len=cfg.output_len),
                                     batches, cfg)
            lc.update(lm.settings())
            result["llama.cpp"] = lc
            ids["llama.cpp"] = lc_s.token_ids
            del lm
    result["ratios"] = _ratios(result)
    result["greedy_exact_match_fraction"] = {
        k: _agreement(ids["servelm"], v) for k, v in ids.items() if k != "servelm"}
    write_result(result, result_path(cfg.result_file, "latency"))
    if not cfg.quiet:
        print_table(result)
    return result


def _ratios(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Peer / servelm for mean and median of each latency (above 1: servelm is faster)."""
    sv = result["servelm"]
    ratios: dict[str, dict[str, float | None]] = {}
    for peer in SYSTEMS[1:]:
        r = result.get(peer)
        if r is None or "skipped" in r:
            continue
        ratios[peer] = {}
        for metric in METRICS:
            for stat in ("mean", "median"):
                a, b = (r[metric] or {}).get(stat), (sv[metric] or {}).get(stat)
                ratios[peer][f"{metric}_{stat}"] = a / b if a is not None and b else None
    return ratios


def print_table(result: dict[str, Any]) -> None:
    """A compact side-by-side table, then ratios and notes."""
    cfg = result["config"]
    cols = ["system", "TTFT med ms", "TTFT p90 ms", "TPOT med ms", "TPOT p90 ms",
            "e2e med s", "out tok/s", "J/out tok"]

    def ms(stats: dict[str, float] | None, key: str) -> str:
        return "-" if stats is None else f"{stats[key] * 1e3:.1f}"

    rows = []
    for key in SYSTEMS:
        r = result.get(key)
        if r is None or "skipped" in r:
            continue
        j = r.get("energy_per_token_j")
        label = "llama.cpp (sequential)" if key == "llama.cpp" and cfg["batch_size"] > 1 else key
        rows.append([label, ms(r["ttft_s"], "median"), ms(r["ttft_s"], "p90"),
                     ms(r["tpot_s"], "median"), ms(r["tpot_s"], "p90"),
                     f"{r['e2e_s']['median']:.3f}", f"{r['output_tok_s']:.1f}",
                     "n/a" if j is None else f"{j:.3g}"])
    notes = []
    for peer, rat in result.get("ratios", {}).items():
        parts = [f"{m.removesuffix('_s').upper()} {rat[m + '_median']:.2f}x"
                 for m in METRICS if rat.get(m + "_median") is not None]
        agree = result["greedy_exact_match_fraction"].get(peer)
        notes.append(f"{peer} / servelm (median, >1 = servelm faster): {', '.join(parts)}; "
                     f"greedy outputs identical for {agree:.0%} of requests")
    for key in SYSTEMS[1:]:
        if "skipped" in result.get(key, {}):
            notes.append(result[key]["skipped"])
    if (note := energy_note(result, SYSTEMS)) is not None:
        notes.append(note)
    notes.append(f"results: {result['result_file']}")
    title = (f"latency: batch {cfg['batch_size']}, {cfg['input_len']} in / {cfg['output_len']} "
             f"out, {cfg['num_iters']} iterations")
    print_report([make_table(title, cols, rows)], notes)
