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
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from servelm.bench.datasets import BenchRequest, build_requests, summarize
from servelm.bench.energy import EnergyMeter
from servelm.bench.report import energy_note, make_table, print_report
from servelm.bench.results import result_header, result_path, write_result


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


def _rates(n_req: int, prompt: int, output: int, elapsed: float) -> dict[str, float]:
    return {"requests": n_req, "prompt_tokens": prompt, "output_tokens": output,
            "elapsed_s": elapsed, "requests_per_s": n_req / elapsed,
            "output_tok_s": output / elapsed, "total_tok_s": (prompt + output) / elapsed}


def run_servelm(llm: Any, requests: list[BenchRequest],
                progress: bool = False) -> tuple[dict[str, Any], list[list[int]]]:
    """Time one `generate` over all requests (after a tiny warmup); returns figures and ids."""
    from servelm.sampling_params import SamplingParams

    warm = [{"prompt_token_ids": r.prompt_token_ids[:16]} for r in requests[:2]]
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
              for r in requests]
    meter = EnergyMeter()
    meter.start()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    energy = meter.stop()
    ids = [list(o.outputs[0].token_ids) for o in outs]
    fig = _rates(len(requests), sum(len(r.prompt_token_ids) for r in requests),
                 sum(len(t) for t in ids), elapsed)
    fig.update(energy.as_dict(fig["output_tokens"]))
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    e2e = [o.metrics.finished_time - o.metrics.arrival_time for o in outs]
    fig.update(ttft_median_s=statistics.median(ttft), e2e_median_s=statistics.median(e2e),
               e2e_max_s=max(e2e), engine_metrics=llm.get_metrics())
    return fig, ids


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests whose greedy outputs are identical (bf16 drifts; fp32 rarely)."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


def run_llamacpp_peer(model: str | None, engine: dict[str, Any], requests: list[BenchRequest],
                      seed: int, say: Any) -> tuple[dict[str, Any], list[list[int]] | None]:
    """The llama.cpp figures (or {"skipped": why}) and its output ids (None when skipped)."""
    from servelm.bench import llamacpp_peer as lcp

    why = lcp.unavailable_reason(model)
    if why is not None:
        say(why)
        return {"skipped": why}, None
    say("loading llama.cpp model ...")
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    lm = lcp.load_llamacpp(model, lcp.default_threads(engine), longest, seed)
    say(f"running llama.cpp ({lm.n_threads} threads, one request at a time) ...")
    run = lcp.run_requests(lm, requests)
    fig = _rates(len(requests), sum(len(r.prompt_token_ids) for r in requests),
                 sum(len(t) for t in run.token_ids), run.elapsed_s)
    fig.update(lm.settings(), ttft_median_s=statistics.median(run.ttft_s), **run.energy,
               per_request_output_tokens_match=[len(t) for t in run.token_ids]
               == [r.output_len for r in requests])
    say(f"llama.cpp: {fig['output_tok_s']:.1f} output tok/s in {fig['elapsed_s']:.1f}s")
    return fig, run.token_ids


def run_throughput(cfg: ThroughputConfig) -> dict[str, Any]:
    """Build the workload, run both systems, write and return the result dict."""
    from servelm.llm import LLM

    engine = dict(cfg.engine)
    model = engine.pop("model", None)
    dtype = engine.get("dtype", "float32")
    llm = LLM(model, **engine)  # sets torch's thread count; transformers then reuses it
    name, path, requests = build_requests(cfg.dataset, cfg.dataset_path, llm.get_tokenizer(),
                                          cfg.num_prompts, cfg.max_output_len, cfg.seed,
                                          cfg.max_prompt_len)
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    summary = summarize(requests)
    say(f"workload: {name}, {summary['num_requests']} requests, {summary['prompt_tokens']} "
        f"prompt + {summary['output_tokens']} output tokens")
    say("running servelm ...")
    sv, sv_ids = run_servelm(llm, requests, progress=not cfg.quiet)
    say(f"servelm: {sv['output_tok_s']:.1f} output tok/s in {sv['elapsed_s']:.1f}s")
    del llm
    result: dict[str, Any] = {
        **result_header("throughput", dtype),
        "config": {**{k: v for k, v in vars(cfg).items() if k != "engine"},
                   "engine": {"model": model, **engine}, "dataset": name, "dataset_path": path},
        "workload": summary,
        "servelm": sv,
    }
    if not cfg.skip_hf:
        from servelm.bench.hf_peer import load_hf_model, run_transformers

        say("loading transformers model ...")
        hf = load_hf_model(model, dtype)
        say(f"running transformers (batch sizes {cfg.hf_batch_sizes}) ...")
        run, probes = run_transformers(hf, requests, cfg.hf_batch_sizes, cfg.hf_probe_batches,
                                       None if cfg.quiet else say, EnergyMeter())
        tf = _rates(len(requests), summary["prompt_tokens"], run.useful_output, run.elapsed_s)
        tf.update(batch_size=run.batch_size, probe_output_tok_s=probes,
                  attn_implementation=hf.config._attn_implementation,
                  raw_generated_tokens=run.raw_generated,
                  raw_output_tok_s=run.raw_generated / run.elapsed_s,
                  per_request_output_tokens_match=[len(t) for t in run.token_ids]
                  == [r.output_len for r in requests], **run.energy_dict())
        result["transformers"] = tf
        result["ratio_output_tok_s"] = sv["output_tok_s"] / tf["output_tok_s"]
        result["greedy_exact_match_fraction"] = _agreement(sv_ids, run.token_ids)
        del hf
    if not cfg.skip_llamacpp:
        lc, lc_ids = run_llamacpp_peer(model, engine, requests, cfg.seed, say)
        result["llama.cpp"] = lc
        if lc_ids is not None:
            result["ratio_output_tok_s_llamacpp"] = sv["output_tok_s"] / lc["output_tok_s"]
            # llama.cpp multiplies Q4_1 blocks natively, servelm dequantizes: expect less.
            result["greedy_exact_match_fraction_llamacpp"] = _agreement(sv_ids, lc_ids)
    result["servelm"]["per_request_output_tokens_match"] = (
        [len(t) for t in sv_ids] == [r.output_len for r in requests])
    write_result(result, result_path(cfg.result_file, "throughput"))
    if not cfg.quiet:
        print_table(result)
    return result


def _joules(r: dict[str, Any]) -> str:
    """Energy per output token for a table cell: a number, or 'n/a' when not readable."""
    j = r.get("energy_per_token_j")
    return "n/a" if j is None else f"{j:.3g}"


def print_table(result: dict[str, Any]) -> None:
    """A compact side-by-side table, then ratios and notes."""
    cols = ["system", "requests", "prompt tok", "output tok", "wall s", "output tok/s",
            "total tok/s", "J/out tok"]
    rows = []
    for key in ("servelm", "transformers", "llama.cpp"):
        r = result.get(key)
        if r is None or "skipped" in r:
            continue
        label = {"servelm": "servelm", "transformers": f"transformers bs={r.get('batch_size')}",
                 "llama.cpp": "llama.cpp (sequential)"}[key]
        rows.append([label, str(r["requests"]), str(r["prompt_tokens"]),
                     str(r["output_tokens"]), f"{r['elapsed_s']:.1f}",
                     f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}", _joules(r)])
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
    elif "skipped" in result.get("llama.cpp", {}):
        notes.append(result["llama.cpp"]["skipped"])
    if (note := energy_note(result, ("servelm", "transformers", "llama.cpp"))) is not None:
        notes.append(note)
    notes.append(f"results: {result['result_file']}")
    print_report([make_table("offline throughput", cols, rows)], notes)
