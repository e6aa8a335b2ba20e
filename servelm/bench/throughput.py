"""`servelm bench throughput`: offline batch throughput, servelm against transformers.

The question this answers: given a pile of requests with a realistic mix of lengths, how many
useful output tokens per second does servelm's continuously batched engine deliver compared
with the obvious alternative, transformers `generate` in static padded batches? Both run the
same token ids, the same weights and dtype, greedy, EOS ignored, with the same thread count,
and model loading is excluded from the timings.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from servelm.bench.datasets import BenchRequest, build_requests, summarize


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
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outs]
    fig = _rates(len(requests), sum(len(r.prompt_token_ids) for r in requests),
                 sum(len(t) for t in ids), elapsed)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    e2e = [o.metrics.finished_time - o.metrics.arrival_time for o in outs]
    fig.update(ttft_median_s=statistics.median(ttft), e2e_median_s=statistics.median(e2e),
               e2e_max_s=max(e2e), engine_metrics=llm.get_metrics())
    return fig, ids


def machine_info(dtype: str) -> dict[str, Any]:
    """What the numbers were measured on; CPU results mean little without it."""
    import transformers

    cpu, mem_gb = platform.processor() or "unknown", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "mem_total_gb": mem_gb,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "dtype": dtype}


def _git_revision() -> str | None:
    """The servelm commit measured, with '+dirty' when the tree has local changes."""
    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests whose greedy outputs are identical (bf16 drifts; fp32 rarely)."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


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
        "benchmark": "throughput",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["servelm", *sys.argv[1:]]) if sys.argv else "",
        "servelm_revision": _git_revision(),
        "machine": machine_info(dtype),
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
                                       None if cfg.quiet else say)
        tf = _rates(len(requests), summary["prompt_tokens"], run.useful_output, run.elapsed_s)
        tf.update(batch_size=run.batch_size, probe_output_tok_s=probes,
                  attn_implementation=hf.config._attn_implementation,
                  raw_generated_tokens=run.raw_generated,
                  raw_output_tok_s=run.raw_generated / run.elapsed_s,
                  per_request_output_tokens_match=[len(t) for t in run.token_ids]
                  == [r.output_len for r in requests])
        result["transformers"] = tf
        result["ratio_output_tok_s"] = sv["output_tok_s"] / tf["output_tok_s"]
        result["greedy_exact_match_fraction"] = _agreement(sv_ids, run.token_ids)
    result["servelm"]["per_request_output_tokens_match"] = (
        [len(t) for t in sv_ids] == [r.output_len for r in requests])
    out = Path(cfg.result_file or
               f"bench-results/throughput-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["result_file"] = str(out)
    if not cfg.quiet:
        print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    """A compact side-by-side table (rich when installed, plain text otherwise)."""
    cols = ["system", "requests", "prompt tok", "output tok", "wall s", "output tok/s",
            "total tok/s"]
    rows = []
    for key in ("servelm", "transformers"):
        if key in result:
            r = result[key]
            label = "servelm" if key == "servelm" else f"transformers bs={r['batch_size']}"
            rows.append([label, str(r["requests"]), str(r["prompt_tokens"]),
                         str(r["output_tokens"]), f"{r['elapsed_s']:.1f}",
                         f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}"])
    notes = []
    if "ratio_output_tok_s" in result:
        tf = result["transformers"]
        notes.append(f"servelm / transformers output tok/s: {result['ratio_output_tok_s']:.2f}x "
                     f"(transformers raw generated incl. padding waste: "
                     f"{tf['raw_output_tok_s']:.1f} tok/s)")
    notes.append(f"results: {result['result_file']}")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        for line in [cols, *rows]:
            print("  ".join(v.rjust(w) if i else v.ljust(w)
                            for i, (v, w) in enumerate(zip(line, widths, strict=True))))
        print("\n".join(notes))
        return
    table = Table(title="offline throughput")
    for i, c in enumerate(cols):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not wrap the table at 80 columns
        console = Console(width=120)
    console.print(table)
    for n in notes:
        console.print(n)
