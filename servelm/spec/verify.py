"""Lossless verification of draft tokens against the target model's logits.

The target scores the last accepted token plus k drafts in one pass, giving k + 1 rows of
logits. Greedy requests keep the longest draft prefix that equals the target's argmax,
then the target's own token: exactly what decoding one token at a time would produce.
Sampled requests use speculative rejection sampling (Leviathan et al., Chen et al.): draft
token d at row j is kept with probability min(1, p_j(d) / q_j(d)); at the first rejection
the token is drawn from the residual max(0, p_j - q_j), renormalized; if every draft is
kept, one more token is drawn from p_k. The result is distributed exactly as sampling
from p token by token. Draft-free proposers (n-gram lookup) propose one token with
certainty, q_j = one-hot(d), so the test is a draw u < p_j(d) and the residual is p_j
with d removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from servelm.sampling_params import SamplingParams
from servelm.worker.sampler import SamplingMetadata, target_probs

if TYPE_CHECKING:
    from servelm.engine.request import Request


def speculation_allowed(params: SamplingParams, req: Request) -> bool:
    """Verification scores every draft position with the target's plain distribution, so
    requests whose logits depend on the tokens before each position (penalties, a
    min_tokens ban still in force) decode one token at a time."""
    return (params.presence_penalty == 0 and params.frequency_penalty == 0
            and params.repetition_penalty == 1 and req.num_output_tokens >= params.min_tokens)


def verify(logits: Tensor, draft: list[int], params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """Tokens to append for one request: the accepted drafts and one token from the
    target. `logits` is [len(draft) + 1, vocab], row j scoring the token after draft[:j]."""
    if params.greedy:
        target = logits.argmax(dim=-1).tolist()
        out: list[int] = []
        for j, d in enumerate(draft):
            if target[j] != d:
                break
            out.append(d)
        out.append(target[len(out)])
        return out
    rows = len(draft) + 1
    meta = SamplingMetadata.build([params] * rows, [[]] * rows, [[]] * rows, [None] * rows,
                                  set(), logits.device)
    probs = target_probs(logits.float(), meta)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    draws = torch.rand(rows, generator=generator).tolist()
    out = []
    for j, d in enumerate(draft):
        if draws[j] < float(probs[j, d]):
            out.append(d)
            continue
        residual = probs[j].clone()
        residual[d] = 0.0
        out.append(_draw(residual, generator))
        return out
    out.append(_draw(probs[len(draft)], generator))
    return out


def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
