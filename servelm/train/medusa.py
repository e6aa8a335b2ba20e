"""Training Medusa heads (speculative/medusa.py) on the target's own greedy outputs.

For output token j of a trace, h_j is the state that produced it; head k learns to predict
token j + k from h_j, through the target's LM head, frozen. The loss is cross-entropy,
head k weighted 0.8^(k - 1) as in the Medusa paper (far heads are harder and matter
less: a draft is accepted up to its first miss). A tenth of the traces are held out: their
loss and each head's top-1 accuracy, which bounds how often its drafts are accepted, are
reported after every epoch.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from servelm.speculative.medusa import MedusaHeads
from servelm.train.collect import Trace

HEAD_DECAY = 0.8


@dataclass
class Examples:
    hidden: torch.Tensor  # [n, hidden]
    targets: torch.Tensor  # [n, heads]: token j + k for head k, -100 past the trace's end


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)  # held-out loss and accuracies per epoch


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


def split(traces: list[Trace], seed: int) -> tuple[list[Trace], list[Trace]]:
    """(train, held out): a tenth of the traces, at least one, held out when there are two."""
    order = list(range(len(traces)))
    random.Random(seed).shuffle(order)
    held = max(1, len(traces) // 10) if len(traces) > 1 else 0
    return [traces[i] for i in order[held:]], [traces[i] for i in order[:held]]


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
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    n = len(data.hidden)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    history = History()
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="train medusa", unit="step", disable=not progress)
    step = 0
    for epoch in range(epochs):
        t0 = time.monotonic()
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            loss, _ = losses(heads, lm_head, data.hidden[idx], data.targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            history.steps.append(step)
            history.train_loss.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}")
        this_epoch = history.train_loss[-steps_per_epoch:]
        record = {"epoch": epoch + 1, "seconds": time.monotonic() - t0,
                  "train_loss": sum(this_epoch) / len(this_epoch)}
        if held is not None:
            with torch.no_grad():
                held_loss, accuracy = losses(heads, lm_head, held.hidden, held.targets)
            record.update(held_out_loss=float(held_loss), head_accuracy=accuracy)
        history.epochs.append(record)
    bar.close()
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
