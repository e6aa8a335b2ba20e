"""Batched token sampling: penalties, temperature, top-k/top-p/min-p, seeded draws.

Everything runs as whole-batch tensor ops; the only per-row Python is one exponential draw
per row that carries its own ``torch.Generator``, which is what makes a seeded request
reproducible no matter what else shares its batch. Stages that no row needs are skipped.
Rows that do not use a stage are left bit-identical by it, for the same reason.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor

from servelm.sampling_params import GREEDY_EPS, SamplingParams


@dataclass
class SamplingMetadata:
    """Per-step sampling inputs for the rows of a batch, built once by the model runner."""

    temperature: Tensor  # [B] float32; < GREEDY_EPS means greedy
    top_k: Tensor  # [B] int64, 0 = off
    top_p: Tensor  # [B] float32, 1 = off
    min_p: Tensor  # [B] float32, 0 = off
    presence_penalties: Tensor | None  # [B] float32, None when no row uses it
    frequency_penalties: Tensor | None
    repetition_penalties: Tensor | None
    all_greedy: bool
    all_random: bool
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    output_token_ids: list[list[int]] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    min_tokens_mask: list[list[int]] | None = None  # per row: ids forbidden this step
    logit_bias: tuple[Tensor, Tensor, Tensor] | None = None  # (rows, token ids, biases)
    # Derived flags so the sampler can skip whole stages (greedy rows never set them).
    no_top_k: bool = True
    no_top_p: bool = True
    no_min_p: bool = True
    max_top_k: int = 0  # largest top_k over rows (0: compute from the tensor if needed)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        stop_token_ids: list[Collection[int]],
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Gather the batch's settings into tensors; rows are in the logits' row order.
        `stop_token_ids`: each row's ids that end it (its stop ids and EOS unless ignored),
        forbidden while it has fewer than `min_tokens` outputs."""
        greedy = [p.greedy for p in params]
        # Greedy rows ignore the filters, so neutralize them to keep the stages skippable.
        top_k = [0 if g else p.top_k for p, g in zip(params, greedy, strict=True)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]

        def f32(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def optional(values: list[float], neutral: float) -> Tensor | None:
            return f32(values) if any(v != neutral for v in values) else None

        forbid = [sorted(stops) if len(out) < p.min_tokens else []
                  for p, out, stops in zip(params, output_ids, stop_token_ids, strict=True)]
        biased = [(row, t, b) for row, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        bias = None
        if biased:
            rows, ids, values = zip(*biased)
            bias = (torch.tensor(rows, device=device), torch.tensor(ids, device=device), f32(list(values)))

        return cls(
            temperature=f32([p.temperature for p in params]),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=f32(top_p),
            min_p=f32(min_p),
            presence_penalties=optional([p.presence_penalty for p in params], 0.0),
            frequency_penalties=optional([p.frequency_penalty for p in params], 0.0),
            repetition_penalties=optional([p.repetition_penalty for p in params], 1.0),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            generators={
                i: g
                for i, (g, is_greedy) in enumerate(zip(generators, greedy, strict=True))
                if g is not None and not is_greedy
            },
            output_token_ids=output_ids,
            prompt_token_ids=prompt_ids,
            min_tokens_mask=forbid if any(forbid) else None,
            logit_bias=bias,
            no_top_k=all(k == 0 for k in top_k),
            max_top_k=max(top_k, default=0),
            no_top_p=all(p >= 1.0 for p in top_p),
            no_min_p=all(m <= 0.0 for m in min_p),
        )


def _token_counts(ids: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """[B, V] occurrence counts; ids out of the vocab land in a dropped padding column."""
    longest = max((len(r) for r in ids), default=0)
    counts = torch.zeros(len(ids), vocab_size + 1, dtype=torch.int64, device=device)
    if longest == 0:
        return counts[:, :vocab_size]
    padded = torch.tensor(
        [r + [vocab_size] * (longest - len(r)) for r in ids], dtype=torch.int64, device=device
    ).clamp_(0, vocab_size)
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    return counts[:, :vocab_size]


def apply_token_bitmask(logits: Tensor, bitmask: Tensor) -> None:
    """Structured outputs: logits of tokens a row's bitmask (int32 [rows, ceil(vocab / 32)];
    bit j of word w is token 32 w + j) leaves out become -inf, in place. xgrammar's kernel
    (CPU or CUDA; 10-20x faster than unpacking the bits in torch) does it."""
    import xgrammar  # only steps with a structured request get here

    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))


def apply_min_tokens(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Forbid end-of-sequence ids for rows that have not yet produced ``min_tokens``."""
    if meta.min_tokens_mask is None:
        return logits
    vocab = logits.shape[-1]
    rows = [i for i, ids in enumerate(meta.min_tokens_mask) for t in ids if t < vocab]
    cols = [t for ids in meta.min_tokens_mask for t in ids if t < vocab]
    logits = logits.clone()
    logits[rows, cols] = float("-inf")
    return logits


def apply_penalties(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Repetition (HF semantics, prompt + output) then frequency/presence (OpenAI, output)."""
    rep, freq, pres = meta.repetition_penalties, meta.frequency_penalties, meta.presence_penalties
    if rep is None and freq is None and pres is None:
        return logits
    vocab = logits.shape[-1]
    out_counts = _token_counts(meta.output_token_ids, vocab, logits.device)
    if rep is not None:
        seen = (_token_counts(meta.prompt_token_ids, vocab, logits.device) > 0) | (out_counts > 0)
        r = rep.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalized, logits)
    if freq is not None:
        logits = logits - freq.unsqueeze(1) * out_counts.to(logits.dtype)
    if pres is not None:
        logits = logits - pres.unsqueeze(1) * (out_counts > 0).to(logits.dtype)
    return logits


def _apply_top_k_top_p(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Mask tokens outside each row's top-k and nucleus; rows with neither stay untouched."""
    vocab = logits.shape[-1]
    off = (meta.top_k <= 0).unsqueeze(1)
    # Top-k keeps every token >= the row's k-th largest logit (ties included), the same
    # rule on both paths so a row's result does not depend on which path its batch takes.
    k = torch.where(off, 1, meta.top_k.clamp(max=vocab).unsqueeze(1))
    if meta.no_top_p:
        # Only top-k: a partial top-k is enough to read each row's threshold.
        max_k = min(meta.max_top_k, vocab) if meta.max_top_k > 0 else int(k.max())
        thresh = logits.topk(max_k, dim=-1).values.gather(1, k - 1)
        thresh = thresh.masked_fill(off, float("-inf"))
        return logits.masked_fill(logits < thresh, float("-inf"))
    # Full sort: top-k, then keep tokens whose preceding cumulative mass is < top_p.
    srt, idx = logits.sort(dim=-1, descending=True, stable=True)
    if not meta.no_top_k:
        thresh = srt.gather(1, k - 1).masked_fill(off, float("-inf"))
        srt = srt.masked_fill(srt < thresh, float("-inf"))
    probs = srt.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= meta.top_p.unsqueeze(1)) & (meta.top_p < 1.0).unsqueeze(1)
    srt = srt.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, srt)


