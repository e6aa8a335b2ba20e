"""llama.cpp's own C++ `llama-bench` as the batch-1 peer, on the same GGUF and thread count.

llama-bench is what llama.cpp users quote for a CPU: prompt processing (pp) and token
generation (tg) rates with no Python in the way. Two runs of it match servelm's latency
workload: `-p input_len -n 0` (the prompt, from an empty cache) gives the prefill rate, and
`-p 0 -n output_len -d input_len` the decode rate after a prompt of that length (`-d`: the
cache already holds that many tokens), so both decode over the same context lengths.
TPOT = 1 / tg rate; TTFT ~ input_len / pp rate plus one TPOT (llama-bench times no single
request, so this is an estimate, marked as such in the result).

The binary comes from `--llama-bench PATH`, else $SERVELM_LLAMA_BENCH, else `llama-bench`
on PATH; it builds from the llama-cpp-python sdist (cmake, ~8 min on 2 cores, see
docs/benchmarks.md). Without it the peer is recorded as skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

NOT_FOUND = ("llama-bench peer skipped: no llama-bench binary (give --llama-bench PATH, set "
             "SERVELM_LLAMA_BENCH, or put it on PATH; see docs/benchmarks.md)")


def find_binary(given: str | None) -> str | None:
    path = given or os.environ.get("SERVELM_LLAMA_BENCH") or shutil.which("llama-bench")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def _run(binary: str, model: str, threads: int, reps: int, extra: list[str]) -> dict[str, Any]:
    cmd = [binary, "-m", model, "-t", str(threads), "-r", str(reps), "-o", "json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    rows = json.loads(proc.stdout)
    if len(rows) != 1:
        raise RuntimeError(f"llama-bench printed {len(rows)} results, expected 1: {proc.stdout[:500]}")
    return rows[0]


def run(binary: str, model: str, threads: int, input_len: int, output_len: int,
        reps: int) -> dict[str, Any]:
    """Prefill and decode rates of `model`, as latency figures comparable with servelm's."""
    pp = _run(binary, model, threads, reps, ["-p", str(input_len), "-n", "0"])
    tg = _run(binary, model, threads, reps, ["-p", "0", "-n", str(output_len), "-d", str(input_len)])
    tpot = 1.0 / tg["avg_ts"]
    return {
        "tpot_s": {"mean": tpot, "median": tpot},
        "ttft_s_estimate": input_len / pp["avg_ts"] + tpot,
        "decode_tok_s": tg["avg_ts"], "decode_tok_s_stdev": tg["stddev_ts"],
        "prefill_tok_s": pp["avg_ts"], "prefill_tok_s_stdev": pp["stddev_ts"],
        "threads": threads, "repetitions": reps, "build": tg.get("build_commit"),
        "model_type": tg.get("model_type"),
        "command": f"{binary} -m {model} -t {threads} -r {reps} [-p {input_len} -n 0] "
                   f"[-p 0 -n {output_len} -d {input_len}]",
    }
