"""`servelm bench parallel`: one model under several tensor x pipeline-parallel layouts,
side by side in one run, against the single-process engine.

For each layout (T x P worker processes; each gets cores / (T x P) threads, one process
gets them all) it measures batch-1 latency (TTFT, TPOT) on random prompts, offline
throughput on a synthetic length mix, and, from the engine's counters, the all-reduces the
output rank ran per decode step beside what the model predicts: (2 per layer of its stage,
+1 for the vocab-parallel embedding on the first) x tokens x hidden x 4 bytes. Layouts run
in turn, `rounds` times over, and each figure is the median over rounds, because on a
shared 2-core machine minutes apart differ more than layouts do. Ratios are the
single-process figure over the layout's (above 1: the layout is faster).

The same split on GPUs joined by NVLink is estimated by `nvlink_estimate`, a model, not a
measurement: each rank computes 1/T of the single-device step, and each all-reduce costs
a latency plus its ring traffic over the link.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from servelm.bench.datasets import synthetic_requests
from servelm.bench.harness import (
    Table,
    finish,
    greedy,
    new_result,
    print_report,
    progress,
    split_engine,
)
from servelm.bench.latency import random_prompts, run_servelm

# Published H100 SXM figures for the model: NVLink 4 moves 450 GB/s each way per GPU, and
# NCCL's small-message all-reduce takes about 10 us there (nccl-tests, 8-byte messages).
NVLINK_BYTES_PER_S = 450e9
NVLINK_ALLREDUCE_LATENCY_S = 10e-6


@dataclass
class ParallelConfig:
    engine: dict[str, Any] = field(default_factory=dict)  # LLM(**engine) kwargs incl. model
    layouts: list[str] = field(default_factory=lambda: ["1x1", "2x1", "1x2"])  # T x P
    input_len: int = 128
    output_len: int = 64
    num_iters: int = 3
    num_prompts: int = 64  # throughput requests
    max_output_len: int = 128
    rounds: int = 2
    seed: int = 0
    result_file: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        for layout in self.layouts:
            parse_layout(layout)
        if "1x1" not in self.layouts:
            self.layouts = ["1x1", *self.layouts]  # every ratio is against one process


def parse_layout(layout: str) -> tuple[int, int]:
    try:
        tp, pp = (int(v) for v in layout.lower().split("x"))
    except ValueError:
        raise ValueError(f"layouts: {layout!r} is not TxP, e.g. 2x1") from None
    if tp < 1 or pp < 1:
        raise ValueError(f"layouts: {layout!r} needs T and P >= 1")
    return tp, pp


def nvlink_estimate(step_s: float, tp: int, calls: float, bytes_per_step: float) -> float:
    """A decode step split T ways over NVLink: 1/T of `step_s` of compute, plus each of
    `calls` all-reduces' latency and ring traffic (2 (T-1)/T of its bytes each way)."""
    traffic = bytes_per_step * 2 * (tp - 1) / tp / NVLINK_BYTES_PER_S
    return step_s / tp + calls * NVLINK_ALLREDUCE_LATENCY_S + traffic


def _measure(cfg: ParallelConfig, layout: str, model: str | None, engine: dict[str, Any],
             say: Any) -> dict[str, Any]:
    from servelm.llm import LLM
    from servelm.model.sharding import stage_layers

    tp, pp = parse_layout(layout)
    say(f"{layout}: starting {tp * pp} worker process(es) ...")
    with LLM(model, **{**engine, "tensor_parallel_size": tp, "pipeline_parallel_size": pp}) as llm:
        tok, arch = llm.get_tokenizer(), llm.engine.arch
        batches = random_prompts(tok, cfg.input_len, 1, cfg.num_iters + 1, cfg.seed)
        run_servelm(llm, batches[:1], cfg.output_len)  # warm-up
        before = llm.get_metrics()
        lat = run_servelm(llm, batches[1:], cfg.output_len)
        after = llm.get_metrics()
        reqs = synthetic_requests(tok, cfg.num_prompts, cfg.max_output_len, cfg.seed)
        start = time.perf_counter()
        outs = greedy(llm, [r.prompt_token_ids for r in reqs], [r.output_len for r in reqs])
        elapsed = time.perf_counter() - start
    steps = after["num_steps"] - before["num_steps"]
    calls, nbytes, seconds = (after[k] - before[k] for k in (
        "allreduce_calls_total", "allreduce_bytes_total", "allreduce_seconds_total"))
    rows = cfg.num_iters * (cfg.input_len + cfg.output_len - 1)  # tokens through the model
    per_row = 2 * len(stage_layers(arch.num_layers, pp, pp - 1)) + (pp == 1)
    predicted = per_row * rows * arch.hidden_size * 4 if tp > 1 else 0
    tpot = [d / (len(t) - 1) for d, t in zip(lat.decode, lat.token_ids)]
    return {"ttft_s": statistics.median(lat.ttft), "tpot_s": statistics.median(tpot),
            "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
            "allreduce_calls_per_step": calls / steps, "allreduce_s_per_step": seconds / steps,
            "allreduce_bytes_per_step": nbytes / steps, "predicted_bytes_per_step": predicted / steps,
            "token_ids": lat.token_ids}


