"""What `train-draft` runs for each --method: the draft's training, and how it is saved."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from servelm.speculative.eagle import SHAPE_KEYS, save_eagle, target_lm_head
from servelm.speculative.medusa import save_heads
from servelm.train import distill, eagle, medusa
from servelm.train.collect import Trace
from servelm.train.loop import History

DEFAULTS = {
    "medusa": {"epochs": 2, "batch_size": 256, "lr": 3e-3, "num_layers": 1},
    "eagle": {"epochs": 10, "batch_size": 4, "lr": 3e-3, "num_layers": 1},
    "distill": {"epochs": 6, "batch_size": 4, "lr": 2e-3, "num_layers": 2},
}


@dataclass
class Target:
    """What training needs of the target, taken before it shuts down."""

    source: str
    traces: list[Trace]
    lm_head: torch.Tensor  # [hidden, vocab] float
    embeddings: torch.Tensor  # [vocab, hidden] float
    arch: dict[str, Any]  # SHAPE_KEYS, rope_theta, rms_norm_eps, max_positions

    @classmethod
    def of(cls, model: Any, source: str, traces: list[Trace]) -> Target:
        a = model.arch
        with torch.inference_mode():
            ids = torch.arange(a.vocab_size, device=model.device)
            embeddings = model.embed_tokens(ids).float().cpu().clone()
        arch = dict(zip(SHAPE_KEYS, (a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
                                     a.intermediate_size)))
        arch.update(rope_theta=a.rope_theta, rms_norm_eps=a.rms_norm_eps,
                    max_positions=a.max_position_embeddings)
        return cls(source, traces, target_lm_head(model), embeddings, arch)


@dataclass
class Trained:
    what: str  # for the summary line
    spec_method: str  # speculative_config.method that loads it
    history: History
    untrained: dict  # the held-out figures before training
    save: Callable[[Path], None]
    accuracy_key: str  # per draft token, in history.epochs and untrained
    settings: dict = field(default_factory=dict)  # the method's own options, for the summary


def train_medusa(args: argparse.Namespace, target: Target) -> Trained:
    heads, history = medusa.train(target.traces, target.lm_head, args.num_heads, args.num_layers,
                                  args.epochs, args.batch_size, args.lr, args.seed,
                                  progress=not args.quiet)
    untrained = medusa.baseline(target.traces, target.lm_head, args.num_heads, args.seed)
    return Trained(f"{args.num_heads} Medusa heads", "medusa", history, untrained,
                   lambda out: save_heads(heads, out, {"target": target.source}), "head_accuracy",
                   {"num_heads": args.num_heads, "num_layers": args.num_layers})


def train_eagle(args: argparse.Namespace, target: Target) -> Trained:
    draft, history, untrained = eagle.train(target.traces, target.embeddings, target.lm_head,
                                            target.arch, args.draft_vocab_size, args.num_heads,
                                            args.epochs, args.batch_size, args.lr, args.seed,
                                            progress=not args.quiet)
    return Trained("an EAGLE draft", "eagle", history, untrained,
                   lambda out: save_eagle(draft, out, {"target": target.source}), "pass_accuracy",
                   {"passes": args.num_heads, "draft_vocab_size": len(draft.vocab)})


def train_distill(args: argparse.Namespace, target: Target) -> Trained:
    draft, history, untrained, start = distill.train(target.traces, target.lm_head, target.source,
                                                     args.num_layers, args.epochs, args.batch_size,
                                                     args.lr, args.seed, Path(args.output) / ".start",
                                                     progress=not args.quiet)
    info = {"target": target.source, "num_layers": args.num_layers}
    return Trained(f"a {args.num_layers}-layer draft model", "draft_model", history, untrained,
                   lambda out: distill.save(draft, start, out, info), "token_accuracy",
                   {"num_layers": args.num_layers})


METHODS: dict[str, Callable[[argparse.Namespace, Target], Trained]] = {
    "medusa": train_medusa, "eagle": train_eagle, "distill": train_distill}
