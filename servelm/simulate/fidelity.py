"""`servelm simulate compare`: a simulated run against measured ones, metric by metric and
rate by rate, as the fidelity table in docs/benchmarks.md shows it.

Several measured runs of the same workload can be given: the simulation is compared with
their mean, and the spread between them (the machine's own run-to-run noise) is shown
beside it, since a simulator cannot be held closer than the real engine is to itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from servelm.bench.harness import Table
from servelm.simulate.workload import result_runs

METRICS = ("mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms", "output_throughput", "num_preemptions")


def _runs(path: str) -> dict[str, dict[str, Any]]:
    """rate -> run, from a bench serve or simulate run result (preemptions from the server's
    counters in a measured one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read a result from {path}: {exc}") from exc
    out = {}
    for run in result_runs(data):
        run = dict(run)
        counted = run.get("server_counters", {}).get("num_preemptions")
        if "num_preemptions" not in run and counted is not None:
            run["num_preemptions"] = counted
        out[str(run.get("request_rate"))] = run
    return out


def compare(real_paths: list[str], sim_path: str) -> dict[str, Any]:
    """Per rate and metric: each measured value, their mean, the simulated one, its error
    against the mean and against each run, and the measured runs' spread ((max - min) /
    mean)."""
    reals = [_runs(p) for p in real_paths]
    sim = _runs(sim_path)
    rows: dict[str, Any] = {}
    for rate, simulated in sim.items():
        measured = [r[rate] for r in reals if rate in r]
        if not measured:
            continue
        for metric in METRICS:
            values = [m[metric] for m in measured if m.get(metric) is not None]
            if not values or simulated.get(metric) is None:
                continue
            mean = sum(values) / len(values)
            rows[f"{rate} {metric}"] = {
                "rate": rate, "metric": metric, "measured": values, "measured_mean": mean,
                "simulated": simulated[metric],
                "error": simulated[metric] / mean - 1 if mean else None,
                "errors": [simulated[metric] / v - 1 if v else None for v in values],
                "spread": (max(values) - min(values)) / mean if mean and len(values) > 1 else None}
    if not rows:
        raise ValueError(f"{sim_path} and {real_paths} share no request rate")
    return {"real": real_paths, "simulated": sim_path, "rows": list(rows.values())}


def table(result: dict[str, Any]) -> Table:
    t = Table("simulated vs measured", ["req/s", "metric", "measured", "simulated",
                                         "error vs mean", "error vs each run", "measured spread"])
    for row in result["rows"]:
        t.add_row(row["rate"], row["metric"], " / ".join(f"{v:.4g}" for v in row["measured"]),
                  f"{row['simulated']:.4g}", _pct(row["error"]),
                  " / ".join(_pct(e) for e in row["errors"]), _pct(row["spread"], sign=""))
    return t


def _pct(x: float | None, sign: str = "+") -> str:
    return "-" if x is None else f"{x:{sign}.1%}"


def add_compare_parser(ssub: Any) -> None:
    p = ssub.add_parser("compare", help="a simulated run against measured runs of its workload")
    p.add_argument("--real", nargs="+", required=True, metavar="RESULT",
                   help="bench serve results of the same workload (several: repeated runs)")
    p.add_argument("--sim", required=True, metavar="RESULT", help="the simulate run result")
    p.add_argument("--result-file", default=None, help="also write the comparison as JSON")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    result = compare(args.real, args.sim)
    print(table(result))
    worst = max((r for r in result["rows"] if r["error"] is not None), key=lambda r: abs(r["error"]))
    print(f"largest error vs the mean: {worst['error']:+.1%} ({worst['rate']} req/s, {worst['metric']})")
    each = [(e, r) for r in result["rows"] for e in r["errors"] if e is not None]
    e, r = max(each, key=lambda pair: abs(pair[0]))
    print(f"largest error vs one run: {e:+.1%} ({r['rate']} req/s, {r['metric']})")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(result, indent=1))
    return 0