def run_parallel(cfg: ParallelConfig) -> dict[str, Any]:
    model, engine, dtype = split_engine(cfg.engine)
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "num_threads"):
        engine.pop(key, None)  # each layout sets its own (threads: cores / ranks)
    say = progress(cfg.quiet)
    result = new_result("parallel", cfg, dtype)
    runs: dict[str, list[dict[str, Any]]] = {layout: [] for layout in cfg.layouts}
    for r in range(cfg.rounds):
        for layout in cfg.layouts:
            runs[layout].append(_measure(cfg, layout, model, engine, say))
            say(f"{layout} round {r + 1}: TPOT {runs[layout][-1]['tpot_s'] * 1e3:.1f} ms")
    one = runs["1x1"][0]["token_ids"]
    for layout, samples in runs.items():
        fig = {k: statistics.median(s[k] for s in samples) for k in samples[0] if k != "token_ids"}
        fig["rounds"] = [{k: v for k, v in s.items() if k != "token_ids"} for s in samples]
        fig["greedy_identical_to_1x1"] = all(s["token_ids"] == one for s in samples)
        result[layout] = fig
    base = result["1x1"]
    for layout in cfg.layouts:
        fig, (tp, _) = result[layout], parse_layout(layout)
        fig["ratio_vs_1x1"] = {"ttft": base["ttft_s"] / fig["ttft_s"], "tpot": base["tpot_s"] / fig["tpot_s"],
                               "throughput": fig["output_tok_s"] / base["output_tok_s"]}
        if tp > 1:
            fig["nvlink_estimate_tpot_s"] = nvlink_estimate(
                base["tpot_s"], tp, fig["allreduce_calls_per_step"], fig["allreduce_bytes_per_step"])
    return finish(result, "parallel", cfg, print_table)


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    table = Table(f"parallel layouts: batch-1 {cfg['input_len']} in / {cfg['output_len']} out; "
                  f"throughput {cfg['num_prompts']} requests; median of {cfg['rounds']} rounds",
                  ["T x P", "TTFT ms", "TPOT ms", "tok/s", "TPOT vs 1x1", "tok/s vs 1x1",
                   "all-reduce/step", "ms/step", "KB/step", "predicted KB"])
    notes = []
    for layout in cfg["layouts"]:
        f = result[layout]
        table.add_row(layout, f"{f['ttft_s'] * 1e3:.1f}", f"{f['tpot_s'] * 1e3:.2f}",
                      f"{f['output_tok_s']:.1f}", f"{f['ratio_vs_1x1']['tpot']:.2f}x",
                      f"{f['ratio_vs_1x1']['throughput']:.2f}x", f"{f['allreduce_calls_per_step']:.1f}",
                      f"{f['allreduce_s_per_step'] * 1e3:.2f}", f"{f['allreduce_bytes_per_step'] / 1e3:.1f}",
                      f"{f['predicted_bytes_per_step'] / 1e3:.1f}")
        if not f["greedy_identical_to_1x1"]:
            notes.append(f"{layout}: greedy outputs differ from 1x1")
        if "nvlink_estimate_tpot_s" in f:
            notes.append(f"{layout} over NVLink (model): TPOT {f['nvlink_estimate_tpot_s'] * 1e3:.2f} ms "
                         f"= {result['1x1']['tpot_s'] / f['nvlink_estimate_tpot_s']:.2f}x 1x1")
    print_report([table], [*notes, f"results: {result['result_file']}"])
