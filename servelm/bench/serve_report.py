"""Terminal tables of a serving run: one row per request rate, and systems side by side."""

from __future__ import annotations

from typing import Any

from servelm.bench.failover import kill_note
from servelm.bench.harness import Table, print_report, ratio
from servelm.bench.serve_metrics import METRICS, percentile_key
from servelm.bench.server_counters import counter_notes


def _ms(run: dict[str, Any], stat: str, name: str) -> str:
    v = run.get(f"{stat}_{name}_ms")
    return "-" if v is None else f"{v:.1f}"


def rate_table(title: str, runs: list[dict[str, Any]], tail: str, goodput: bool,
               fluidity: bool = False) -> Table:
    cols = ["rate", "done", "failed", "duration s", "req/s", "out tok/s"]
    cols += ["goodput req/s"] if goodput else []
    cols += ["fluidity"] if fluidity else []
    for name in METRICS:
        cols += [f"mean {name} ms", f"{tail} {name} ms"]
    table = Table(title, cols)
    for run in runs:
        row = [str(run["request_rate"]), str(run["completed"]), str(run["failed"]),
               f"{run['duration_s']:.1f}", f"{run['request_throughput']:.2f}",
               f"{run['output_throughput']:.1f}"]
        row += [f"{run['request_goodput']:.2f}"] if goodput else []
        if fluidity:
            row.append("-" if run.get("fluidity_index") is None else f"{run['fluidity_index']:.3f}")
        for name in METRICS:
            row += [_ms(run, "mean", name), _ms(run, tail, name)]
        table.add_row(*row)
    return table


def comparison_table(systems: dict[str, list[dict[str, Any]]], tail: str) -> Table:
    """Output throughput and tail latencies per rate, with servelm's throughput ratio."""
    names = list(systems)
    others = [n for n in names if n != "servelm"]
    cols = ["rate"] + [f"{n} out tok/s" for n in names]
    cols += [f"servelm/{n} tok/s" for n in others] if "servelm" in systems else []
    cols += [f"{n} {tail} {m} ms" for m in ("ttft", "tpot") for n in names]
    table = Table("side by side", cols)
    for i, run in enumerate(systems[names[0]]):
        per = {n: systems[n][i] for n in names}
        row = [str(run["request_rate"])] + [f"{per[n]['output_throughput']:.1f}" for n in names]
        if "servelm" in systems:
            row += [f"{r:.2f}x" if (r := ratio(per["servelm"]["output_throughput"],
                                               per[n]["output_throughput"])) is not None else "-"
                    for n in others]
        row += [_ms(per[n], tail, m) for m in ("ttft", "tpot") for n in names]
        table.add_row(*row)
    return table


def print_serve_report(systems: dict[str, list[dict[str, Any]]], cfg: Any,
                       result: dict[str, Any]) -> None:
    tail = percentile_key(max(cfg.metric_percentiles)) if cfg.metric_percentiles else "median"
    tables, notes = [], []
    for system, runs in systems.items():
        where = system or f"{result['model_id']} at {result['base_url']}"
        tables.append(rate_table(f"serving: {where}{result['endpoint']}, "
                                 f"{result['dataset']['name']}", runs, tail, bool(cfg.goodput),
                                 cfg.fluidity is not None))
        for run in runs:
            label = f"{system} rate {run['request_rate']}".strip()
            notes += [f"{label}: {n} failed: {reason}" for reason, n in run["failed_reasons"].items()]
            if "replica_killed" in run:
                notes.append(kill_note(label, run["replica_killed"]))
            notes += counter_notes(label, run.get("server_counters", {}))
    if len(systems) > 1:
        tables.append(comparison_table(systems, tail))
    first = next(iter(systems.values()))[0]
    if first.get("energy_j") is None:
        notes.append(f"energy: unavailable ({first['energy_unavailable_reason']})")
    else:
        for system, runs in systems.items():
            for run in runs:
                per = run["energy_per_token_j"]
                notes.append(f"{system} rate {run['request_rate']}: "
                             f"{'-' if per is None else f'{per:.3f}'} J per output token "
                             f"({'+'.join(run['energy_sources'])}, whole machine)")
    if cfg.goodput:
        notes.append("goodput SLOs (ms): " + ", ".join(f"{k} <= {v:g}"
                                                       for k, v in cfg.goodput.items()))
    if cfg.fluidity is not None:
        notes.append(f"fluidity-index: share of token deadlines met, first token due "
                     f"{cfg.fluidity[0]:g} ms after sending, each next {cfg.fluidity[1]:g} ms "
                     "after the one before (Etalon)")
    notes.append(f"results: {result['result_file']}")
    notes += [f"plot: {p}" for p in result.get("plots", [])]
    print_report(tables, notes)
