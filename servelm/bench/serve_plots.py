"""PNG plots of a serving run: latency CDFs per rate, and throughput/latency versus rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from servelm.bench.harness import pyplot
from servelm.bench.serve_metrics import METRICS, percentile_key

TITLES = {"ttft": "time to first token", "tpot": "time per output token",
          "itl": "inter-token latency", "e2el": "end-to-end latency"}


def _rate_label(rate: Any) -> str:
    return "rate inf" if rate == "inf" else f"rate {rate:g}/s"


def plot_cdfs(samples: dict[Any, dict[str, list[float]]], path: Path) -> Path:
    """One panel per metric, one empirical CDF line per request rate."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, METRICS):
        for rate, per_metric in samples.items():
            ms = np.sort(np.asarray(per_metric[name], dtype=np.float64) * 1e3)
            if ms.size:
                ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post",
                        label=_rate_label(rate))
        ax.set_title(TITLES[name])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_sweep(systems: dict[str, list[dict[str, Any]]], percentiles: list[float],
               path: Path) -> Path:
    """Throughput, goodput and tail latency against the offered rate, one line per system.

    An infinite rate is drawn one doubling past the largest finite rate and labelled 'inf'.
    """
    runs0 = next(iter(systems.values()))
    finite = [r["request_rate"] for r in runs0 if r["request_rate"] != "inf"]
    inf_x = max(finite) * 2 if finite else 1.0
    x = [inf_x if r["request_rate"] == "inf" else r["request_rate"] for r in runs0]
    labels = ["inf" if r["request_rate"] == "inf" else f"{r['request_rate']:g}" for r in runs0]
    key = percentile_key(max(percentiles) if percentiles else 99.0)
    plt = pyplot()
    fig, (tput, reqs, lat) = plt.subplots(1, 3, figsize=(16, 4.8))
    for i, (system, runs) in enumerate(systems.items()):
        color = f"C{i}"
        prefix = f"{system} " if system else ""
        tput.plot(x, [r["output_throughput"] for r in runs], "o-", color=color,
                  label=f"{prefix}output tok/s")
        reqs.plot(x, [r["request_throughput"] for r in runs], "o-", color=color,
                  label=f"{prefix}completed req/s")
        if all(r.get("request_goodput") is not None for r in runs):
            reqs.plot(x, [r["request_goodput"] for r in runs], "s--", color=color,
                      label=f"{prefix}goodput req/s")
        for name, style in (("ttft", "o-"), ("tpot", "^:"), ("e2el", "s--")):
            lat.plot(x, [r.get(f"{key}_{name}_ms", r[f"mean_{name}_ms"]) for r in runs], style,
                     color=color, label=f"{prefix}{key} {name}")
    tput.set(title="output throughput", ylabel="tokens/s")
    reqs.set(title="requests completed (and within SLOs)", ylabel="requests/s")
    lat.set(title=f"{key} latency", ylabel="ms", yscale="log")
    for ax in (tput, reqs, lat):
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_xscale("log", base=2)  # sweeps usually double the rate each step
        ax.set_xticks(x, labels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
