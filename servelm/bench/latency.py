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
- llama-bench: llama.cpp's own C++ benchmark on the same GGUF and threads, when its binary
  is found (bench/llamacpp_bench.py): TPOT from its decode rate at a cache depth of
  input_len, TTFT estimated from its prefill rate. Batch 1 only; --skip-llamacpp skips it
  too.

Latency ratios are peer / servelm, so above 1 means servelm is faster, like the throughput
ratios. Energy per output token is read from hardware counters around the measured
iterations where readable, otherwise reported as unavailable with the reason.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from servelm.bench.datasets import random_token_prompts
from servelm.bench.harness import (
    SYSTEMS,
    Table,
    agreement,
    check_int,
    describe,
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

METRICS = ("ttft_s", "tpot_s", "e2e_s")
PEERS = (*SYSTEMS[1:], "llama-bench")


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
    llama_bench: str | None = None  # path of llama.cpp's llama-bench (default: found on PATH)
    seed: int = 0
    result_file: str | None = None
    quiet: bool = False
    save_detailed: bool = False  # the raw samples and output ids in the result

    def __post_init__(self) -> None:
        for name, low in (("input_len", 1), ("output_len", 1), ("batch_size", 1),
                          ("num_iters", 1), ("num_iters_warmup", 0)):
            check_int(name, getattr(self, name), low)


def random_prompts(tokenizer: Any, input_len: int, batch_size: int, num_sets: int,
                   seed: int = 0) -> list[list[list[int]]]:
    """`num_sets` batches of `batch_size` prompts of `input_len` random non-special ids.

    Every batch is different, so no prefix cache can help."""
    flat = random_token_prompts(tokenizer, num_sets * batch_size, input_len, seed)
    return [flat[i: i + batch_size] for i in range(0, len(flat), batch_size)]


@dataclass
class Samples:
    """Raw timings of one system: per request its TTFT and the seconds from its first to its
    last token (`decode`), per iteration the end-to-end time; and the output ids."""

    ttft: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    def add_request(self, ids: list[int], ttft: float, decode_s: float) -> None:
        self.token_ids.append(list(ids))
        self.ttft.append(ttft)
        self.decode.append(decode_s)

    def add_timed(self, ids: list[int], start: float, times: list[float]) -> None:
        """One request from its token timestamps (`times[i]`: token i+1 ready)."""
        self.add_request(ids, times[0] - start, times[-1] - times[0])

    def figures(self, output_len: int, batch_size: int, energy: dict[str, Any]) -> dict[str, Any]:
        tpot = [d / (len(t) - 1) for d, t in zip(self.decode, self.token_ids) if len(t) > 1]
        return {"ttft_s": describe(self.ttft), "tpot_s": describe(tpot),
                "e2e_s": describe(self.e2e),
                "output_tok_s": batch_size * output_len / statistics.fmean(self.e2e),
                "output_tokens": sum(len(t) for t in self.token_ids),
                "output_tokens_match": all(len(t) == output_len for t in self.token_ids),
                **energy}


# ---- the three systems ---------------------------------------------------------------------

def run_servelm(llm: Any, batches: list[list[list[int]]], output_len: int) -> Samples:
    """`generate` per batch; TTFT/TPOT from the engine's per-request metrics."""
    s = Samples()
    for batch in batches:
        start = time.perf_counter()
        outs = greedy(llm, batch, output_len)
        s.e2e.append(time.perf_counter() - start)
        for o in outs:
            m = o.metrics
            s.add_request(o.outputs[0].token_ids, m.first_token_time - m.arrival_time,
                          m.finished_time - m.first_token_time)
    return s


def run_transformers(hf: Any, batches: list[list[list[int]]], output_len: int) -> Samples:
    """One `generate` per batch, token step times from a never-stopping stopping criterion."""
    from servelm.bench.hf_peer import generate_timed

    s = Samples()
    for batch in batches:
        ids, start, times = generate_timed(hf, batch, output_len)
        s.e2e.append(time.perf_counter() - start)
        for row in ids:
            s.add_timed(row, start, times)
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
            s.add_timed(ids, batch_start, times)
    return s


def _timed_system(run: Callable[[list[list[list[int]]]], Samples],
                  batches: list[list[list[int]]], cfg: LatencyConfig) -> tuple[dict, list[list[int]]]:
    """Warm-up iterations untimed and unmetered, then the measured ones under the meter;
    returns the figures and the output ids."""
    warm, measured = batches[: cfg.num_iters_warmup], batches[cfg.num_iters_warmup:]
    m = measure(lambda: run(measured), (lambda: run(warm)) if warm else None)
    s = m.value
    fig = s.figures(cfg.output_len, cfg.batch_size,
                    m.energy.as_dict(sum(len(t) for t in s.token_ids)))
    if cfg.save_detailed:
        fig["samples"] = asdict(s)
    return fig, s.token_ids


def run_latency(cfg: LatencyConfig) -> dict[str, Any]:
    """Build the prompts, run every system, write and return the result dict."""
    from servelm.llm import LLM

    model, engine, dtype = split_engine(cfg.engine)
    say = progress(cfg.quiet)
    llm = LLM(model, **engine)  # sets torch's thread count; transformers then reuses it
    max_len = llm.engine.max_model_len
    if cfg.input_len + cfg.output_len > max_len:
        raise ValueError(f"input_len + output_len = {cfg.input_len + cfg.output_len} exceeds "
                         f"servelm's max_model_len {max_len}")
    n_sets = cfg.num_iters_warmup + cfg.num_iters
    batches = random_prompts(llm.get_tokenizer(), cfg.input_len, cfg.batch_size, n_sets, cfg.seed)
    result = new_result("latency", cfg, dtype)
    say(f"latency: batch {cfg.batch_size}, {cfg.input_len} prompt + {cfg.output_len} output "
        f"tokens, {cfg.num_iters_warmup} warm-up + {cfg.num_iters} measured iterations")
    say("running servelm ...")
    ids: dict[str, list[list[int]]] = {}
    result["servelm"], ids["servelm"] = _timed_system(
        partial(run_servelm, llm, output_len=cfg.output_len), batches, cfg)
    llm.shutdown()  # tensor/pipeline-parallel workers too, before the peers run
    del llm
    say(f"servelm: TTFT median {result['servelm']['ttft_s']['median'] * 1e3:.1f} ms")
    if not cfg.skip_hf:
        from servelm.bench.hf_peer import load_hf_model

        say("loading transformers model ...")
        hf = load_hf_model(model, dtype)
        say("running transformers ...")
        result["transformers"], ids["transformers"] = _timed_system(
            partial(run_transformers, hf, output_len=cfg.output_len), batches, cfg)
        result["transformers"]["attn_implementation"] = hf.config._attn_implementation
        del hf
    if not cfg.skip_llamacpp:
        from servelm.bench import llamacpp_peer as lcp

        skip = lcp.llamacpp_skip(model, say)
        if skip is not None:
            result["llama.cpp"] = skip
        else:
            say("loading llama.cpp model ...")
            lm = lcp.load_llamacpp(model, lcp.default_threads(engine),
                                   cfg.input_len + cfg.output_len, cfg.seed)
            say(f"running llama.cpp ({lm.n_threads} threads) ...")
            result["llama.cpp"], ids["llama.cpp"] = _timed_system(
                partial(run_llamacpp, lm, output_len=cfg.output_len), batches, cfg)
            result["llama.cpp"].update(lm.settings())
            del lm
        result["llama-bench"] = _llama_bench(model, engine, cfg, say)
    result["ratios"] = _ratios(result)
    result["greedy_exact_match_fraction"] = {
        k: agreement(ids["servelm"], v) for k, v in ids.items() if k != "servelm"}
    return finish(result, "latency", cfg, print_table)


def _ratios(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Peer / servelm for mean and median of each latency (above 1: servelm is faster)."""
    sv = result["servelm"]
    return {peer: {f"{metric}_{stat}": ratio((r.get(metric) or {}).get(stat),
                                             (sv[metric] or {}).get(stat))
                   for metric in METRICS for stat in ("mean", "median")}
            for peer, r in ran(result, PEERS).items()}


def _llama_bench(model: str | None, engine: dict[str, Any], cfg: LatencyConfig,
                 say: Callable[..., None]) -> dict[str, Any]:
    """llama.cpp's C++ llama-bench on the same GGUF (bench/llamacpp_bench.py), or a skip."""
    from servelm.bench import llamacpp_bench
    from servelm.bench.llamacpp_peer import default_threads
    from servelm.model.default_model import default_model_path

    path = model or default_model_path()
    binary = llamacpp_bench.find_binary(cfg.llama_bench)
    why = (llamacpp_bench.NOT_FOUND if binary is None
           else f"llama-bench peer skipped: {path} is not a .gguf file" if not path.endswith(".gguf")
           else "llama-bench peer skipped: it measures batch 1 only" if cfg.batch_size != 1 else None)
    if why is not None:
        say(why)
        return {"skipped": why}
    say(f"running llama-bench ({binary}) ...")
    return llamacpp_bench.run(binary, path, default_threads(engine), cfg.input_len, cfg.output_len,
                              cfg.num_iters)


def print_table(result: dict[str, Any]) -> None:
    """A compact side-by-side table, then ratios and notes."""
    cfg = result["config"]

    def ms(stats: dict[str, float] | None, key: str) -> str:
        return "-" if stats is None else f"{stats[key] * 1e3:.1f}"

    title = (f"latency: batch {cfg['batch_size']}, {cfg['input_len']} in / {cfg['output_len']} "
             f"out, {cfg['num_iters']} iterations")
    table = Table(title, ["system", "TTFT med ms", "TTFT p90 ms", "TPOT med ms", "TPOT p90 ms",
                          "e2e med s", "out tok/s", "J/out tok"])
    for key, r in ran(result, SYSTEMS).items():
        label = "llama.cpp (sequential)" if key == "llama.cpp" and cfg["batch_size"] > 1 else key
        table.add_row(label, ms(r["ttft_s"], "median"), ms(r["ttft_s"], "p90"),
                      ms(r["tpot_s"], "median"), ms(r["tpot_s"], "p90"),
                      f"{r['e2e_s']['median']:.3f}", f"{r['output_tok_s']:.1f}",
                      joules_cell(r))
    if (lb := ran(result, ["llama-bench"]).get("llama-bench")) is not None:
        table.add_row("llama-bench (C++)", f"~{lb['ttft_s_estimate'] * 1e3:.1f}", "-",
                      ms(lb["tpot_s"], "median"), "-", "-", f"{lb['decode_tok_s']:.1f} (decode)", "-")
    notes = []
    for peer, rat in result.get("ratios", {}).items():
        parts = [f"{m.removesuffix('_s').upper()} {rat[m + '_median']:.2f}x"
                 for m in METRICS if rat.get(m + "_median") is not None]
        agree = result["greedy_exact_match_fraction"].get(peer)
        same = "" if agree is None else f"; greedy outputs identical for {agree:.0%} of requests"
        notes.append(f"{peer} / servelm (median, >1 = servelm faster): {', '.join(parts)}{same}")
    print_systems_report(result, table, notes)
