"""The sparse MoE layer's sort-and-scatter grouping against the plainest reading of the
model: every token on its own, through each of its top-k experts one at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures_models import small_arch

from servelm.model.layers.moe import SparseMoE, mlp_weight_shapes
from servelm.ops.quant import BlockQ8


def _weights(arch, gen):
    return {name: 0.3 * torch.randn(shape, generator=gen)
            for name, shape in mlp_weight_shapes(arch, 0).items()}


def _per_token(x, w, arch):
    p = "model.layers.0.mlp."
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = F.linear(x[t], w[p + "gate.weight"]).softmax(-1)
        top, chosen = probs.topk(arch.num_experts_per_tok)
        if arch.norm_topk_prob:
            top = top / top.sum()
        for weight, e in zip(top, chosen.tolist()):
            q = f"{p}experts.{e}."
            h = F.silu(F.linear(x[t], w[q + "gate_proj.weight"])) * F.linear(x[t], w[q + "up_proj.weight"])
            out[t] += weight * F.linear(h, w[q + "down_proj.weight"])
        if arch.shared_expert_intermediate_size:
            q = p + "shared_expert."
            h = F.silu(F.linear(x[t], w[q + "gate_proj.weight"])) * F.linear(x[t], w[q + "up_proj.weight"])
            gate = torch.sigmoid(F.linear(x[t], w[p + "shared_expert_gate.weight"]))
            out[t] += gate * F.linear(h, w[q + "down_proj.weight"])
    return out


@pytest.mark.parametrize("moe", [
    dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
         shared_expert_intermediate_size=64),
    dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32),  # some experts idle
])
def test_grouped_experts_match_a_per_token_loop(moe):
    arch = small_arch(hidden_size=32, **moe)
    gen = torch.Generator().manual_seed(0)
    w = _weights(arch, gen)
    x = torch.randn(13, 32, generator=gen)
    want = _per_token(x, w, arch)
    layer = SparseMoE(arch, dict(w), "model.layers.0.mlp.", torch.float32)
    assert layer.gate_up.shape == (arch.num_experts, 2 * arch.moe_intermediate_size, 32)  # stacked
    torch.testing.assert_close(layer.forward(x), want, rtol=1e-5, atol=1e-5)
    layer.quantize("int8", 32, torch.float32)  # one block weight per expert, close to float
    assert all(isinstance(g, BlockQ8) for g in [*layer.gate_up, *layer.down, *(layer.shared or ())])
    error = (layer.forward(x) - want).norm() / want.norm()
    assert error < 0.02, error  # int8 weights (and, in the C kernel, int8 activations)


def test_router_picks_from_every_expert_and_takes_every_weight():
    arch = small_arch(hidden_size=16, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=8)
    w = _weights(arch, torch.Generator().manual_seed(1))
    layer = SparseMoE(arch, w, "model.layers.0.mlp.", torch.float32)
    assert not w  # every MoE tensor was taken
    assert layer.forward(torch.zeros(0, 16)).shape == (0, 16)  # an empty batch


def test_expert_parallel_parts_sum_to_the_whole():
    """Two ranks holding two whole experts each: their partial outputs add up to the layer's."""
    from servelm.model.sharding import Shard

    arch = small_arch(hidden_size=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=0)
    w = _weights(arch, torch.Generator().manual_seed(2))
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(3))
    whole = SparseMoE(arch, dict(w), "model.layers.0.mlp.", torch.float32).forward(x)
    parts = []
    for rank in range(2):
        shard = Shard(2, rank, expert_parallel=True)
        mine = {shard.select(n, arch)[0]: t for n, t in w.items() if shard.select(n, arch) is not None}
        local = shard.local_arch(arch)
        assert local.held_experts == (2 * rank, 2 * rank + 1)
        parts.append(SparseMoE(local, mine, "model.layers.0.mlp.", torch.float32).forward(x))
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5)