def _exponential_noise(probs: Tensor, meta: SamplingMetadata) -> Tensor:
    """Exponential(1) noise; seeded rows draw from their own generator, one row at a time."""
    batch, vocab = probs.shape
    if len(meta.generators) == batch:
        q = torch.empty_like(probs)
    else:
        q = torch.empty_like(probs).exponential_()
    for row, gen in meta.generators.items():
        q[row] = torch.empty(vocab, dtype=probs.dtype, device=probs.device).exponential_(
            generator=gen
        )
    # exponential_ may return exactly 0, and 0/0 would be NaN in the race below.
    return q.clamp_min_(torch.finfo(probs.dtype).tiny)


def target_probs(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """The distribution each random row samples from, after temperature, top-k/top-p and
    min-p; rows are not renormalized after min-p (the sampling race does not need it)."""
    temperature = meta.temperature
    if not meta.all_random:
        temperature = torch.where(temperature < GREEDY_EPS, 1.0, temperature)
    logits = logits / temperature.unsqueeze(1)
    if not (meta.no_top_k and meta.no_top_p):
        logits = _apply_top_k_top_p(logits, meta)
    probs = logits.softmax(dim=-1)
    if not meta.no_min_p:
        threshold = meta.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _sample_random(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    probs = target_probs(logits, meta)
    # Exponential race: argmax(p / q) with q ~ Exp(1) is a sample from p (p need not sum to 1).
    return (probs / _exponential_noise(probs, meta)).argmax(dim=-1)


class Sampler:
    """Turns a step's [B, V] logits into one token per row. Logprobs are not its job: the
    runner computes them from the raw logits only for requests that ask."""

    def __call__(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        logits = logits.float()
        if meta.logit_bias is not None:
            logits = logits.index_put(meta.logit_bias[:2], meta.logit_bias[2], accumulate=True)
        logits = apply_min_tokens(logits, meta)
        logits = apply_penalties(logits, meta)
        if meta.all_greedy:
            return logits.argmax(dim=-1)
        tokens = _sample_random(logits, meta)
        if not meta.all_random:
            greedy_rows = meta.temperature < GREEDY_EPS
            tokens = torch.where(greedy_rows, logits.argmax(dim=-1), tokens)
        return tokens
