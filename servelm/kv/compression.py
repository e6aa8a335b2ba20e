"""KV compression for long contexts: each request keeps at most `budget` tokens of K/V.

When a request's cache grows past its budget, a policy picks, for every layer and KV head
independently, which cached tokens stay; the worker compacts them to the front of the
request's blocks (in their original order) and the blocks past the budget go back to the
pool. Keys are stored after RoPE, so a kept token keeps its original position; new tokens
get their true positions, and attention needs no positions for the cache at all. That is
also why each head may keep different tokens.

- streamingllm (Xiao et al., 2023): the first `sink_tokens` ("attention sinks") and the
  most recent tokens. Compresses after every step that passes the budget.
- h2o (Zhang et al., 2023): the `recent_tokens` most recent and, among the rest, the
  "heavy hitters" with the largest attention accumulated over every query so far (summed
  over the query heads sharing a KV head). Compresses after every step that passes it.
- snapkv (Li et al., 2024): once, when the prompt is complete: the last `window` prompt
  tokens (the observation window) and the tokens they attend to most, the window's
  attention max-pooled over `pool_kernel` neighbours so a kept token brings its context.
  Generated tokens are not compressed.

Enabling compression never changes a request that stays within its budget. It turns the
prefix cache off: a compacted block no longer holds the tokens its hash names. Preemption
by swap keeps a compressed request exact; preemption by recompute prefills its generated
tokens in chunks and compresses per chunk, so it may continue differently.

This module decides when and what to score; which tokens stay is picked from the scores
by worker/kv_selection.py, where the tensors live.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from servelm.dict_option import parse_dict_option

METHODS = ("streamingllm", "h2o", "snapkv")


@dataclass(frozen=True)
class CompressionConfig:
    method: str
    budget: int  # tokens of K/V each request keeps per layer and KV head
    sink_tokens: int = 4  # streamingllm
    recent_tokens: int | None = None  # h2o; default budget // 2
    window: int = 32  # snapkv: observation window at the end of the prompt
    pool_kernel: int = 7  # snapkv: odd

    @classmethod
    def parse(cls, value: dict | str | None) -> CompressionConfig | None:
        """From `kv_compression` (a dict, or its JSON); None when off. Errors name the key."""
        value = parse_dict_option("kv_compression", value, {f.name for f in fields(cls)})
        if value is None:
            return None
        if value.get("method") not in METHODS:
            raise ValueError(f"kv_compression.method must be one of {METHODS}, got {value.get('method')!r}")
        for key in ("budget", "sink_tokens", "recent_tokens", "window", "pool_kernel"):
            v = value.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"kv_compression.{key} must be an integer >= 1, got {v!r}")
        if "budget" not in value:
            raise ValueError("kv_compression.budget (tokens kept per request) is required")
        cfg = cls(**value)
        keep_always = {"streamingllm": cfg.sink_tokens, "h2o": cfg.recent, "snapkv": cfg.window}
        if keep_always[cfg.method] >= cfg.budget:
            name = {"streamingllm": "sink_tokens", "h2o": "recent_tokens", "snapkv": "window"}[cfg.method]
            raise ValueError(f"kv_compression.{name} ({keep_always[cfg.method]}) must be below "
                             f"the budget ({cfg.budget})")
        if cfg.pool_kernel % 2 == 0:
            raise ValueError(f"kv_compression.pool_kernel must be odd, got {cfg.pool_kernel}")
        return cfg

    @property
    def recent(self) -> int:
        return self.recent_tokens if self.recent_tokens is not None else self.budget // 2

    @property
    def needs_scores(self) -> bool:
        return self.method != "streamingllm"

    def scored_rows(self, first: int, num: int, prompt_len: int) -> tuple[int, int] | None:
        """Of a chunk of `num` tokens from position `first`, the (offset, count) whose
        attention is accumulated: all of them for h2o, the observation window for snapkv."""
        if self.method == "h2o":
            return 0, num
        if self.method == "snapkv":
            lo, hi = max(first, prompt_len - self.window), min(first + num, prompt_len)
            return (lo - first, hi - lo) if hi > lo else None
        return None

    def due(self, kv_len: int, computed_before: int, computed_after: int, prompt_len: int) -> bool:
        """Whether a request holding `kv_len` tokens after a step that computed tokens
        [computed_before, computed_after) is compressed now."""
        if kv_len <= self.budget:
            return False
        if self.method == "snapkv":  # once, right after the prompt's last token
            return computed_before < prompt_len <= computed_after
        return True
