"""Training Medusa heads (speculative/medusa.py) on the target's own greedy outputs.

For output token j of a trace, h_j is the state that produced it; head k learns to predict
token j + k from h_j, through the target's LM head, frozen. The loss is cross-entropy,
head k weighted 0.8^(k - 1) as in the Medusa paper (far heads are harder and matter
less: a draft is accepted up to its first miss). A tenth of the traces are held out: their
loss and each head's top-1 accuracy, which bounds how often its drafts are accepted, are
reported after every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from servelm.speculative.medusa import MedusaHeads
from servelm.train.collect import Trace
from servelm.train.loop import History, fit, split

HEAD_DECAY = 0.8


@dataclass
class Examples:
    hidden: torch.Tensor  # [n, hidden]
    targets: torch.Tensor  # [n, heads]: token j + k for head k, -100 past the trace's end


def examples(traces: list[Trace], num_heads: int) -> Examples:
    hidden, targets = [], []
    for t in traces:
        out = t.output
        n = len(out)
        if n < 2:
            continue
        ids = torch.tensor(out + [-100] * num_heads)
        # row j: tokens j+1 .. j+num_heads (rows past the last token have nothing to learn)
        targets.append(torch.stack([ids[j + 1 : j + 1 + num_heads] for j in range(n - 1)]))
        hidden.append(t.output_hidden[: n - 1])
    if not hidden:
        raise ValueError("the target produced no output of two tokens or more to learn from")
    return Examples(torch.cat(hidden), torch.cat(targets))


def losses(heads: MedusaHeads, lm_head: torch.Tensor, hidden: torch.Tensor,
           targets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Weighted loss over the heads, and each head's top-1 accuracy."""
    feats = heads(hidden)  # [heads, n, hidden]
    logits = feats @ lm_head  # [heads, n, vocab]
    total, weights, accuracy = 0.0, 0.0, []
    for k in range(heads.num_heads):
        y = targets[:, k]
        valid = y != -100
        if not valid.any():
            accuracy.append(float("nan"))
            continue
        w = HEAD_DECAY ** k
        total = total + w * F.cross_entropy(logits[k][valid], y[valid])
        weights += w
        accuracy.append(float((logits[k][valid].argmax(-1) == y[valid]).float().mean()))
    return total / weights, accuracy


def train(traces: list[Trace], lm_head: torch.Tensor, num_heads: int, num_layers: int,
          epochs: int, batch_size: int, lr: float, seed: int,
          progress: bool = True) -> tuple[MedusaHeads, History]:
    """Heads trained on `traces`; `lm_head` is the target's [hidden, vocab], frozen."""
    torch.manual_seed(seed)
    train_traces, held_traces = split(traces, seed)
    data = examples(train_traces, num_heads)
    held = examples(held_traces, num_heads) if held_traces else None
    heads = MedusaHeads(lm_head.shape[0], num_heads, num_layers)

    def batches(generator: torch.Generator) -> list[torch.Tensor]:
        return list(torch.randperm(len(data.hidden), generator=generator).split(batch_size))

    def evaluate() -> dict:
        if held is None:
            return {}
        held_loss, accuracy = losses(heads, lm_head, held.hidden, held.targets)
        return {"held_out_loss": float(held_loss), "head_accuracy": accuracy}

    history = fit(heads.parameters(), batches,
                  lambda idx: losses(heads, lm_head, data.hidden[idx], data.targets[idx])[0],
                  evaluate, epochs, lr, seed, "train medusa", progress)
    return heads.eval(), history


def baseline(traces: list[Trace], lm_head: torch.Tensor, num_heads: int, seed: int) -> dict:
    """The untrained heads (each the LM head's own next-token guess) on the same held-out
    traces: what training has to beat."""
    _, held_traces = split(traces, seed)
    if not held_traces:
        return {}
    held = examples(held_traces, num_heads)
    with torch.no_grad():
        loss, accuracy = losses(MedusaHeads(lm_head.shape[0], num_heads), lm_head, held.hidden,
                                held.targets)
    return {"held_out_loss": float(loss), "head_accuracy": accuracy}
