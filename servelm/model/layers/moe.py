"""The sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every expert for each token; the token runs through its top k experts and
their outputs are summed, weighted by the router's softmax probabilities (renormalized over
the k where the model says so). Qwen2-MoE adds a shared expert that every token runs,
scaled by a sigmoid gate.

Tokens are grouped by expert rather than looped over: the (token, expert) assignments are
sorted by expert, the tokens gathered in that order, each expert that got any multiplies
its contiguous run in one matmul pair, and the results are scattered back with one
`index_add_`. The only Python loop is over experts that received tokens. Expert weights
are stacked ([experts, out, in]) as loaded; quantized, they become one block weight per
expert (ops/quant.py), so int8/int4 and GGUF blocks stay blocks.

Under tensor parallelism every expert's intermediate columns are split across the ranks,
like a dense MLP's; or, with expert parallelism, each rank holds some experts whole and
runs only the tokens routed to them. Either way every rank has every token (activations are
replicated under TP) and routes them alike, so dispatching needs no communication; the
layer's output is a partial sum, which the decoder layer all-reduces once to combine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from servelm.model.arch import ModelArch
from servelm.ops.quant import QuantWeight, cat_rows, linear, quantize

Weight = torch.Tensor | QuantWeight


def mlp_weight_shapes(arch: ModelArch, i: int) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of layer i's MLP: dense, or router, experts and shared expert."""
    p, h = f"model.layers.{i}.mlp.", arch.hidden_size

    def mlp(prefix: str, inner: int) -> dict[str, tuple[int, ...]]:
        return {prefix + "gate_proj.weight": (inner, h), prefix + "up_proj.weight": (inner, h),
                prefix + "down_proj.weight": (h, inner)}

    if not arch.is_moe_layer(i):
        return mlp(p, arch.intermediate_size)
    shapes = {p + "gate.weight": (arch.num_experts, h)}
    for e in range(arch.num_experts):
        shapes |= mlp(f"{p}experts.{e}.", arch.moe_intermediate_size)
    if arch.shared_expert_intermediate_size:
        shapes |= mlp(p + "shared_expert.", arch.shared_expert_intermediate_size)
        shapes[p + "shared_expert_gate.weight"] = (1, h)
    return shapes


def _float(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """A router or gate in float, as llama.cpp keeps it: a rounding there changes which
    experts run."""
    return w if isinstance(w, torch.Tensor) else w.dequantize(dtype)


def _gated(x: torch.Tensor, gate_up: Weight, down: Weight) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


class SparseMoE:
    def __init__(self, arch: ModelArch, weights: dict[str, torch.Tensor], prefix: str,
                 dtype: torch.dtype) -> None:
        """Take layer `prefix`'s MoE tensors (HF names) out of `weights`."""
        w = weights
        self.top_k, self.renormalize = arch.num_experts_per_tok, arch.norm_topk_prob
        self.num_experts = arch.num_experts
        held = arch.held_experts or tuple(range(arch.num_experts))  # a contiguous range
        self.first_expert = held[0]
        self.router = _float(w.pop(prefix + "gate.weight"), dtype)

        def pair(p: str) -> tuple[Weight, Weight]:
            gate_up = cat_rows([w.pop(p + "gate_proj.weight"), w.pop(p + "up_proj.weight")], dtype)
            return gate_up, w.pop(p + "down_proj.weight")

        experts = [pair(f"{prefix}experts.{e}.") for e in held]
        if all(isinstance(g, torch.Tensor) for g, _ in experts):
            self.gate_up: torch.Tensor | list[Weight] = torch.stack([g for g, _ in experts])
            self.down: torch.Tensor | list[Weight] = torch.stack([d for _, d in experts])
        else:  # GGUF blocks: one block weight per expert
            self.gate_up, self.down = [g for g, _ in experts], [d for _, d in experts]
        self.shared: tuple[Weight, Weight] | None = None
        self.shared_gate: torch.Tensor | None = None
        if arch.shared_expert_intermediate_size:
            self.shared = pair(prefix + "shared_expert.")
            self.shared_gate = _float(w.pop(prefix + "shared_expert_gate.weight"), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> the MoE output [T, hidden] (this rank's part under TP)."""
        probs = F.linear(x, self.router).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)  # assignments grouped by expert
        tokens = order // self.top_k
        grouped = x.index_select(0, tokens)
        held = len(self.gate_up) < self.num_experts  # expert parallelism: others' rows stay 0
        out = torch.zeros_like(grouped) if held else torch.empty_like(grouped)
        start = 0
        for e, n in enumerate(torch.bincount(flat, minlength=self.num_experts).tolist()):
            local = e - self.first_expert
            if n and 0 <= local < len(self.gate_up):
                out[start:start + n] = _gated(grouped[start:start + n], self.gate_up[local], self.down[local])
            start += n
        out.mul_(weights.flatten()[order].to(x.dtype).unsqueeze(1))
        y = torch.zeros_like(x).index_add_(0, tokens, out)
        if self.shared is not None:
            y += torch.sigmoid(F.linear(x, self.shared_gate)) * _gated(x, *self.shared)
        return y

    def quantize(self, method: str, group_size: int, dtype: torch.dtype) -> None:
        """Every expert's matmuls (and the shared expert's) as `method` blocks; the router
        stays in float, since a rounding there changes which experts run."""
        self.gate_up = [quantize(g, method, group_size, dtype) for g in self.gate_up]
        self.down = [quantize(d, method, group_size, dtype) for d in self.down]
        if self.shared is not None:
            self.shared = tuple(quantize(s, method, group_size, dtype) for s in self.shared)

    def weights(self) -> list[Weight | None]:
        return [self.router, self.shared_gate, *(self.shared or ()),
                *([self.gate_up, self.down] if isinstance(self.gate_up, torch.Tensor)
                  else [*self.gate_up, *self.down])]
