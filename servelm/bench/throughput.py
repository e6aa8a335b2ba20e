"""`servelm bench throughput`: offline batch throughput, servelm against its peers.

The question this answers: given a pile of requests with a realistic mix of lengths, how many
useful output tokens per second does servelm's continuously batched engine deliver compared
with the obvious alternatives: transformers `generate` in static padded batches, and llama.cpp
(llama-cpp-python, one sequence at a time, on the GGUF's quantized blocks; skipped with a
message when not installed)? All run the same token ids from the same weights file, greedy,
EOS ignored, with the same thread count; model loading is excluded from the timings. Energy
per output token is read from hardware counters around each timed region where they are
readable, and reported as unavailable (with the reason) otherwise.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from servelm.bench.datasets import BenchRequest, build_requests, summarize
from servelm.bench.energy import EnergyMeter
from servelm.bench.harness import (
    SYSTEMS,
    Table,
    agreement,
    finish,
    greedy,
    joules_cell,
    measure,
    new_result,
    print_systems_report,
    progress,
    ran,
    ratio,
    split_engine,
)


@dataclass
class ThroughputConfig:
    """Everything one benchmark run depends on (recorded in the result file)."""

    engine: dict[str, Any] = field(default_factory=dict)  # LLM(**engine) kwargs incl. model
    num_prompts: int = 256
    dataset: str | None = None
    dataset_path: str | None = None
    max_output_len: int = 256
    max_prompt_len: int | None = None
    hf_batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    hf_probe_batches: int = 2
    skip_hf: bool = False
    skip_llamacpp: bool = False
    seed: int = 0
    result_file: str | None = None
    quiet: bool = False
    save_detailed: bool = False  # per-request samples (output ids, timings) in the result


def _rates(requests: list[BenchRequest], token_ids: list[list[int]],
           elapsed: float) -> dict[str, Any]:
    """Counts and rates of one system's run over `requests`, and whether every request got
    exactly the output length it asked for."""
    n_req, prompt = len(requests), sum(len(r.prompt_token_ids) for r in requests)
    output = sum(len(t) for t in token_ids)
    return {"requests": n_req, "prompt_tokens": prompt, "output_tokens": output,
            "elapsed_s": elapsed, "requests_per_s": n_req / elapsed,
            "output_tok_s": output / elapsed, "total_tok_s": (prompt + output) / elapsed,
            "per_request_output_tokens_match": [len(t) for t in token_ids]
            == [r.output_len for r in requests]}


Samples = dict[str, list[Any]]  # per request: "token_ids", and timings where measured


def run_servelm(llm: Any, requests: list[BenchRequest], show_progress: bool = False,
                ) -> tuple[dict[str, Any], Samples]:
    """Time one `generate` over all requests (after a tiny warmup); returns the figures and
    the per-request samples (output ids, TTFT, end-to-end)."""
    prompts = [r.prompt_token_ids for r in requests]
    run = measure(lambda: greedy(llm, prompts, [r.output_len for r in requests],
                                 show_progress=show_progress),
                  warmup=lambda: greedy(llm, [p[:16] for p in prompts[:2]], 4))
    outs = run.value
    samples = {"token_ids": [list(o.outputs[0].token_ids) for o in outs],
               "ttft_s": [o.metrics.first_token_time - o.metrics.arrival_time for o in outs],
               "e2e_s": [o.metrics.finished_time - o.metrics.arrival_time for o in outs]}
    fig = _rates(requests, samples["token_ids"], run.elapsed_s)
    fig.update(run.energy.as_dict(fig["output_tokens"]))
    fig.update(ttft_median_s=statistics.median(samples["ttft_s"]),
               e2e_median_s=statistics.median(samples["e2e_s"]), e2e_max_s=max(samples["e2e_s"]),
               engine_metrics=llm.get_metrics())
    return fig, samples


def run_transformers_peer(model: str | None, dtype: str, requests: list[BenchRequest],
                          cfg: ThroughputConfig, say: Any) -> tuple[dict[str, Any], Samples]:
    """transformers' figures in its best static batch size, and its samples."""
    from servelm.bench.hf_peer import load_hf_model, run_transformers

    say("loading transformers model ...")
    hf = load_hf_model(model, dtype)
    say(f"running transformers (batch sizes {cfg.hf_batch_sizes}) ...")
    run, probes = run_transformers(hf, requests, cfg.hf_batch_sizes, cfg.hf_probe_batches,
                                   say, EnergyMeter())
    fig = _rates(requests, run.token_ids, run.elapsed_s)
    fig.update(batch_size=run.batch_size, probe_output_tok_s=probes,
               attn_implementation=hf.config._attn_implementation,
               raw_generated_tokens=run.raw_generated,
               raw_output_tok_s=run.raw_generated / run.elapsed_s, **run.energy_dict())
    return fig, {"token_ids": run.token_ids}


