"""PNG plots of a serving run: latency CDFs per rate, and throughput/latency versus rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from servelm.bench.serve_metrics import METRICS, percentile_key  # noqa: E402

TITLES = {"ttft": "time to first token", "tpot": "time per output token",
          "itl": "inter-token latency", "e2el": "end-to-end latency"}


def _rate_label(rate: Any) -> str:
    return "rate inf" if rate == "inf" else f"rate {rate:g}/s"


def plot_cdfs(samples: dict[Any, dict[str, list[float]]], path: Path) -> Path:
    """One panel per metric, one empirical CDF line per request rate."""
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(runs: list[dict[str, Any]], percentiles: list[float], path: Path) -> Path:
    """Throughput (and goodput) and tail latency against the offered request rate.

    An infinite rate is drawn one step past the largest finite rate and labelled 'inf'.
    """
    finite = [r["request_rate"] for r in runs if r["request_rate"] != "inf"]
    inf_x = max(finite) * 2 if finite else 1.0
    x = [inf_x if r["request_rate"] == "inf" else r["request_rate"] for r in runs]
    p = max(percentiles) if percentiles else 99.0
    key = percentile_key(p)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(x, [r["request_throughput"] for r in runs], "o-", label="completed req/s")
    if all(r.get("request_goodput") is not None for r in runs):
        left.plot(x, [r["request_goodput"] for r in runs], "s--", label="goodput req/s")
    left.set_ylabel("requests/s")
    twin = left.twinx()
    twin.plot(x, [r["output_throughput"] for r in runs], "^:", color="tab:green",
              label="output tok/s")
    twin.set_ylabel("output tokens/s")
    left.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    left.set_title("throughput vs offered rate")
    for name in ("ttft", "tpot", "e2el"):
        ys = [r.get(f"{key}_{name}_ms", r[f"mean_{name}_ms"]) for r in runs]
        right.plot(x, ys, "o-", label=f"{key} {name}")
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title(f"{key} latency vs offered rate")
    right.legend(fontsize=8)
    labels = ["inf" if r["request_rate"] == "inf" else f"{r['request_rate']:g}" for r in runs]
    for ax in (left, right):
        ax.set_xlabel("request rate (req/s)")
        ax.set_xscale("log", base=2)  # sweeps usually double the rate each step
        ax.set_xticks(x, labels)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
