"""How long one engine step takes, from what the scheduler put in it.

A step's time is modelled as a linear function of features of its batch, fitted by least
squares (each squared error divided by the step's time; coefficients kept >= 0) on steps
timed on the real engine:
- 1 (a fixed cost per step: Python, sampling, launching the kernels);
- prefill tokens (the weights' matmuls over the prompt chunks);
- decoding sequences (a token each: matmuls at batch B, sampling);
- decode context (the K/V each decode reads: memory-bound attention);
- prefill attention (each chunk token against its context: chunk x (start + chunk / 2));
- after idle (the first step after the engine had nothing to do: waking up);
- sqrt(decoding sequences): each decode costs less the more share a batch (the matmuls get
  more efficient with B). Without it a straight line through small and large batches
  underestimates mid-sized ones by 5-8% on this CPU, and queueing amplifies that to 15-25%
  in TPOT at 60-80% load.
On CPU the weights are read once per step, so batching many decodes costs little more than
one: the decode terms are small next to the fixed cost.

For hardware that is not here, roofline.py computes a step's time from FLOPs and bytes
instead; `load_step_model` reads either kind of file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from servelm.simulate.roofline import RooflineStepModel, read_model_file
from servelm.step_io import SchedulerOutput

FEATURES = ("step", "prefill_tokens", "decode_seqs", "decode_context", "prefill_attention",
            "after_idle", "decode_seqs_sqrt")


def step_features(step: SchedulerOutput, after_idle: bool = False) -> list[float]:
    """The features of one scheduled step (a one-token item is a decode); `after_idle`: the
    engine had nothing to do before it (waking up costs: on this machine tens of ms)."""
    prefill = decodes = context = attention = 0.0
    for s in step.scheduled:
        n = s.num_new_tokens - s.num_draft_tokens
        if n <= 1 and s.num_computed_tokens > 0:
            decodes += 1 + s.num_draft_tokens
            context += s.num_computed_tokens + s.num_new_tokens
        else:
            prefill += s.num_new_tokens
            attention += s.num_new_tokens * (s.num_computed_tokens + s.num_new_tokens / 2)
    return [1.0, prefill, decodes, context, attention, float(after_idle), math.sqrt(decodes)]


class StepModel(Protocol):
    """What a simulated replica needs of a step-time model; `source["engine"]` holds the
    engine options the model describes (SimEngineConfig's names)."""

    source: dict[str, Any]

    def seconds(self, step: SchedulerOutput, after_idle: bool = False) -> float: ...


@dataclass
class StepTimeModel:
    """seconds = sum(coef * feature); `source` says what it was fitted on."""

    coefficients: list[float]
    source: dict[str, Any] = field(default_factory=dict)
    fit_error: dict[str, float] = field(default_factory=dict)  # on the profiled steps
    # From a client's send to its request reaching the scheduler (HTTP, tokenizing, and on a
    # busy machine the wait for the server's event loop), less how much before a step's
    # period ends its tokens reach the client: fitted by calibrate_frontend_delay.
    frontend_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if len(self.coefficients) > len(FEATURES):
            raise ValueError(f"{len(self.coefficients)} coefficients for {len(FEATURES)} features")
        self.coefficients = [*self.coefficients, *[0.0] * (len(FEATURES) - len(self.coefficients))]

    def seconds(self, step: SchedulerOutput, after_idle: bool = False) -> float:
        return sum(c * f for c, f in zip(self.coefficients, step_features(step, after_idle)))

    @classmethod
    def fit(cls, features: list[list[float]], seconds: list[float],
            source: dict[str, Any] | None = None) -> StepTimeModel:
        """Least squares with each squared error divided by the step's time, and
        non-negative coefficients: a feature whose coefficient comes out negative is dropped
        and the rest refitted. Served steps run from 15 ms to most of a second, and a long
        step's noise is larger (a sum of more parts, each with its jitter). On plain
        squared error the few longest (a full prefill chunk as an overloaded run starts)
        set the small terms; on relative error the many short ones set the mean, which a
        CPU's long-tailed step times then underestimate (docs/benchmarks.md, the
        emulated-device fidelity check)."""
        x, y = np.asarray(features, dtype=float), np.asarray(seconds, dtype=float)
        if len(y) < len(FEATURES):
            raise ValueError(f"need at least {len(FEATURES)} timed steps to fit, got {len(y)}")
        weight = 1.0 / np.sqrt(np.maximum(y, 1e-9))
        keep = list(range(len(FEATURES)))
        while True:
            coef, *_ = np.linalg.lstsq(x[:, keep] * weight[:, None], y * weight, rcond=None)
            if (coef >= 0).all():
                break
            keep.pop(int(np.argmin(coef)))
        full = [0.0] * len(FEATURES)
        for i, c in zip(keep, coef):
            full[i] = float(c)
        pred = x @ np.asarray(full)
        rel = np.abs(pred - y) / np.maximum(y, 1e-9)
        error = {"mean_abs_rel": float(rel.mean()), "p90_abs_rel": float(np.percentile(rel, 90)),
                 "total_rel": float(abs(pred.sum() - y.sum()) / y.sum())}
        return cls(full, source or {}, error)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": "fitted", "features": FEATURES, **asdict(self)},
                                         indent=1))

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        data = read_model_file(path)
        features, coefficients = tuple(data.get("features", ())), list(data.get("coefficients", ()))
        # FEATURES[:5], [:6]: written before after_idle, decode_seqs_sqrt (they cost 0 there)
        if features not in (FEATURES, FEATURES[:5], FEATURES[:6]) or len(coefficients) != len(features):
            raise ValueError(f"--profile: {path} models the features {data.get('features')}, "
                             f"expected {list(FEATURES)}; profile again")
        return cls(coefficients, data.get("source", {}), data.get("fit_error", {}),
                   float(data.get("frontend_delay_s", 0.0)))


def load_step_model(path: str | Path) -> StepTimeModel | RooflineStepModel:
    """A model file of either kind: "roofline", or fitted (files written before the kind
    field existed have none, and are fitted)."""
    data = read_model_file(path)
    kind = data.get("kind", "fitted")
    if kind == "roofline":
        return RooflineStepModel.from_dict(data, str(path))
    if kind == "fitted":
        return StepTimeModel.load(path)
    raise ValueError(f"--profile: {path} holds a step-time model of kind {kind!r}; "
                     "expected 'fitted' or 'roofline'")
