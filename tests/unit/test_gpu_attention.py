"""The Triton paged-attention kernels against attention computed directly in torch, on tiny
shapes with odd block counts and lengths, GQA, and 16-bit and 8-bit caches. Without a GPU
they run in Triton's interpreter on the CPU (tests/conftest.py turns it on)."""

import pytest
import torch

from servelm.ops.gpu import paged_attention
from servelm.ops.kv_quant import dequantize_kv, quantize_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(num_blocks, block_size, num_kv, head_dim, kv_dtype, gen):
    """K and V caches filled with random values: (stored k, v, k scales, v scales, and the
    float32 values a reader must see)."""
    k, v = (torch.randn(num_blocks * block_size, num_kv, head_dim, generator=gen) for _ in range(2))
    if kv_dtype in (torch.int8, torch.float8_e4m3fn):
        (kq, ks), (vq, vs) = quantize_kv(k, kv_dtype), quantize_kv(v, kv_dtype)
        seen = dequantize_kv(kq, ks, torch.float32), dequantize_kv(vq, vs, torch.float32)
        return kq, vq, ks, vs, seen
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    return k, v, None, None, (k.float(), v.float())


def _tables(lengths, block_size, num_blocks, gen):
    """Disjoint, shuffled block tables, padded with zeros to the longest."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    need = [-(-n // block_size) for n in lengths]
    table = torch.zeros(len(lengths), max(need), dtype=torch.long)
    for row, n in enumerate(need):
        table[row, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    return table


def _reference(q, seen_k, seen_v, table, block_size, positions, ctx, scale, softcap=0.0):
    """Rows of q attending to context positions 0..positions[i] of one sequence (scores
    soft-capped when `softcap`)."""
    pos = torch.arange(ctx)
    slots = table[pos // block_size] * block_size + pos % block_size
    k, v = seen_k[slots], seen_v[slots]  # [ctx, KV, D]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("thd,chd->htc", q.float(), k) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(pos[None, None, :] > torch.tensor(positions)[None, :, None], float("-inf"))
    return torch.einsum("htc,chd->thd", s.softmax(-1), v)


KV_DTYPES = [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("lengths,block_size,heads,head_dim", [
    ([1, 17, 300], 16, (4, 2), 32),  # one token, a ragged block, two partitions
    ([5, 33], 3, (3, 3), 24),  # an odd block size and head size, no GQA
    ([600], 8, (6, 1), 16),  # three partitions, one KV head for six query heads
])
def test_paged_decode_matches_reference(kv_dtype, lengths, block_size, heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_heads, num_kv = heads
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    k, v, ks, vs, (seen_k, seen_v) = _cache(num_blocks, block_size, num_kv, head_dim, kv_dtype, gen)
    table = _tables(lengths, block_size, num_blocks, gen)
    q = torch.randn(len(lengths), num_heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = paged_attention.paged_decode(to(q), to(k), to(v), to(table), to(torch.tensor(lengths)),
                                       block_size, scale, max_len=max(lengths) + 50,
                                       k_scales=to(ks), v_scales=to(vs)).cpu()
    for row, n in enumerate(lengths):
        want = _reference(q[row : row + 1], seen_k, seen_v, table[row], block_size, [n - 1], n, scale)
        torch.testing.assert_close(out[row : row + 1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("chunks,block_size,heads,head_dim", [
    ([(0, 7), (5, 20), (40, 3)], 16, (4, 2), 32),  # fresh prompt, after a prefix hit, a short chunk
    ([(0, 45), (9, 1)], 5, (2, 1), 8),  # more rows than one query tile; a one-row chunk
])
def test_paged_extend_matches_reference(kv_dtype, chunks, block_size, heads, head_dim):
    """Each chunk is (cached tokens before it, new tokens); its K/V are already in the cache."""
    gen = torch.Generator().manual_seed(1)
    num_heads, num_kv = heads
    ctx = [c + n for c, n in chunks]
    num_blocks = sum(-(-n // block_size) for n in ctx) + 2
    k, v, ks, vs, (seen_k, seen_v) = _cache(num_blocks, block_size, num_kv, head_dim, kv_dtype, gen)
    table = _tables(ctx, block_size, num_blocks, gen)
    q_lens = torch.tensor([n for _, n in chunks])
    q_starts = torch.cumsum(q_lens, 0) - q_lens
    q = torch.randn(int(q_lens.sum()), num_heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = paged_attention.paged_extend(to(q), to(k), to(v), to(table), to(q_starts), to(q_lens),
                                       to(torch.tensor(ctx)), block_size, scale, int(q_lens.max()),
                                       k_scales=to(ks), v_scales=to(vs)).cpu()
    for s, (cached, n) in enumerate(chunks):
        rows = slice(int(q_starts[s]), int(q_starts[s]) + n)
        want = _reference(q[rows], seen_k, seen_v, table[s], block_size,
                          list(range(cached, cached + n)), cached + n, scale)
        torch.testing.assert_close(out[rows], want, rtol=1e-4, atol=1e-4)


def test_bfloat16_queries_give_bfloat16_rows():
    gen = torch.Generator().manual_seed(2)
    k, v, _, _, (seen_k, seen_v) = _cache(4, 16, 2, 16, torch.bfloat16, gen)
    table = torch.tensor([[2, 0, 3]])
    q = torch.randn(1, 4, 16, generator=gen).bfloat16()
    out = paged_attention.paged_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), table.to(DEVICE),
                                       torch.tensor([40], device=DEVICE), 16, 0.25, max_len=48)
    assert out.dtype == torch.bfloat16
    want = _reference(q, seen_k, seen_v, table[0], 16, [39], 40, 0.25)
    torch.testing.assert_close(out.cpu().float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_soft_capped_scores(kv_dtype):
    """Gemma 2's cap (softcap * tanh(s / softcap)) in both kernels, at a cap the scores pass."""
    gen = torch.Generator().manual_seed(3)
    k, v, ks, vs, (seen_k, seen_v) = _cache(12, 8, 2, 32, kv_dtype, gen)
    table = torch.tensor([[4, 1, 7, 9], [0, 2, 3, 5]])
    lens = [30, 17]
    q = 3 * torch.randn(2, 4, 32, generator=gen)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = paged_attention.paged_decode(to(q), to(k), to(v), to(table), to(torch.tensor(lens)), 8, 0.5,
                                       max_len=32, k_scales=to(ks), v_scales=to(vs), softcap=1.5).cpu()
    for row, n in enumerate(lens):
        want = _reference(q[row : row + 1], seen_k, seen_v, table[row], 8, [n - 1], n, 0.5, 1.5)
        torch.testing.assert_close(out[row : row + 1], want, rtol=1e-4, atol=1e-4)
        uncapped = _reference(q[row : row + 1], seen_k, seen_v, table[row], 8, [n - 1], n, 0.5)
        assert (uncapped - want).abs().max() > 1e-2  # the cap changed something
    rows = 3 * torch.randn(4, 4, 32, generator=gen)  # the last 4 of 30 positions, causal
    ext = paged_attention.paged_extend(to(rows), to(k), to(v), to(table[:1]), to(torch.tensor([0])),
                                       to(torch.tensor([4])), to(torch.tensor([30])), 8, 0.5, 4,
                                       k_scales=to(ks), v_scales=to(vs), softcap=1.5).cpu()
    want = _reference(rows, seen_k, seen_v, table[0], 8, [26, 27, 28, 29], 30, 0.5, 1.5)
    torch.testing.assert_close(ext, want, rtol=1e-4, atol=1e-4)
