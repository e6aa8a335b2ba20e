"""Paged attention in Triton: decode rows and prefill (extend) chunks read K/V in place
through their block tables, in 16-bit or 8-bit (int8/fp8 with a scale per token and head)
caches, with grouped-query attention.

Decode is split over the context (flash-decoding): a batch of one has only as many
programs as KV heads, far too few to fill a GPU, so each program takes one partition of
`PARTITION` tokens and a second kernel merges the partitions' softmax states. The grid is
fixed by the caller's `max_len`, not by the lengths in the batch, so a captured CUDA graph
replays it for any lengths up to that; partitions past a row's length do no work.

The extend kernel runs every prefill chunk of a step in one launch: a program per (chunk,
head, tile of query rows), attending causally to the chunk's whole context as the cache
holds it (the fresh K/V were written first), so a chunk after a prefix-cache hit or an
earlier chunk needs nothing else. Imports triton: load it only on a GPU or in tests.
"""

import torch
import triton
import triton.language as tl

PARTITION = 256  # context tokens per decode program
TILE = 32  # context tokens per inner iteration


@triton.jit
def _load_kv_tile(cache, scales, table_row, pos, valid, kv_head, offs_d, d_mask,
                  s_slot, s_head, sc_slot, sc_head, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr):
    """K or V of context positions `pos` ([TILE]) for one KV head, as float32 [TILE, D]."""
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0)
    slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    ptr = cache + slot[:, None] * s_slot + kv_head * s_head + offs_d[None, :]
    x = tl.load(ptr, mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    if QUANT:
        x = x * tl.load(scales + slot * sc_slot + kv_head * sc_head, mask=valid, other=0.0)[:, None]
    return x


@triton.jit
def _attend_tile(qv, m, denom, acc, k_cache, v_cache, k_scales, v_scales, table_row, pos, valid,
                 allowed, kv_head, offs_d, d_mask, scale, softcap, s_slot, s_head, sc_slot, sc_head,
                 BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    """One tile of context positions folded into the online softmax of the query rows `qv`:
    (running max, denominator, weighted sum of V) updated. `allowed` [rows, TILE] masks
    scores out (past the context, or causally); SOFTCAP: scores become
    softcap * tanh(scores / softcap) first (Gemma 2)."""
    k = _load_kv_tile(k_cache, k_scales, table_row, pos, valid, kv_head, offs_d, d_mask,
                      s_slot, s_head, sc_slot, sc_head, BLOCK_SIZE, QUANT)
    v = _load_kv_tile(v_cache, v_scales, table_row, pos, valid, kv_head, offs_d, d_mask,
                      s_slot, s_head, sc_slot, sc_head, BLOCK_SIZE, QUANT)
    s = tl.dot(qv, tl.trans(k), input_precision=PRECISION) * scale
    if SOFTCAP:
        e = tl.exp(-2.0 * tl.abs(s / softcap))
        s = softcap * tl.where(s >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row that may see nothing yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, denom, acc


@triton.jit
def _decode_partition(q, k_cache, v_cache, k_scales, v_scales, tables, lens, part_m, part_l, part_o,
                      scale, softcap, s_qt, s_qh, s_slot, s_head, sc_slot, sc_head, s_table, num_heads,
                      num_parts,
                      GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                      D_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr,
                      PART: tl.constexpr, TILE_N: tl.constexpr, PRECISION: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    row, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(lens + row)
    offs_g = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, D_P)
    g_mask, d_mask = offs_g < GROUP, offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    qv = tl.load(q + row * s_qt + heads[:, None] * s_qh + offs_d[None, :],
                 mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D_P], tl.float32)
    table_row = tables + row.to(tl.int64) * s_table
    end = tl.minimum(ctx, (part + 1) * PART)
    for start in range(part * PART, end, TILE_N):
        pos = start + tl.arange(0, TILE_N)
        valid = pos < end
        m, denom, acc = _attend_tile(qv, m, denom, acc, k_cache, v_cache, k_scales, v_scales, table_row,
                                     pos, valid, valid[None, :], kv_head, offs_d, d_mask, scale, softcap,
                                     s_slot, s_head, sc_slot, sc_head, BLOCK_SIZE, QUANT, PRECISION,
                                     SOFTCAP)
    out = (row * num_heads + heads) * num_parts + part  # [rows, heads, parts]
    tl.store(part_m + out, m, mask=g_mask)
    tl.store(part_l + out, denom, mask=g_mask)
    tl.store(part_o + out[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_merge(part_m, part_l, part_o, out, s_ot, s_oh, num_heads, num_parts,
                  HEAD_DIM: tl.constexpr, D_P: tl.constexpr, PARTS_P: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    offs_p = tl.arange(0, PARTS_P)
    offs_d = tl.arange(0, D_P)
    p_mask, d_mask = offs_p < num_parts, offs_d < HEAD_DIM
    base = (row * num_heads + head) * num_parts
    m = tl.load(part_m + base + offs_p, mask=p_mask, other=float("-inf"))
    denom = tl.load(part_l + base + offs_p, mask=p_mask, other=0.0)
    o = tl.load(part_o + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=p_mask[:, None] & d_mask[None, :], other=0.0)
    m_all = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # empty partitions weigh nothing
    total = tl.sum(w[:, None] * o, 0) / tl.sum(w * denom, 0)
    tl.store(out + row * s_ot + head * s_oh + offs_d, total.to(out.dtype.element_ty), mask=d_mask)


def _pow2(n: int, floor: int = 16) -> int:
    """Tile extent for `n`: tl.dot wants powers of two of at least 16."""
    return max(floor, triton.next_power_of_2(n))


def _precision(q: torch.Tensor) -> str:
    """float32 models get exact float32 products; 16-bit ones TF32, finer than their inputs."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _cache_args(k_cache: torch.Tensor, k_scales: torch.Tensor | None) -> tuple:
    sc = k_scales if k_scales is not None else k_cache  # unused when not quantized
    return (k_cache.stride(0), k_cache.stride(1), sc.stride(0) if k_scales is not None else 0,
            sc.stride(1) if k_scales is not None else 0)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 scale: float, max_len: int, k_scales: torch.Tensor | None = None,
                 v_scales: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """One new token per row. q [B, H, D]; k_cache, v_cache [slots, KV, D]; block_tables
    [B, max_blocks]; context_lens [B] (each >= 1, <= max_len); k/v_scales [slots, KV]
    float32 for an 8-bit cache; softcap > 0 caps scores (Gemma 2). Returns [B, H, D] in q's
    dtype."""
    rows, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[1]
    parts = triton.cdiv(max_len, PARTITION)
    part_m = torch.empty(rows, num_heads, parts, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_o = torch.empty(rows, num_heads, parts, head_dim, dtype=torch.float32, device=q.device)
    group = num_heads // num_kv
    quant = k_scales is not None
    _decode_partition[(rows, num_kv, parts)](
        q, k_cache, v_cache, k_scales if quant else k_cache, v_scales if quant else v_cache,
        block_tables, context_lens, part_m, part_l, part_o, scale, softcap, q.stride(0), q.stride(1),
        *_cache_args(k_cache, k_scales), block_tables.stride(0), num_heads, parts,
        GROUP=group, GROUP_P=_pow2(group), HEAD_DIM=head_dim, D_P=_pow2(head_dim),
        BLOCK_SIZE=block_size, QUANT=quant, PART=PARTITION, TILE_N=TILE, PRECISION=_precision(q),
        SOFTCAP=softcap > 0)
    out = torch.empty_like(q)
    _decode_merge[(rows, num_heads)](part_m, part_l, part_o, out, out.stride(0), out.stride(1),
                                     num_heads, parts, HEAD_DIM=head_dim, D_P=_pow2(head_dim),
                                     PARTS_P=_pow2(parts, 2))
    return out


@triton.jit
def _extend(q, k_cache, v_cache, k_scales, v_scales, tables, q_starts, q_lens, ctx_lens, out,
            scale, softcap, s_qt, s_qh, s_slot, s_head, sc_slot, sc_head, s_table, s_ot, s_oh,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, TILE_M: tl.constexpr,
            TILE_N: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    seq, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_new = tl.load(q_lens + seq)
    ctx = tl.load(ctx_lens + seq)
    first = tl.load(q_starts + seq)
    kv_head = head // GROUP
    offs_m = tile * TILE_M + tl.arange(0, TILE_M)
    offs_d = tl.arange(0, D_P)
    m_mask, d_mask = offs_m < n_new, offs_d < HEAD_DIM
    rows = (first + offs_m).to(tl.int64)
    qv = tl.load(q + rows[:, None] * s_qt + head * s_qh + offs_d[None, :],
                 mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    qpos = ctx - n_new + offs_m  # absolute position of each query row
    m = tl.full([TILE_M], float("-inf"), tl.float32)
    denom = tl.zeros([TILE_M], tl.float32)
    acc = tl.zeros([TILE_M, D_P], tl.float32)
    table_row = tables + seq.to(tl.int64) * s_table
    end = tl.minimum(ctx, ctx - n_new + (tile + 1) * TILE_M)  # the tile's last row sees no further
    for start in range(0, end, TILE_N):
        pos = start + tl.arange(0, TILE_N)
        valid = pos < end
        causal = valid[None, :] & (pos[None, :] <= qpos[:, None])
        m, denom, acc = _attend_tile(qv, m, denom, acc, k_cache, v_cache, k_scales, v_scales, table_row,
                                     pos, valid, causal, kv_head, offs_d, d_mask, scale, softcap, s_slot,
                                     s_head, sc_slot, sc_head, BLOCK_SIZE, QUANT, PRECISION, SOFTCAP)
    acc = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out + rows[:, None] * s_ot + head * s_oh + offs_d[None, :],
             acc.to(out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, scale: float, max_q_len: int,
                 k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Causal attention for chunks of new tokens whose K/V are already in the cache.
    q [T, H, D]; chunk s is rows q_starts[s] .. + q_lens[s], at the last q_lens[s] of its
    context_lens[s] positions, read through block_tables[s]. Writes its rows of `out`
    (default: a new tensor like q) and returns it."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q) if out is None else out
    quant = k_scales is not None
    tile_m = 16 if max_q_len <= 16 else 32
    grid = (len(q_lens), num_heads, triton.cdiv(max_q_len, tile_m))
    _extend[grid](q, k_cache, v_cache, k_scales if quant else k_cache, v_scales if quant else v_cache,
                  block_tables, q_starts, q_lens, context_lens, out, scale, softcap, q.stride(0), q.stride(1),
                  *_cache_args(k_cache, k_scales), block_tables.stride(0), out.stride(0),
                  out.stride(1), GROUP=num_heads // k_cache.shape[1], HEAD_DIM=head_dim,
                  D_P=_pow2(head_dim), BLOCK_SIZE=block_size, QUANT=quant, TILE_M=tile_m,
                  TILE_N=TILE, PRECISION=_precision(q), SOFTCAP=softcap > 0)
    return out
