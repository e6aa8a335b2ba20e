"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, and the
mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE, whose sparse MLPs are
model/layers/moe.py) in plain PyTorch; where a family departs from Llama, ModelArch says how.

Takes one flat batch of tokens from many requests (no padding, no batch dimension);
attention reads per-step metadata from `ops.attention`. Q/K/V and gate/up projections are
fused into single matmuls at load time, because on CPU each extra op costs real time.

Under tensor parallelism (model/sharding.py) the same code runs on each rank's slice: the
arch it is built with is the rank's (its heads, MLP columns and layers), o_proj and
down_proj end in one all-reduce each, and the embedding and LM head hold a range of the
vocabulary. A pipeline stage holds some layers; `forward` then takes and returns the
residual stream instead of token ids and normalized hidden states.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from servelm.distributed.parallel import SINGLE, ParallelContext
from servelm.model.arch import ModelArch
from servelm.model.layers.moe import SparseMoE
from servelm.model.layers.rope import RotaryEmbedding, apply_rope
from servelm.model.sharding import vocab_range
from servelm.ops.attention import AttentionBackend, AttentionMetadata, current_attention_metadata
from servelm.ops.attention_scores import accumulate_attention
from servelm.ops.fused_decoder import FusedDecoder, LayerWeights, supported
from servelm.ops.kv_quant import QuantizedKV
from servelm.ops.quant import QuantWeight, cat_rows, embedding, linear, linear_add, quantize


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Computed in float32 and cast back, exactly as transformers does it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _decodes_only(meta: AttentionMetadata) -> bool:
    """A step of plain decodes in one group: what the fused decoder runs."""
    return (not meta.prefills and not meta.scored and len(meta.decodes) == 1
            and meta.decodes[0].mask is None)


