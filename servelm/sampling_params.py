"""Per-request sampling settings, with vLLM/OpenAI-compatible names and defaults.

Validation happens once, in ``__post_init__``, so the scheduler and the sampler can trust
every field without re-checking it in the hot path. Every problem raises ``ValueError``
whose message names the field, so an HTTP layer can turn it into a 400 response as is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Temperatures below this are treated as greedy (argmax) decoding.
GREEDY_EPS = 1e-5
# The OpenAI API caps temperature at 2; higher values only produce noise, so we refuse them
# (vLLM accepts any finite value >= 0, which is a deliberate difference).
MAX_TEMPERATURE = 2.0
MAX_N = 128
MAX_LOGPROBS = 20
MAX_SPECULATIVE_TOKENS = 64
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_GRAMMAR_CHARS = 100_000  # a schema, regex, grammar or the choices together
MAX_CHOICES = 1024
MAX_LOGIT_BIAS = 1024  # entries (OpenAI documents up to 300)
MAX_STOP_STRINGS = 256  # OpenAI allows 4; every one is matched against each step's text
MAX_STOP_STRING_CHARS = 1024
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MAX = 2**31 - 1


def _as_int(name: str, value: Any) -> int:
    """Accept real ints only: bools and floats are almost always client bugs."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    """Accept ints and floats (not bools, not strings); refuse NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a boolean, got {value!r}")
    return value


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {left}{lo:g}, {hi:g}], got {value!r}")


def _optional_count(name: str, value: Any, hi: int) -> int | None:
    if value is None:
        return None
    value = _as_int(name, value)
    _check_range(name, value, 0, hi)
    return value


def _check_logit_bias(bias: Any) -> dict[int, float] | None:
    """{token id: bias}: ids as ints or their decimal strings (JSON object keys), biases in
    [-100, 100] as OpenAI allows; empty is None."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be an object mapping token ids to numbers, got {bias!r:.100}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(bias)} entries; the limit is {MAX_LOGIT_BIAS}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r:.50}")
        value = _as_float(f"logit_bias[{token}]", value)
        _check_range(f"logit_bias[{token}]", value, -100.0, 100.0)
        out[token] = value
    return out or None


def _check_structured(spec: Any) -> dict[str, Any] | None:
    """One kind of constraint, of the right type, within the size limits."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in STRUCTURED_KINDS:
        raise ValueError(f"structured_outputs must be an object with exactly one of the keys "
                         f"{list(STRUCTURED_KINDS)}, got {spec!r:.200}")
    (kind, value), = spec.items()
    name = f"structured_outputs.{kind}"
    if kind == "json_object" and value is not True:
        raise ValueError(f"{name} must be true, got {value!r:.100}")
    if kind == "json" and not isinstance(value, (dict, str)):
        raise ValueError(f"{name} must be a JSON schema (an object, or its JSON text), got {value!r:.100}")
    if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string, got {value!r:.100}")
    if kind == "choice":
        if (not isinstance(value, list) or not value or len(value) > MAX_CHOICES
                or not all(isinstance(c, str) and c for c in value)):
            raise ValueError(f"{name} must be a list of 1 to {MAX_CHOICES} non-empty strings")
    size = len(value if isinstance(value, str) else repr(value))
    if size > MAX_GRAMMAR_CHARS:
        raise ValueError(f"{name} is {size} characters; the limit is {MAX_GRAMMAR_CHARS}")
    return dict(spec)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one request (all ``n`` children share it)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, normalized to 0) disables top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: generate up to the context limit
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs to return besides the sampled token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    num_speculative_tokens: int | None = None  # draft tokens per step (0: opt out; None: engine's)
    # Constrain the output (engine/structured.py): one of {"json": schema (dict or JSON
    # text)}, {"json_object": True}, {"regex": str}, {"choice": [str, ...]}, {"grammar": EBNF}.
    structured_outputs: dict[str, Any] | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def __post_init__(self) -> None:
        self.n = _as_int("n", self.n)
        _check_range("n", self.n, 1, MAX_N)

        self.temperature = _as_float("temperature", self.temperature)
        _check_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        self.top_p = _as_float("top_p", self.top_p)
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k == -1:
            self.top_k = 0
        if not 0 <= self.top_k <= _INT32_MAX:  # larger than the vocabulary means "all of it"
            raise ValueError(f"top_k must be 0 or -1 (disabled) or in [1, 2**31 - 1], got {self.top_k}")
        self.min_p = _as_float("min_p", self.min_p)
        _check_range("min_p", self.min_p, 0.0, 1.0)

        self.presence_penalty = _as_float("presence_penalty", self.presence_penalty)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _as_float("frequency_penalty", self.frequency_penalty)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 2.0, lo_open=True)

        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
            if not _INT64_MIN <= self.seed <= _INT64_MAX:
                raise ValueError(f"seed must be in [-2**63, 2**63 - 1], got {self.seed}")

        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _as_bool("ignore_eos", self.ignore_eos)

        if self.max_tokens is not None:
            self.max_tokens = _as_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        self.min_tokens = _as_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

        self.logprobs = _optional_count("logprobs", self.logprobs, MAX_LOGPROBS)
        self.prompt_logprobs = _optional_count(
            "prompt_logprobs", self.prompt_logprobs, MAX_LOGPROBS
        )
        self.num_speculative_tokens = _optional_count(
            "num_speculative_tokens", self.num_speculative_tokens, MAX_SPECULATIVE_TOKENS)
        self.structured_outputs = _check_structured(self.structured_outputs)
        self.logit_bias = _check_logit_bias(self.logit_bias)
        self.skip_special_tokens = _as_bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _as_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )

    @staticmethod
    def _normalize_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r:.100}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only strings, got {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings may have at most {MAX_STOP_STRING_CHARS} characters, "
                                 f"got one of {len(s)}")
        return list(stop)

    @staticmethod
    def _normalize_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {ids!r}")
        out = [_as_int("stop_token_ids", i) for i in ids]
        for i in out:
            if i < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {i}")
        return out

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax; top-k/top-p/min-p and seeds are then irrelevant."""
        return self.temperature < GREEDY_EPS

    def clone(self, **changes: Any) -> SamplingParams:
        """Copy with some fields changed; the copy is validated again and owns its lists."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["stop"] = list(self.stop or [])
        fields["stop_token_ids"] = list(self.stop_token_ids or [])
        fields.update(changes)
        return SamplingParams(**fields)
