"""`servelm bench migration`: how long a live-migrated request stops, against its K/V size.

One replicas server (2 replicas, threads shared out, automatic balancing off) and the
admin endpoint. For each prompt length, a streamed completion (random token ids, ignore
EOS) is moved to the other replica after `--move-after` tokens, three ways:
- staged: blocks copied while it decodes, the last few during the stop (servelm's default);
- stop-and-copy: stopped first, then every block copied (`max_stages` 0);
- recompute: stopped, no K/V sent; the target prefills prompt and output again.
Downtime is the server's figure (export at the source to the target's first token); the
client's view is the longest gap between two streamed tokens around the move, beside the
median gap (one decode step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from servelm.bench.harness import (
    Table,
    check_int,
    print_report,
    progress,
    result_header,
    result_path,
    write_result,
)

MODES = {"staged": {}, "stop-and-copy": {"max_stages": 0}, "recompute": {"max_stages": 0, "transport": "none"}}
ADMIN_KEY = "bench-migration"


@dataclass
class MigrationBenchConfig:
    model: str | None = None  # None: servelm's default model
    threads: int = 2
    dtype: str = "auto"
    max_model_len: int = 4096
    prompt_lens: list[int] = field(default_factory=lambda: [128, 512, 1024, 2048])
    max_tokens: int = 64
    move_after: int = 16
    repeats: int = 3
    result_file: str | None = None
    quiet: bool = False


def add_migration_parser(bsub: Any) -> None:
    p = bsub.add_parser("migration", help="downtime of live-migrated requests against their KV size")
    p.add_argument("--model", default=None, help="HF folder or GGUF (default: servelm's default)")
    p.add_argument("--threads", type=int, default=2, help="threads shared out among the 2 replicas")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--prompt-lens", type=lambda s: [int(x) for x in s.split(",")],
                   default=[128, 512, 1024, 2048], help="comma-separated prompt lengths in tokens")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--move-after", type=int, default=16, help="streamed tokens before the move")
    p.add_argument("--repeats", type=int, default=3, help="moves per length and mode")
    p.add_argument("--result-file", default=None, help="default: bench-results/migration-<date>.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_migration)


def cmd_migration(args: argparse.Namespace) -> int:
    cfg = MigrationBenchConfig(**{k: v for k, v in vars(args).items()
                                  if k in MigrationBenchConfig.__dataclass_fields__})
    try:
        run_migration(cfg)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _post(url: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def moved_stream(url: str, model: str, prompt: list[int], cfg: MigrationBenchConfig,
                 mode: str) -> dict[str, Any]:
    """One streamed completion, moved after `move_after` tokens; the move's figures and the
    token gaps the client saw."""
    body = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    arrivals, moved, mover = [], {}, None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            arrivals.append(time.perf_counter())
            if len(arrivals) == cfg.move_after:
                ask = {"model": model, "request_id": chunk["id"], **MODES[mode]}
                mover = threading.Thread(target=lambda ask=ask: moved.update(
                    _post(url + "/admin/migrate", ask, ADMIN_KEY)))
                mover.start()
    mover.join()
    if "downtime_s" not in moved:
        raise RuntimeError(f"the move failed: {moved}")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"mode": mode, "prompt_len": len(prompt), **moved,
            "max_gap_after_move_s": max(gaps[cfg.move_after - 1:]),
            "median_gap_s": statistics.median(gaps)}


def run_migration(cfg: MigrationBenchConfig) -> dict[str, Any]:
    from servelm.bench.launch import LaunchSpec, launched
    from servelm.bench.serve import first_model_id

    for name in ("threads", "max_tokens", "move_after", "repeats"):
        check_int("--" + name.replace("_", "-"), getattr(cfg, name))
    if cfg.move_after >= cfg.max_tokens:
        raise ValueError("--move-after must be below --max-tokens")
    say = progress(cfg.quiet)
    out = result_path(cfg.result_file, "migration")
    spec = LaunchSpec(model=cfg.model, num_threads=cfg.threads, dtype=cfg.dtype,
                      max_model_len=cfg.max_model_len, replicas=2, migrate_imbalance=0)
    os.environ["SERVELM_ADMIN_KEY"] = ADMIN_KEY  # the launched server's admin key
    rng, runs = random.Random(0), []

    def prompt(n: int) -> list[int]:  # a new one each time: no replica has any of it cached
        return [rng.randrange(100, 20000) for _ in range(n)]

    with launched("servelm-replicas-round-robin", spec, out.parent / "logs") as url:
        model = first_model_id(url, None)
        say("warming up: one move of each mode ...")
        for mode in MODES:
            moved_stream(url, model, prompt(min(cfg.prompt_lens)), cfg, mode)
        for n in cfg.prompt_lens:
            for i in range(cfg.repeats):
                for mode in MODES:
                    say(f"prompt {n} tokens, {mode}, {i + 1}/{cfg.repeats} ...")
                    runs.append(moved_stream(url, model, prompt(n), cfg, mode))
    result = {**result_header("migration", cfg.dtype), "config": asdict(cfg), "model_id": model,
              "runs": runs, "summary": summarize(runs)}
    write_result(result, out)
    if not cfg.quiet:
        print_report([migration_table(result)], [f"results: {result['result_file']}"])
    return result


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per prompt length and mode."""
    rows = []
    for n in sorted({r["prompt_len"] for r in runs}):
        for mode in MODES:
            rs = [r for r in runs if r["prompt_len"] == n and r["mode"] == mode]
            if not rs:
                continue
            med = {k: statistics.median(r[k] for r in rs) for k in
                   ("downtime_s", "max_gap_after_move_s", "median_gap_s", "bytes_at_stop",
                    "blocks_staged", "blocks_at_stop", "tokens", "copy_s")}
            rows.append({"prompt_len": n, "mode": mode, **med})
    return rows


def migration_table(result: dict[str, Any]) -> Table:
    cfg = result["config"]
    table = Table(f"live migration: {result['model_id']}, 2 replicas, {cfg['threads']} threads, "
                  f"moved after {cfg['move_after']} tokens (medians of {cfg['repeats']})",
                  ["prompt", "mode", "KV blocks staged / at stop", "MB at stop", "downtime ms",
                   "longest token gap ms", "median token gap ms"])
    for r in result["summary"]:
        table.add_row(str(r["prompt_len"]), r["mode"], f"{r['blocks_staged']:.0f} / {r['blocks_at_stop']:.0f}",
                      f"{r['bytes_at_stop'] / 2**20:.2f}", f"{r['downtime_s'] * 1e3:.1f}",
                      f"{r['max_gap_after_move_s'] * 1e3:.1f}", f"{r['median_gap_s'] * 1e3:.1f}")
    return table
