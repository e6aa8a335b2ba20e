"""Rotary position embeddings with the scaling variants HF configs use (default, linear,
llama3, and Phi-3's longrope), over all of each head or its leading `rotary_dim` dims."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                  max_positions: int = 0) -> torch.Tensor:
    """Inverse frequencies of `head_dim` rotated dims; `max_positions` (the context served)
    picks LongRoPE's long factors when it passes the trained context."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "longrope":
        long = max_positions > scaling["original_max_position_embeddings"]
        return inv_freq / torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, factor, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """LongRoPE scales cos and sin by sqrt(1 + ln(s) / ln(trained context)), s the context
    extension the config declares (or its `attention_factor`); 1 for everything else."""
    if not scaling or scaling["rope_type"] != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    s = scaling.get("factor") or scaling["max_position_embeddings"] / original
    return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(original))


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding:
    """Precomputed cos/sin table; `lookup(positions)` once per step, `apply` per layer."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.head_dim, self.theta, self.scaling, self.dtype, self.device = head_dim, theta, scaling, dtype, device
        self._build(max_positions)

    def _build(self, max_positions: int) -> None:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, max_positions)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = attention_factor(self.scaling)
        self.cos = (emb.cos() * scale).to(self.device, self.dtype)
        self.sin = (emb.sin() * scale).to(self.device, self.dtype)

    def truncate(self, max_positions: int) -> None:
        """Keep the first `max_positions` rows only (the context the KV cache can hold).
        LongRoPE's factors depend on that context, so its tables are made again."""
        if self.scaling and self.scaling["rope_type"] == "longrope":
            self._build(max_positions)
        else:
            self.cos, self.sin = self.cos[:max_positions].clone(), self.sin[:max_positions].clone()

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for each token, shaped [T, 1, D] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation (rotate halves), the layout of HF checkpoints. x: [T, H, D]; a
    partial rotation (cos narrower than D) turns the leading dims and passes the rest."""
    if cos.shape[-1] < x.shape[-1]:
        rot = cos.shape[-1]
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
