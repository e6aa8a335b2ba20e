"""An EAGLE-style draft (Li et al., 2024): one decoder layer that reads the target's features.

Slot p of the draft pairs the target's final hidden state h_p (the one that produced token
x_{p+1}) with the embedding of x_{p+1}: `fc` mixes the two, one Llama decoder layer of its
own (attention over the earlier slots, RoPE at position p) turns them into a guess of
h_{p+1}, and the target's LM head on that guess scores x_{p+2}. Drafting k tokens feeds
each guess back as the next slot's feature, with the token just drafted; unlike a Medusa
head, every draft sees the path drafted before it.

The LM head is the target's, frozen, restricted to a draft vocabulary (the tokens the
target used most in training, as in EAGLE-3 and FR-Spec): at this model size the full
vocabulary's head costs more than the layer. Drafts outside it are never proposed, which
costs acceptance, not correctness.

Stored as a folder: `eagle_config.json` and `draft.safetensors` (the layer, `fc` and the
draft vocabulary's target ids); `servelm train-draft --method eagle` makes one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from servelm.model.layers.rope import RotaryEmbedding, apply_rope
from servelm.ops.quant import QuantWeight, linear, quantize

CONFIG_FILE, WEIGHTS_FILE = "eagle_config.json", "draft.safetensors"
LINEARS = ("fc", "qkv", "o", "gate_up", "down")
SHAPE_KEYS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class EagleDraft(nn.Module):
    """`fc` and one Llama decoder layer; `vocab` holds the draft vocabulary's target ids."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, vocab: torch.Tensor, rope_theta: float = 10000.0,
                 rms_norm_eps: float = 1e-5, max_positions: int = 8192) -> None:
        super().__init__()
        self.shape = dict(zip(SHAPE_KEYS, (hidden_size, num_heads, num_kv_heads, head_dim,
                                           intermediate_size)))
        self.rope_theta, self.eps = rope_theta, rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(hidden_size))
        self.qkv = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=False)
        self.o = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(hidden_size))
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.register_buffer("vocab", vocab.to(torch.int64))
        self.blocks: dict[str, QuantWeight] = {}  # inference copies (quantize_blocks)
        self.rope = RotaryEmbedding(head_dim, max_positions, rope_theta, None, torch.float32)
        for layer in (self.qkv, self.o, self.gate_up, self.down):
            nn.init.normal_(layer.weight, std=0.02)
        with torch.no_grad():  # start as "the feature passes through": the guess is h_p itself
            self.fc.weight.zero_()
            self.fc.weight[:, hidden_size:].copy_(torch.eye(hidden_size))

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, positions: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Slots [..., T, hidden] at `positions` [T] -> (guesses of the next features, this
        call's keys and values [..., T, kv heads, head dim]). Queries see `past` keys and
        values (all of them) and their own causally, unless `mask` [T, past + T] says
        otherwise (True: attend)."""
        x = self._linear("fc", torch.cat([emb, feat], dim=-1))
        lead = x.shape[:-1]
        qkv = self._linear("qkv", _rms(x, self.attn_norm, self.eps))
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
        cos, sin = self.rope.lookup(positions.to(self.rope.cos.device))
        q = apply_rope(q.unflatten(-1, (h, d)), cos, sin)
        k = apply_rope(k.unflatten(-1, (kv, d)), cos, sin)
        v = v.unflatten(-1, (kv, d))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], -3), torch.cat([past[1], v], -3))
        if mask is None:
            t, total = q.shape[-3], keys.shape[-3]
            mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(total - t)
        att = F.scaled_dot_product_attention(q.transpose(-3, -2), keys.transpose(-3, -2),
                                             values.transpose(-3, -2), attn_mask=mask, enable_gqa=True)
        x = x + self._linear("o", att.transpose(-3, -2).reshape(*lead, h * d))
        gate, up = self._linear("gate_up", _rms(x, self.mlp_norm, self.eps)).chunk(2, dim=-1)
        return x + self._linear("down", F.silu(gate) * up), (k, v)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.blocks.get(name)
        return getattr(self, name)(x) if w is None else linear(x, w)

    def quantize_blocks(self) -> None:
        """Run the matmuls on 8-bit blocks (ops/quant.py) from now on: drafting one token
        at a time reads every weight per token, and four bytes a weight would cost a large
        part of a target step."""
        self.blocks = {name: quantize(getattr(self, name).weight.detach(), "int8", 32, torch.float32)
                       for name in LINEARS}


def save_eagle(draft: EagleDraft, folder: str | Path, info: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in draft.state_dict().items()},
              str(folder / WEIGHTS_FILE))
    config = {"method": "eagle", **draft.shape, "draft_vocab_size": len(draft.vocab),
              "rope_theta": draft.rope_theta, "rms_norm_eps": draft.eps, **info}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_eagle(folder: str | Path, target_shape: dict[str, int], vocab_size: int,
               max_positions: int) -> EagleDraft:
    """The draft in `folder` (on the CPU), checked against the target's shapes (`SHAPE_KEYS`)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"speculative_config.model {str(folder)!r} has no {CONFIG_FILE}: train "
                         "a draft with `servelm train-draft --method eagle --output DIR`")
    config = json.loads((folder / CONFIG_FILE).read_text())
    for key in SHAPE_KEYS:
        if config.get(key) != target_shape[key]:
            raise ValueError(f"speculative_config.model {str(folder)!r} is an EAGLE draft for "
                             f"{key} {config.get(key)}, the target's is {target_shape[key]}")
    weights = load_file(str(folder / WEIGHTS_FILE))
    if int(weights["vocab"].max()) >= vocab_size:
        raise ValueError(f"speculative_config.model {str(folder)!r} drafts token ids beyond the "
                         f"target's vocabulary of {vocab_size}")
    draft = EagleDraft(*(config[k] for k in SHAPE_KEYS), weights["vocab"], config["rope_theta"],
                       config["rms_norm_eps"], max_positions)
    draft.load_state_dict(weights)
    return draft.eval().requires_grad_(False)


def target_lm_head(model: Any) -> torch.Tensor:
    """The target's LM head as a float [hidden, vocab] matrix, whatever its storage
    (quantized blocks included): the logits of the identity's rows."""
    if model.arch.final_logit_softcap is not None:
        raise ValueError("EAGLE and Medusa drafts need a linear LM head; this model caps its logits")
    with torch.inference_mode():
        eye = torch.eye(model.arch.hidden_size, dtype=model.dtype, device=model.device)
        logits = model.compute_logits(eye).float().cpu()
    return logits.clone()  # a plain tensor again: training differentiates through it
