"""The markdown tables of docs/benchmarks.md's simulator uses, from run.sh's result files."""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def load(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(title: str, names: list[str], cols: list[tuple[str, callable]]) -> None:
    print(f"\n{title}\n")
    print(row(["run", *[c for c, _ in cols]]))
    print(row(["---"] * (len(cols) + 1)))
    for name in names:
        r = load(name)
        print(row([name, *[f(r) for _, f in cols]]))


def ms(key: str):
    return lambda r: f"{r[key]:.0f}" if r.get(key) is not None else "-"


COMMON = [("mean TTFT ms", ms("mean_ttft_ms")), ("p90 TTFT ms", ms("p90_ttft_ms")),
          ("mean TPOT ms", lambda r: f"{r['mean_tpot_ms']:.1f}"), ("p99 E2E ms", ms("p99_e2el_ms")),
          ("output tok/s", lambda r: f"{r['output_throughput']:.0f}"),
          ("wall s", lambda r: f"{r['wall_s']:.0f}")]


def main() -> None:
    which = sys.argv[1:] or ["policy", "router", "disagg", "spot", "mixed"]
    if "policy" in which:
        table("scheduling policies", [f"policy-{p}" for p in ("fcfs", "sjf", "mlfq")],
              [*COMMON, ("preemptions", lambda r: r["num_preemptions"])])
    if "router" in which:
        table("routers", [f"router-{p}" for p in ("round-robin", "least-loaded", "power-of-two",
                                                   "prefix-aware")],
              [*COMMON, ("prefix hit rate", lambda r: f"{r['prefix_cache_hit_rate']:.1%}")])
    if "disagg" in which:
        table("prefill:decode", ["disagg-colocated", "disagg-2p6d", "disagg-4p4d", "disagg-6p2d"],
              [*COMMON, ("KV moves", lambda r: r.get("num_handovers", 0)),
               ("mean transfer ms", lambda r: f"{r.get('mean_kv_transfer_ms') or 0:.1f}")])
    if "spot" in which:
        table("spot replicas", ["spot-none", "spot-migrate", "spot-restart"],
              [*COMMON, ("completed", lambda r: r["completed"]),
               ("migrated", lambda r: r.get("num_migrations", 0)),
               ("restarted", lambda r: r.get("num_restarted_requests", 0)),
               ("recomputed tokens", lambda r: r.get("recomputed_tokens", 0))])
    if "mixed" in which:
        table("4 H100 + 4 L4", [f"mixed-{p}" for p in ("round-robin", "least-loaded", "speed-aware")],
              [*COMMON, ("requests to H100 / L4", lambda r: " / ".join(
                  str(v) for v in r["requests_by_kind"].values()))])


if __name__ == "__main__":
    main()
