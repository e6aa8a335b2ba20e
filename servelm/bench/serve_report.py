"""The terminal table of a serving run: one row per request rate."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from servelm.bench.serve_metrics import percentile_key


def _ms(run: dict[str, Any], stat: str, name: str) -> str:
    v = run.get(f"{stat}_{name}_ms")
    return "-" if v is None else f"{v:.1f}"


def print_serve_table(runs: list[dict[str, Any]], cfg: Any, result: dict[str, Any]) -> None:
    tail = percentile_key(max(cfg.metric_percentiles)) if cfg.metric_percentiles else "median"
    table = Table(title=f"serving: {result['model_id']} at {result['base_url']}{result['endpoint']}"
                        f", {result['dataset']['name']}")
    cols = ["rate", "done", "failed", "duration s", "req/s", "out tok/s"]
    if cfg.goodput:
        cols.append("goodput req/s")
    for name in ("ttft", "tpot", "itl", "e2el"):
        cols += [f"mean {name} ms", f"{tail} {name} ms"]
    for i, c in enumerate(cols):
        table.add_column(c, justify="left" if i == 0 else "right")
    for run in runs:
        row = [str(run["request_rate"]), str(run["completed"]), str(run["failed"]),
               f"{run['duration_s']:.1f}", f"{run['request_throughput']:.2f}",
               f"{run['output_throughput']:.1f}"]
        if cfg.goodput:
            row.append(f"{run['request_goodput']:.2f}")
        for name in ("ttft", "tpot", "itl", "e2el"):
            row += [_ms(run, "mean", name), _ms(run, tail, name)]
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not wrap the table at 80 columns
        console = Console(width=200)
    console.print(table)
    for run in runs:
        for reason, n in run["failed_reasons"].items():
            console.print(f"rate {run['request_rate']}: {n} failed: {reason}")
    if runs[0].get("energy_j") is None:
        console.print(f"energy: unavailable ({runs[0]['energy_unavailable_reason']})")
    else:
        for run in runs:
            console.print(f"rate {run['request_rate']}: {run['energy_per_token_j']:.3f} J per "
                          f"output token ({'+'.join(run['energy_sources'])}, whole machine)")
    if cfg.goodput:
        console.print("goodput SLOs (ms): " + ", ".join(f"{k} <= {v:g}"
                                                        for k, v in cfg.goodput.items()))
    console.print(f"results: {result['result_file']}" + "".join(f"\nplot: {p}"
                                                                 for p in result.get("plots", [])))
