"""Paged attention against dense causal attention on the same K/V, for a batch mixing
decodes of different lengths, a fresh prefill and a prefill chunk over cached context."""

from __future__ import annotations

import pytest
import torch

from servelm.model.batch import SeqChunk, _split_by_length, build_step_batch
from servelm.ops import cpu_kernels
from servelm.ops.attention import CPUKernelPagedAttention, TorchPagedAttention, attention_context
from servelm.ops.gpu.backend import TritonPagedAttention

H, KV, D, BS = 6, 2, 8, 4


def dense_reference(q, k, v):
    """q: [n, H, D] for the last n positions; k, v: [L, KV, D] for all positions."""
    n, L = q.shape[0], k.shape[0]
    kk = k.repeat_interleave(H // KV, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(H // KV, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ kk.transpose(1, 2) * D**-0.5
    qpos = torch.arange(L - n, L).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(L).unsqueeze(0) > qpos, float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(0, 1)


BACKENDS = [TorchPagedAttention, CPUKernelPagedAttention, TritonPagedAttention]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_matches_dense(backend, dtype):
    if backend is CPUKernelPagedAttention and cpu_kernels.load() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(0)
    # (context already cached, new tokens this step)
    shapes = [(5, 1), (30, 1), (3, 1), (0, 7), (9, 6), (64, 1)]
    num_blocks = 64
    cache = torch.zeros(2, num_blocks * BS, KV, D)
    free = torch.randperm(num_blocks, generator=g).tolist()
    chunks, tables, full_k, full_v = [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BS))]
        k = torch.randn(total, KV, D, generator=g)
        v = torch.randn(total, KV, D, generator=g)
        for p in range(cached):  # what earlier steps wrote
            slot = table[p // BS] * BS + p % BS
            cache[0, slot], cache[1, slot] = k[p], v[p]
        chunks.append(SeqChunk([1] * new, cached))
        tables.append(table)
        full_k.append(k)
        full_v.append(v)
    batch = build_step_batch(chunks, tables, BS, dtype, backend.pads_decodes, backend.pages_prefills)
    q_rows, k_rows, v_rows, expected = [], [], [], []
    for b, i in enumerate(batch.order):
        cached, new = shapes[i]
        q = torch.randn(new, H, D, generator=g)
        q_rows.append(q)
        k_rows.append(full_k[i][cached:])
        v_rows.append(full_v[i][cached:])
        expected.append(dense_reference(q, full_k[i], full_v[i]))
        assert batch.row_start[b] == sum(len(r) for r in q_rows[:-1])
    with attention_context(batch.attn):
        out = backend().forward(torch.cat(q_rows).to(dtype), torch.cat(k_rows).to(dtype),
                                torch.cat(v_rows).to(dtype), cache.to(dtype), batch.attn, D**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), torch.cat(expected), atol=tol, rtol=tol)
    # Padding backends split decode lengths 4..65 into groups; the kernel takes them at once.
    assert (len(batch.attn.decodes) >= 2) == backend.pads_decodes


def test_split_by_length_bounds_padding():
    assert _split_by_length([]) == []
    assert _split_by_length([10, 12, 20, 100, 120]) == [3, 2]
    assert sum(_split_by_length(list(range(1, 500)))) == 499
