"""The training loop every draft shares: AdamW under a one-cycle schedule with the gradient
norm clipped, a progress bar, the loss of every step and a held-out evaluation after every
epoch."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

MAX_GRAD_NORM = 1.0


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)  # held-out loss and accuracies per epoch


def split(items: list[Any], seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): a tenth of the items, at least one, held out when there are two."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = max(1, len(items) // 10) if len(items) > 1 else 0
    return [items[i] for i in order[held:]], [items[i] for i in order[:held]]


def fit(params: Iterable[torch.nn.Parameter], batches: Callable[[torch.Generator], list[Any]],
        loss: Callable[[Any], torch.Tensor], evaluate: Callable[[], dict], epochs: int, lr: float,
        seed: int, desc: str, progress: bool = True) -> History:
    """Train `params` for `epochs` passes over `batches(generator)` (a new order each
    epoch) minimizing `loss(batch)`; `evaluate()` (held-out figures) after each epoch."""
    params = [p for p in params if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(batches(torch.Generator().manual_seed(seed)))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    history = History()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", disable=not progress)
    for epoch in range(epochs):
        t0 = time.monotonic()
        for batch in batches(generator):
            value = loss(batch)
            opt.zero_grad()
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)  # a bad batch cannot blow it up
            opt.step()
            sched.step()
            history.steps.append(len(history.steps) + 1)
            history.train_loss.append(float(value.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}")
        this_epoch = history.train_loss[-steps_per_epoch:]
        record = {"epoch": epoch + 1, "seconds": round(time.monotonic() - t0, 1),
                  "train_loss": sum(this_epoch) / len(this_epoch)}
        with torch.no_grad():
            record.update(evaluate())
        history.epochs.append(record)
    bar.close()
    return history