def run_llamacpp_peer(model: str | None, engine: dict[str, Any], requests: list[BenchRequest],
                      seed: int, say: Any) -> tuple[dict[str, Any], Samples | None]:
    """The llama.cpp figures (or {"skipped": why}) and its samples (None when skipped)."""
    from servelm.bench import llamacpp_peer as lcp

    skip = lcp.llamacpp_skip(model, say)
    if skip is not None:
        return skip, None
    say("loading llama.cpp model ...")
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    lm = lcp.load_llamacpp(model, lcp.default_threads(engine), longest, seed)
    say(f"running llama.cpp ({lm.n_threads} threads, one request at a time) ...")
    run = lcp.run_requests(lm, requests)
    fig = _rates(requests, run.token_ids, run.elapsed_s)
    fig.update(lm.settings(), ttft_median_s=statistics.median(run.ttft_s), **run.energy)
    say(f"llama.cpp: {fig['output_tok_s']:.1f} output tok/s in {fig['elapsed_s']:.1f}s")
    return fig, {"token_ids": run.token_ids, "ttft_s": run.ttft_s}


def run_throughput(cfg: ThroughputConfig) -> dict[str, Any]:
    """Build the workload, run every system, write and return the result dict."""
    from servelm.llm import LLM

    model, engine, dtype = split_engine(cfg.engine)
    say = progress(cfg.quiet)
    llm = LLM(model, **engine)  # sets torch's thread count; transformers then reuses it
    name, path, requests = build_requests(cfg.dataset, cfg.dataset_path, llm.get_tokenizer(),
                                          cfg.num_prompts, cfg.max_output_len, cfg.seed,
                                          cfg.max_prompt_len)
    summary = summarize(requests)
    say(f"workload: {name}, {summary['num_requests']} requests, {summary['prompt_tokens']} "
        f"prompt + {summary['output_tokens']} output tokens")
    say("running servelm ...")
    sv, sv_samples = run_servelm(llm, requests, show_progress=not cfg.quiet)
    say(f"servelm: {sv['output_tok_s']:.1f} output tok/s in {sv['elapsed_s']:.1f}s")
    llm.shutdown()  # tensor/pipeline-parallel workers too, before the peers run
    del llm
    result = new_result("throughput", cfg, dtype, dataset=name, dataset_path=path)
    result["workload"] = summary
    ids: dict[str, list[list[int]]] = {}

    def record(system: str, fig: dict[str, Any], samples: Samples | None) -> None:
        result[system] = fig
        if samples is not None:
            ids[system] = samples["token_ids"]
            if cfg.save_detailed:
                fig["samples"] = samples

    record("servelm", sv, sv_samples)
    if not cfg.skip_hf:
        record("transformers", *run_transformers_peer(model, dtype, requests, cfg, say))
    if not cfg.skip_llamacpp:
        record("llama.cpp", *run_llamacpp_peer(model, engine, requests, cfg.seed, say))
    # llama.cpp multiplies Q4_1 blocks natively, servelm dequantizes: expect less agreement.
    for peer, suffix in (("transformers", ""), ("llama.cpp", "_llamacpp")):
        if peer in ids:
            result["ratio_output_tok_s" + suffix] = ratio(sv["output_tok_s"],
                                                          result[peer]["output_tok_s"])
            result["greedy_exact_match_fraction" + suffix] = agreement(ids["servelm"], ids[peer])
    return finish(result, "throughput", cfg, print_table)


def print_table(result: dict[str, Any]) -> None:
    """A compact side-by-side table, then ratios and notes."""
    table = Table("offline throughput", ["system", "requests", "prompt tok", "output tok",
                                         "wall s", "output tok/s", "total tok/s", "J/out tok"])
    for key, r in ran(result, SYSTEMS).items():
        label = {"servelm": "servelm", "transformers": f"transformers bs={r.get('batch_size')}",
                 "llama.cpp": "llama.cpp (sequential)"}[key]
        table.add_row(label, str(r["requests"]), str(r["prompt_tokens"]),
                      str(r["output_tokens"]), f"{r['elapsed_s']:.1f}",
                      f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}", joules_cell(r))
    notes = []
    if "ratio_output_tok_s" in result:
        tf = result["transformers"]
        notes.append(f"servelm / transformers output tok/s: {result['ratio_output_tok_s']:.2f}x "
                     f"(transformers raw generated incl. padding waste: "
                     f"{tf['raw_output_tok_s']:.1f} tok/s); greedy outputs identical for "
                     f"{result['greedy_exact_match_fraction']:.0%} of requests")
    if "ratio_output_tok_s_llamacpp" in result:
        notes.append(f"servelm / llama.cpp output tok/s: "
                     f"{result['ratio_output_tok_s_llamacpp']:.2f}x; greedy outputs identical "
                     f"for {result['greedy_exact_match_fraction_llamacpp']:.0%} of requests "
                     f"(llama.cpp computes on the quantized blocks)")
    print_systems_report(result, table, notes)