def _row_parallel(x: torch.Tensor, w: torch.Tensor | QuantWeight, residual: torch.Tensor,
                  parallel: ParallelContext) -> torch.Tensor:
    """residual + x @ w.T where each rank holds some of w's input columns: the partial
    products are summed over the ranks first."""
    if parallel.tp_size == 1:
        return linear_add(x, w, residual)
    return residual + parallel.all_reduce(linear(x, w))


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, parallel: ParallelContext) -> None:
        super().__init__()
        self.parallel = parallel
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = (arch.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.eps = arch.rms_norm_eps
        self.qkv_weight: torch.Tensor
        self.qkv_bias: torch.Tensor | None = None
        self.o_weight: torch.Tensor
        self.q_norm: torch.Tensor | None = None
        self.k_norm: torch.Tensor | None = None
        self.backend = backend
        self.kv_cache: torch.Tensor | QuantizedKV | None = None  # [2, num_slots, KV, D], bound by the runner
        self.scores: torch.Tensor | None = None  # [num_slots, KV]: H2O/SnapKV attention, bound by the runner

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                residual: torch.Tensor | None) -> torch.Tensor:
        """residual + attention(x): a quantized o_proj adds into `residual` in place; with
        no residual, attention(x) alone."""
        t = x.shape[0]
        qkv = linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        meta = current_attention_metadata()
        o = self.backend.forward(q, k, v.contiguous(), self.kv_cache, meta, self.scale)
        if meta.scored and self.scores is not None:
            accumulate_attention(q, self.kv_cache, self.scores, meta, self.scale)
        if residual is None:
            return self.parallel.all_reduce(linear(o.reshape(t, self.q_size), self.o_weight))
        return _row_parallel(o.reshape(t, self.q_size), self.o_weight, residual, self.parallel)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, parallel: ParallelContext) -> None:
        super().__init__()
        self.parallel = parallel
        self.attn = Attention(arch, backend, parallel)
        self.eps = arch.rms_norm_eps
        self.input_norm: torch.Tensor
        self.post_attn_norm: torch.Tensor
        self.gate_up_weight: torch.Tensor
        self.down_weight: torch.Tensor
        self.moe: SparseMoE | None = None  # in place of the two above in a sparse layer
        # Gemma 2 normalizes each block's output before adding it to the residual stream.
        self.attn_out_norm: torch.Tensor | None = None
        self.mlp_out_norm: torch.Tensor | None = None
        self.intermediate = arch.intermediate_size
        self.act = F.silu if arch.hidden_act == "silu" else partial(F.gelu, approximate="tanh")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.attn_out_norm is not None:
            h = self.attn(rms_norm(x, self.input_norm, self.eps), cos, sin, residual=None)
            x = x + rms_norm(h, self.attn_out_norm, self.eps)
            h = self._mlp(rms_norm(x, self.post_attn_norm, self.eps), None)
            return x + rms_norm(h, self.mlp_out_norm, self.eps)
        x = self.attn(rms_norm(x, self.input_norm, self.eps), cos, sin, residual=x)
        return self._mlp(rms_norm(x, self.post_attn_norm, self.eps), x)

    def _mlp(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """residual + MLP(h), or with no residual the MLP's output alone (summed over ranks)."""
        if self.moe is not None:
            out = self.parallel.all_reduce(self.moe.forward(h))
            return out if residual is None else residual + out
        gate, up = linear(h, self.gate_up_weight).split(self.intermediate, dim=-1)
        if residual is None:
            return self.parallel.all_reduce(linear(self.act(gate) * up, self.down_weight))
        return _row_parallel(self.act(gate) * up, self.down_weight, residual, self.parallel)


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, dtype: torch.dtype,
                 max_positions: int, parallel: ParallelContext = SINGLE,
                 device: torch.device | str = "cpu") -> None:
        """`arch`: this rank's part (ModelArch of its heads and layers; Shard.local_arch).
        `device`: where the weights it is given lie."""
        super().__init__()
        self.arch, self.parallel = arch, parallel
        self.vocab = vocab_range(arch.vocab_size, parallel.tp_size, parallel.tp_rank)
        self.layers = nn.ModuleList(DecoderLayer(arch, backend, parallel) for _ in range(arch.num_layers))
        self.dtype, self.device = dtype, torch.device(device)
        self.rope = RotaryEmbedding(arch.rotary_dim or arch.head_dim, max_positions, arch.rope_theta,
                                    arch.rope_scaling, dtype, device)
        self.embed: torch.Tensor
        self.final_norm: torch.Tensor
        self.lm_head: torch.Tensor
        self._fused: FusedDecoder | bool | None = None  # False: not eligible

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                num_layers: int | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden]. `num_layers`
        runs only the first layers (early exit, for layer-skip drafting). A pipeline stage
        after the first starts from the previous stage's `residual`; one before the last
        returns its residual stream un-normalized."""
        x = self.embed_tokens(input_ids) if residual is None else residual
        meta = current_attention_metadata()
        fused = self._fused_decoder(meta.block_size) if _decodes_only(meta) else None
        if fused is not None:
            group = meta.decodes[0]
            x = fused.forward(x, positions, meta.slot_mapping, group.block_index.view(group.num, -1),
                              group.context_lens, num_layers)
        else:
            cos, sin = self.rope.lookup(positions)
            for layer in self.layers[:num_layers]:
                x = layer(x, cos, sin)
        if not self.parallel.is_last_stage:
            return x
        return rms_norm(x, self.final_norm, self.arch.rms_norm_eps)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows (Gemma: times sqrt(hidden), rounded to the dtype as transformers
        does); with the vocabulary split, each rank fills the rows of its ids and leaves
        zeros, and the all-reduce sums them into whole rows."""
        if self.parallel.tp_size == 1:
            x = embedding(ids, self.embed, self.dtype)
        else:
            ours = (ids >= self.vocab.start) & (ids < self.vocab.stop)
            x = embedding((ids - self.vocab.start) * ours, self.embed, self.dtype)
            x = self.parallel.all_reduce(x.masked_fill_(~ours[:, None], 0.0))
        if self.arch.embedding_multiplier != 1.0:
            x = x * torch.tensor(self.arch.embedding_multiplier, dtype=x.dtype)
        return x

    def _fused_decoder(self, block_size: int) -> FusedDecoder | None:
        """The one-call decode step (ops/fused_decoder.py) when this model's weights and cache
        are in the form it runs, built on first use (the runner binds the caches after
        construction); None otherwise."""
        hook = getattr(self.parallel.shm_allreduce, "c_hook", None)
        a = self.arch
        if self._fused is None and (self.device.type != "cpu" or a.num_experts or a.rotary_dim
                                    or a.sandwich_norms or a.query_pre_attn_scalar):
            self._fused = False  # a C kernel of Llama's layers: dense, whole-head RoPE
        if self._fused is None and self.parallel.tp_size > 1 and hook is None:
            self._fused = False  # its all-reduces must be callable from C: the shared-memory one
        if self._fused is None:
            layers = [LayerWeights(a.qkv_weight, a.o_weight, layer.gate_up_weight, layer.down_weight,
                                   layer.input_norm, layer.post_attn_norm, a.qkv_bias, a.q_norm, a.k_norm,
                                   a.kv_cache)
                      for layer in self.layers for a in [layer.attn]]
            arch = self.arch
            self._fused = (FusedDecoder(layers, arch.intermediate_size, arch.num_heads, arch.num_kv_heads,
                                        arch.head_dim, block_size, arch.rms_norm_eps, self.rope.cos,
                                        self.rope.sin, hook if self.parallel.tp_size > 1 else None)
                           if self.dtype == torch.float32
                           and supported(layers, arch.num_heads, arch.num_kv_heads, arch.head_dim)
                           else False)
        return self._fused or None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (each rank's range gathered, on every rank)."""
        logits = linear(hidden, self.lm_head).float()
        if self.parallel.tp_size > 1:
            per = -(-self.arch.vocab_size // self.parallel.tp_size)  # the last range may be short
            logits = F.pad(logits, (0, per - logits.shape[-1]))
            logits = self.parallel.all_gather_columns(logits)[:, : self.arch.vocab_size]
        cap = self.arch.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def quantize(self, method: str, group_size: int) -> None:
        """Quantize every matmul weight and the embedding table (8-bit rows: a lookup
        scales one row). A tied LM head shares the 8-bit table under int4 too, as llama.cpp
        keeps a tied output at 8 bits: a 4-bit LM head costs perplexity out of proportion."""
        for layer in self.layers:
            a = layer.attn
            a.qkv_weight = quantize(a.qkv_weight, method, group_size, self.dtype)
            a.o_weight = quantize(a.o_weight, method, group_size, self.dtype)
            if layer.moe is not None:
                layer.moe.quantize(method, group_size, self.dtype)
                continue
            layer.gate_up_weight = quantize(layer.gate_up_weight, method, group_size, self.dtype)
            layer.down_weight = quantize(layer.down_weight, method, group_size, self.dtype)
        tied = self.lm_head is not None and self.lm_head is self.embed
        if self.embed is not None:
            self.embed = quantize(self.embed, "int8", group_size, self.dtype)
        if self.lm_head is not None:
            self.lm_head = self.embed if tied else quantize(self.lm_head, method, group_size, self.dtype)

    def weight_bytes(self) -> int:
        """Bytes of every weight the model holds (a tied LM head counted once)."""
        seen: set[int] = set()
        total = 0
        for w in [self.embed, self.final_norm, self.lm_head, *self._layer_weights()]:
            if w is None or id(w) in seen:
                continue
            seen.add(id(w))
            total += w.nbytes
        return total

    def decode_weight_bytes(self) -> int:
        """Bytes one decode step reads in full: every weight but the embedding table, of
        which a step gathers only its tokens' rows (a tied LM head still reads all of it)."""
        skipped = self.embed is not None and self.lm_head is not self.embed
        return self.weight_bytes() - (self.embed.nbytes if skipped else 0)

    def _layer_weights(self) -> list[torch.Tensor | QuantWeight | None]:
        out: list[torch.Tensor | QuantWeight | None] = []
        for layer in self.layers:
            a = layer.attn
            out += [a.qkv_weight, a.qkv_bias, a.o_weight, a.q_norm, a.k_norm, layer.input_norm,
                    layer.post_attn_norm, layer.attn_out_norm, layer.mlp_out_norm]
            out += layer.moe.weights() if layer.moe is not None else [layer.gate_up_weight, layer.down_weight]
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors, fusing q/k/v and gate/up. Consumes `weights`. A pipeline
        stage has the embedding (first; last when tied), final norm and LM head (last) only
        where it runs them."""
        w = weights
        off = self.arch.norm_weight_offset  # Gemma stores norm weights as w - 1

        def norm(name: str) -> torch.Tensor:
            return w.pop(name) + off if off else w.pop(name)

        self.embed = w.pop("model.embed_tokens.weight", None)
        self.final_norm = norm("model.norm.weight") if "model.norm.weight" in w else None
        self.lm_head = self.embed if self.arch.tie_word_embeddings else w.pop("lm_head.weight", None)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a = layer.attn
            a.qkv_weight = cat_rows([w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"], self.dtype)
            if self.arch.qkv_bias:
                a.qkv_bias = torch.cat([w.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            a.o_weight = w.pop(p + "self_attn.o_proj.weight")
            if self.arch.qk_norm:
                a.q_norm = w.pop(p + "self_attn.q_norm.weight")
                a.k_norm = w.pop(p + "self_attn.k_norm.weight")
            layer.input_norm = norm(p + "input_layernorm.weight")
            if self.arch.sandwich_norms:  # Gemma's post_attention norm is on the attention's output
                layer.attn_out_norm = norm(p + "post_attention_layernorm.weight")
                layer.post_attn_norm = norm(p + "pre_feedforward_layernorm.weight")
                layer.mlp_out_norm = norm(p + "post_feedforward_layernorm.weight")
            else:
                layer.post_attn_norm = norm(p + "post_attention_layernorm.weight")
            if self.arch.is_moe_layer(i):
                layer.moe = SparseMoE(self.arch, w, p + "mlp.", self.dtype)
                continue
            layer.gate_up_weight = cat_rows([w.pop(p + "mlp.gate_proj.weight"),
                                             w.pop(p + "mlp.up_proj.weight")], self.dtype)
            layer.down_weight = w.pop(p + "mlp.down_proj.weight")
