"""`speculative_config`: which proposer drafts tokens and how many per step.

Accepted as a dict (offline API) or JSON (`--speculative-config`), with vLLM's key names.
Unknown methods and keys are errors that name the key, so a typo never silently turns
speculation off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram",)
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
         "disable_by_batch_size"}
DEFAULT_DISABLE_BY_BATCH_SIZE = 8


@dataclass(frozen=True)
class SpecConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: shortest suffix n-gram to look up
    prompt_lookup_max: int = 4  # ngram: longest, tried first
    # No drafts while more requests than this are decoding: a big batch is compute-bound,
    # and verifying drafts that get rejected only adds work to it.
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE

    @classmethod
    def parse(cls, value: dict[str, Any] | str | None) -> SpecConfig | None:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        unknown = set(value) - _KEYS
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; "
                             f"allowed {sorted(_KEYS)}")
        method = value.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {method!r}")
        cfg = cls(method, *(value.get(k, d) for k, d in (
            ("num_speculative_tokens", None), ("prompt_lookup_min", 1), ("prompt_lookup_max", 4),
            ("disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE))))
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                     "disable_by_batch_size"):
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {v!r}")
        if cfg.prompt_lookup_min > cfg.prompt_lookup_max:
            raise ValueError("speculative_config.prompt_lookup_min must be <= prompt_lookup_max, "
                             f"got {cfg.prompt_lookup_min} > {cfg.prompt_lookup_max}")
        return cfg
