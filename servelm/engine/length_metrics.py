"""How well predicted output lengths serve a shortest-job-first scheduler.

SJF runs requests in order of predicted length, so a predictor is only as good as the order
it puts requests in: `pairwise_accuracy` (of the pairs whose true lengths differ, the share
it orders correctly) and Spearman's rank correlation. Errors in tokens (MAE, median relative
error) are reported too, because they are what an admission or memory estimate would use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata's default)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Rank correlation; 0.0 for a constant prediction (no information), None if truth is."""
    if np.ptp(truth) == 0:
        return None
    if np.ptp(pred) == 0:
        return 0.0
    return float(np.corrcoef(rankdata(pred), rankdata(truth))[0, 1])


def pairwise_accuracy(pred: np.ndarray, truth: np.ndarray,
                      chunk: int = 512) -> tuple[float | None, int]:
    """(share of pairs with different true lengths ordered correctly, number of such pairs).

    A tie in the prediction counts half, so any constant predictor scores exactly 0.5.
    """
    score, pairs = 0.0, 0
    for start in range(0, len(truth), chunk):
        dt = np.sign(truth[start:start + chunk, None] - truth[None, :])
        dp = np.sign(pred[start:start + chunk, None] - pred[None, :])
        differ = dt != 0
        pairs += int(differ.sum())
        score += float((dt * dp)[differ].sum())  # +1 right, -1 wrong, 0 tied prediction
    if pairs == 0:
        return None, 0
    return 0.5 + 0.5 * score / pairs, pairs // 2  # each unordered pair was counted twice


def length_metrics(pred: Sequence[float], truth: Sequence[float]) -> dict[str, Any]:
    """n, MAE in tokens, median relative error, Spearman and pairwise ordering accuracy."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"need equal-length non-empty predictions and truths, "
                         f"got {p.shape} and {t.shape}")
    acc, pairs = pairwise_accuracy(p, t)
    return {
        "n": int(t.size),
        "mae_tokens": float(np.mean(np.abs(p - t))),
        "median_rel_error": float(np.median(np.abs(p - t) / np.maximum(t, 1.0))),
        "spearman": spearman(p, t),
        "pairwise_accuracy": acc,
        "num_pairs": pairs,
    }
