"""A learned output-length predictor for the shortest-job-first (sjf) policy.

SJF only helps when the scheduler can tell short requests from long ones before they run,
and `max_tokens` cannot: most clients send the same bound on every request. What the
scheduler needs is the *ranking* of requests by output length, not exact lengths, so this
follows the learned-predictor line of S3 (Jin et al., 2023) and "Efficient LLM Scheduling by
Learning to Rank" (Fu et al., 2024): learn length from the prompt, judge it by how often it
orders two requests correctly (`pairwise_accuracy`), not by its error in tokens.

The model is deliberately small: a hashed bag of token ids and token bigrams (the words of
the instruction carry most of the signal: "list", "one word", "write an essay"), plus log
prompt length, fitted by ridge regression on log1p(output length) in closed form. The
regularization is picked by exact leave-one-out error, which one SVD gives for every
candidate at once. Prediction is a few numpy calls, tens of microseconds for a 1000-token
prompt, cheap enough to run once per request on the engine's hot path. Outputs that hit
`max_tokens` are censored (the true length is longer); they are fitted as if exact, which
still ranks them longest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from servelm.engine.length_metrics import length_metrics

FORMAT_VERSION = 1
DEFAULT_BUCKETS = 2048  # per kind (unigrams, bigrams): few collisions for prompts of ~100 ids
ALPHAS = tuple(float(f"{a:.3g}") for a in np.logspace(-5, 3, 17))

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_BIGRAM_SALT = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit moves every output bit, so low bits hash well."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> _S30)) * _M1
        x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def _bag(keys: np.ndarray, buckets: int) -> np.ndarray:
    """Sublinear counts of hashed keys, scaled to unit length (prompts of any length compare)."""
    counts = np.log1p(np.bincount(_mix(keys) & np.uint64(buckets - 1), minlength=buckets))
    norm = float(np.sqrt(counts @ counts))
    return counts / norm if norm > 0 else counts


def features(prompt_token_ids: Sequence[int], buckets: int = DEFAULT_BUCKETS) -> np.ndarray:
    """[unigram bag | bigram bag | log1p(prompt length)], length 2 * buckets + 1."""
    ids = np.asarray(prompt_token_ids, dtype=np.uint64).reshape(-1)
    bigrams = ((ids[:-1] << _S32) | ids[1:]) ^ _BIGRAM_SALT
    out = np.empty(2 * buckets + 1)
    out[:buckets] = _bag(ids, buckets)
    out[buckets:-1] = _bag(bigrams, buckets)
    out[-1] = np.log1p(ids.size)
    return out


class LengthPredictor:
    """Predicts a request's output tokens from its prompt token ids; build with `fit` or `load`.

    Also keeps the two reference predictors fitted on the same data (the training mean, and
    a regression on prompt length alone) so `evaluate` can show what the tokens add.
    """

    def __init__(self, weights: np.ndarray, intercept: float, *, vocab_size: int, buckets: int,
                 alpha: float, len_mean: float, len_std: float, max_output_len: int,
                 num_train: int, mean_output_len: float, length_coef: tuple[float, float],
                 path: str | None = None) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)
        self.intercept = float(intercept)
        self.vocab_size = int(vocab_size)
        self.buckets = int(buckets)
        self.alpha = float(alpha)
        self.len_mean, self.len_std = float(len_mean), float(len_std)
        self.max_output_len = int(max_output_len)
        self.num_train = int(num_train)
        self.mean_output_len = float(mean_output_len)
        self.length_coef = (float(length_coef[0]), float(length_coef[1]))
        self.path = path
        if self.weights.shape != (2 * self.buckets + 1,):
            raise ValueError(f"weights must have {2 * self.buckets + 1} entries, "
                             f"got shape {self.weights.shape}")

    @classmethod
    def fit(cls, prompts: Sequence[Sequence[int]], output_lens: Sequence[int], *,
            vocab_size: int, buckets: int = DEFAULT_BUCKETS,
            alphas: Sequence[float] = ALPHAS) -> LengthPredictor:
        """Ridge regression of log1p(output_len) on `features`, alpha by leave-one-out error."""
        if len(prompts) != len(output_lens):
            raise ValueError(f"{len(prompts)} prompts but {len(output_lens)} output lengths")
        if len(prompts) < 2:
            raise ValueError(f"need at least 2 (prompt, output length) pairs, got {len(prompts)}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if buckets < 2 or buckets & (buckets - 1):
            raise ValueError(f"buckets must be a power of two >= 2, got {buckets}")
        if not alphas or min(alphas) <= 0:
            raise ValueError(f"alphas must be positive, got {list(alphas)}")
        lens = np.asarray(output_lens, dtype=np.float64)
        if lens.min() < 0:
            raise ValueError(f"output lengths must be >= 0, got {lens.min():g}")
        x = np.stack([features(p, buckets) for p in prompts])
        y = np.log1p(lens)
        len_mean, len_std = float(x[:, -1].mean()), float(x[:, -1].std()) or 1.0
        x[:, -1] = (x[:, -1] - len_mean) / len_std  # same scale as the unit-length bags
        weights, intercept, alpha = _ridge_loo(x, y, alphas)
        length_coef = _line_fit(x[:, -1] * len_std + len_mean, y)
        return cls(weights, intercept, vocab_size=vocab_size, buckets=buckets, alpha=alpha,
                   len_mean=len_mean, len_std=len_std, max_output_len=int(lens.max()),
                   num_train=len(lens), mean_output_len=float(lens.mean()),
                   length_coef=length_coef)

    def predict(self, prompt_token_ids: Sequence[int]) -> float:
        """Predicted output tokens, in [1, the longest output seen in training]."""
        f = features(prompt_token_ids, self.buckets)
        f[-1] = (f[-1] - self.len_mean) / self.len_std
        return self._to_tokens(self.intercept + float(f @ self.weights))

    def predict_from_length(self, prompt_len: int) -> float:
        """The prompt-length-only reference predictor (a baseline, not for scheduling)."""
        a, b = self.length_coef
        return self._to_tokens(a + b * float(np.log1p(prompt_len)))

    def _to_tokens(self, log1p_len: float) -> float:
        return float(np.clip(np.expm1(log1p_len), 1.0, max(1.0, self.max_output_len)))

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids mean nothing under another tokenizer; refuse instead of mis-ranking."""
        if vocab_size != self.vocab_size:
            raise ValueError(f"length predictor {self.path or '(not saved)'} was trained for a "
                             f"tokenizer with {self.vocab_size} tokens, the model has {vocab_size}")

    def save(self, path: str | Path) -> None:
        """Write an .npz (written whole, then renamed, so a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            np.savez(f, format_version=FORMAT_VERSION, kind="servelm-length-predictor",
                     weights=self.weights, intercept=self.intercept, vocab_size=self.vocab_size,
                     buckets=self.buckets, alpha=self.alpha, len_mean=self.len_mean,
                     len_std=self.len_std, max_output_len=self.max_output_len,
                     num_train=self.num_train, mean_output_len=self.mean_output_len,
                     length_coef=np.asarray(self.length_coef))
        os.replace(tmp, path)
        self.path = str(path)

    @classmethod
    def load(cls, path: str | Path) -> LengthPredictor:
        """Read a file written by `save`; ValueError naming the file if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"length predictor file {str(path)!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                d: dict[str, Any] = {k: z[k] for k in z.files}
        except Exception as e:  # zip, pickle-refused and format errors all mean "not ours"
            raise ValueError(f"{path} is not a servelm length predictor file: {e}") from None
        if str(d.get("kind", "")) != "servelm-length-predictor":
            raise ValueError(f"{path} is not a servelm length predictor file")
        version = int(d.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has length predictor format {version}; this servelm reads "
                             f"format {FORMAT_VERSION} (retrain with `servelm length-predictor train`)")
        try:
            return cls(d["weights"], float(d["intercept"]), vocab_size=int(d["vocab_size"]),
                       buckets=int(d["buckets"]), alpha=float(d["alpha"]),
                       len_mean=float(d["len_mean"]), len_std=float(d["len_std"]),
                       max_output_len=int(d["max_output_len"]), num_train=int(d["num_train"]),
                       mean_output_len=float(d["mean_output_len"]),
                       length_coef=tuple(d["length_coef"]), path=str(path))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is a damaged length predictor file: {e}") from None


