"""Distilling a small draft model from the target (DistillSpec, Zhou et al., 2024).

The draft starts as the target's first L layers with its final norm and LM head
(bench/spec_drafts.py writes that folder) and learns the target's next-token distribution
on the target's own greedy outputs, on-policy data as DistillSpec recommends: loss is the
forward KL from the target's distribution, which the collected hidden states give through
the LM head at no further cost, to the draft's, at every position that produced an output
token. The embedding and LM head stay frozen (tied in most small models, and the target's).
The result is a Hugging Face folder for `{"method": "draft_model", "model": DIR}`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from servelm.bench.spec_drafts import DRAFT_WEIGHTS, write_pruned_draft
from servelm.train.collect import Trace
from servelm.train.loop import History, fit, split


def batch_of(traces: list[Trace]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [B, T] padded, attention mask [B, T], the positions scored as a bool
    mask [B, T], and the target's states at those positions [n, hidden])."""
    length = max(len(t.tokens) - 1 for t in traces)
    ids = torch.zeros(len(traces), length, dtype=torch.int64)
    mask = torch.zeros(len(traces), length, dtype=torch.int64)
    scored = torch.zeros(len(traces), length, dtype=torch.bool)
    for i, t in enumerate(traces):
        n = len(t.tokens) - 1
        ids[i, :n] = torch.tensor(t.tokens[:n])
        mask[i, :n] = 1
        scored[i, t.num_prompt - 1 : n] = True
    states = torch.cat([t.output_hidden for t in traces])
    return ids, mask, scored, states


def kl_and_accuracy(draft, lm_head: torch.Tensor, batch) -> tuple[torch.Tensor, float]:
    """Forward KL(target || draft) per scored position, and how often their argmaxes agree
    (the share of greedy drafts accepted, one token at a time)."""
    ids, mask, scored, states = batch
    hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state[scored]
    logits = draft.lm_head(hidden)
    with torch.no_grad():
        target = F.log_softmax(states @ lm_head, dim=-1)
    loss = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")
    agree = float((logits.argmax(-1) == target.argmax(-1)).float().mean())
    return loss, agree


def train(traces: list[Trace], lm_head: torch.Tensor, source: str, num_layers: int, epochs: int,
          batch_size: int, lr: float, seed: int, workdir: Path, progress: bool = True):
    """The distilled draft (a transformers model), its history, the pruned start's held-out
    figures and the start's folder (written under `workdir`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    start = write_pruned_draft(source, num_layers, workdir)
    draft = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    for p in (*draft.get_input_embeddings().parameters(), *draft.get_output_embeddings().parameters()):
        p.requires_grad_(False)
    train_traces, held_traces = split(traces, seed)
    order = sorted(train_traces, key=lambda t: len(t.tokens))
    batches = [batch_of(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    held = [batch_of(held_traces[i : i + batch_size]) for i in range(0, len(held_traces), batch_size)]

    def evaluate() -> dict:
        if not held:
            return {}
        results = [kl_and_accuracy(draft, lm_head, b) for b in held]
        return {"held_out_loss": sum(float(r[0]) for r in results) / len(results),
                "token_accuracy": [sum(r[1] for r in results) / len(results)]}

    draft.train()
    with torch.no_grad():
        untrained = evaluate()
    history: History = fit(draft.parameters(),
                           lambda g: [batches[i] for i in torch.randperm(len(batches), generator=g)],
                           lambda b: kl_and_accuracy(draft, lm_head, b)[0], evaluate, epochs, lr,
                           seed, "distill", progress)
    return draft.eval(), history, untrained, start


def save(draft, start: Path, out: Path, info: dict) -> None:
    """The draft's weights and config, with the pruned start's tokenizer files; the start's
    folder is removed."""
    out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(out)
    for f in start.iterdir():
        if f.is_file() and f.name not in (DRAFT_WEIGHTS, "config.json") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    (out / "distill_info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(start.parent, ignore_errors=True)