def _ridge_loo(x: np.ndarray, y: np.ndarray,
               alphas: Sequence[float]) -> tuple[np.ndarray, float, float]:
    """Ridge with an unpenalized intercept; alpha with the lowest exact leave-one-out MSE.

    With centered X = U S V^T, the hat matrix is 11^T/n + U diag(s^2/(s^2+a)) U^T, so each
    point's LOO residual is r_i / (1 - H_ii) for every alpha from the one SVD.
    """
    x_mean, y_mean = x.mean(axis=0), float(y.mean())
    xc, yc = x - x_mean, y - y_mean
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    uty, s2, u2 = u.T @ yc, s * s, u * u
    best: tuple[float, float] = (np.inf, float(alphas[0]))
    for a in alphas:
        shrink = s2 / (s2 + a)
        resid = yc - u @ (shrink * uty)
        leverage = np.minimum(1.0 / len(y) + u2 @ shrink, 1.0 - 1e-9)
        loo = float(np.mean((resid / (1.0 - leverage)) ** 2))
        if loo < best[0]:
            best = (loo, float(a))
    alpha = best[1]
    weights = vt.T @ (s / (s2 + alpha) * uty)
    return weights, y_mean - float(x_mean @ weights), alpha


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = a + b x (b = 0 when x is constant)."""
    var = float(x.var())
    b = float(((x - x.mean()) * (y - y.mean())).mean() / var) if var > 0 else 0.0
    return float(y.mean()) - b * float(x.mean()), b


def evaluate(predictor: LengthPredictor, prompts: Sequence[Sequence[int]],
             output_lens: Sequence[int], max_tokens: int) -> dict[str, dict[str, Any]]:
    """Held-out accuracy of `predictor` and of the references it is meant to beat.

    Keys: "predictor"; "prompt_length" (regression on prompt length alone); "train_mean"
    (the training mean for everyone); "max_tokens" (the heuristic sjf falls back on: every
    request predicted at `max_tokens`, no information). Each maps to `length_metrics`.
    """
    if len(prompts) != len(output_lens) or not prompts:
        raise ValueError(f"need as many prompts as output lengths (>= 1), "
                         f"got {len(prompts)} and {len(output_lens)}")
    truth = [float(n) for n in output_lens]
    candidates = {
        "predictor": [predictor.predict(p) for p in prompts],
        "prompt_length": [predictor.predict_from_length(len(p)) for p in prompts],
        "train_mean": [predictor.mean_output_len] * len(prompts),
        "max_tokens": [float(max_tokens)] * len(prompts),
    }
    return {name: length_metrics(pred, truth) for name, pred in candidates.items()}
