"""Training an EAGLE draft (speculative/eagle.py) on the target's own greedy outputs.

Slot p reads (embedding of x_{p+1}, h_p) and learns h_{p+1} (smooth L1, as in EAGLE) and
the target's next token x_{p+2} through the frozen LM head (cross-entropy on the draft
vocabulary, weight 0.1 as in EAGLE): on greedy output x_{p+2} is the target's argmax.

In use, only the first draft reads a true h; the k-th reads the draft's own guess from k - 1
slots before. Training unrolls the same way ("training-time test", EAGLE-3): pass d feeds
every slot the guess of pass d - 1 at the slot before it, and its queries see what they will
see in use, the true slots up to the last real one, then the guesses of the passes in
between, one slot each. Pass d's loss is weighted 0.8^(d - 1). Held-out top-1 accuracy of
pass d is how often the d-th draft token is right, given the ones before it were.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from servelm.speculative.eagle import EagleDraft
from servelm.train.collect import Trace
from servelm.train.loop import History, fit, split

TOKEN_WEIGHT, PASS_DECAY = 0.1, 0.8


@dataclass
class Batch:
    """Traces padded to one length T: slot p of row b pairs tokens[b, p + 1] with hidden[b, p]."""

    emb: torch.Tensor  # [B, T, hidden]: embedding of the token after each slot
    hidden: torch.Tensor  # [B, T, hidden]: the target's state at each slot
    next_hidden: torch.Tensor  # [B, T, hidden]: the state at the slot after (the guess's goal)
    targets: torch.Tensor  # [B, T]: draft-vocabulary index of x_{p+2}, -100 where no loss
    feature_mask: torch.Tensor  # [B, T] bool: slots with a next state


def draft_vocabulary(traces: list[Trace], size: int) -> torch.Tensor:
    """The target ids of the `size` tokens the outputs use most (ties: the prompts' counts)."""
    out = Counter(t for tr in traces for t in tr.output)
    prompts = Counter(t for tr in traces for t in tr.tokens[: tr.num_prompt])
    ranked = sorted(set(out) | set(prompts), key=lambda t: (-out[t], -prompts[t], t))
    return torch.tensor(sorted(ranked[:size]))


def make_batch(traces: list[Trace], embeddings: torch.Tensor, index_of: torch.Tensor) -> Batch:
    """`index_of[t]`: token t's draft-vocabulary index (-100 outside it)."""
    length = max(len(t.tokens) - 1 for t in traces)
    hidden_size = embeddings.shape[1]
    b = len(traces)
    emb, hidden, nxt = (torch.zeros(b, length, hidden_size) for _ in range(3))
    targets = torch.full((b, length), -100, dtype=torch.int64)
    feature_mask = torch.zeros(b, length, dtype=torch.bool)
    for i, t in enumerate(traces):
        n = len(t.tokens) - 1  # slots 0 .. n-1
        ids = torch.tensor(t.tokens)
        emb[i, :n] = embeddings[ids[1:]]
        hidden[i, :n] = t.hidden
        nxt[i, : n - 1] = t.hidden[1:]
        feature_mask[i, : n - 1] = True
        # slot p's token x_{p+2} is the target's own output from p = num_prompt - 2 on
        first = max(t.num_prompt - 2, 0)
        targets[i, first : n - 1] = index_of[ids[first + 2 : n + 1]]
    return Batch(emb, hidden, nxt, targets, feature_mask)


def unrolled_mask(length: int, d: int) -> torch.Tensor:
    """Pass d's attention [T, d * T]: slot p sees pass 1's slots up to p - d + 1 and pass
    e's slot p - d + e (e = 2 .. d)."""
    ones = torch.ones(length, length, dtype=torch.bool)
    blocks = [ones.tril(-(d - 1))] + [ones.tril(-(d - e)).triu(-(d - e)) for e in range(2, d + 1)]
    return torch.cat(blocks, dim=1)


def losses(draft: EagleDraft, head: torch.Tensor, batch: Batch,
           passes: int) -> tuple[torch.Tensor, list[float]]:
    """Weighted loss over the unrolled passes, and each pass's top-1 accuracy.
    `head`: the target's LM head on the draft vocabulary, [hidden, V']."""
    length = batch.emb.shape[1]
    positions = torch.arange(length)
    feat, keys, values = batch.hidden, [], []
    total, weights, accuracy = 0.0, 0.0, []
    for d in range(1, passes + 1):
        past = (torch.cat(keys, -3), torch.cat(values, -3)) if keys else None
        guess, (k, v) = draft(batch.emb, feat, positions, past, unrolled_mask(length, d))
        keys.append(k)
        values.append(v)
        valid = torch.zeros(length, dtype=torch.bool)
        valid[d - 1 :] = True  # earlier slots have no guess from d - 1 passes before
        fmask = batch.feature_mask & valid
        tmask = (batch.targets != -100) & valid
        w = PASS_DECAY ** (d - 1)
        loss = F.smooth_l1_loss(guess[fmask], batch.next_hidden[fmask]) if fmask.any() else 0.0
        if tmask.any():
            logits = guess[tmask] @ head
            loss = loss + TOKEN_WEIGHT * F.cross_entropy(logits, batch.targets[tmask])
            accuracy.append(float((logits.argmax(-1) == batch.targets[tmask]).float().mean()))
        else:
            accuracy.append(float("nan"))
        total, weights = total + w * loss, weights + w
        # the next pass's slot p reads this pass's guess at slot p - 1
        feat = torch.cat([torch.zeros_like(guess[:, :1]), guess[:, :-1]], dim=1)
    return total / weights, accuracy


def new_draft(arch: dict, vocab: torch.Tensor) -> EagleDraft:
    return EagleDraft(arch["hidden_size"], arch["num_heads"], arch["num_kv_heads"], arch["head_dim"],
                      arch["intermediate_size"], vocab, arch["rope_theta"], arch["rms_norm_eps"],
                      arch["max_positions"])


def train(traces: list[Trace], embeddings: torch.Tensor, lm_head: torch.Tensor, arch: dict,
          vocab_size: int, passes: int, epochs: int, batch_size: int, lr: float, seed: int,
          progress: bool = True) -> tuple[EagleDraft, History, dict]:
    """An EAGLE draft trained on `traces`. `embeddings` [vocab, hidden] and `lm_head`
    [hidden, vocab] are the target's, frozen; `arch` its shapes (`SHAPE_KEYS`, rope_theta,
    rms_norm_eps, max_positions). Returns the draft, its history and the untrained draft's
    held-out figures."""
    torch.manual_seed(seed)
    train_traces, held_traces = split(traces, seed)
    vocab = draft_vocabulary(train_traces, vocab_size)
    index_of = torch.full((lm_head.shape[1],), -100, dtype=torch.int64)
    index_of[vocab] = torch.arange(len(vocab))
    head = lm_head[:, vocab].contiguous()
    draft = new_draft(arch, vocab)
    # longest first within each batch keeps padding low; batches in a new order each epoch
    order = sorted(range(len(train_traces)), key=lambda i: len(train_traces[i].tokens))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    prepared = [make_batch([train_traces[i] for i in g], embeddings, index_of) for g in groups]
    held = [make_batch(held_traces[i : i + batch_size], embeddings, index_of)
            for i in range(0, len(held_traces), batch_size)]

    def evaluate(model: EagleDraft) -> dict:
        if not held:
            return {}
        results = [losses(model, head, b, passes) for b in held]
        loss = sum(float(r[0]) for r in results) / len(results)
        acc = [sum(r[1][d] for r in results) / len(results) for d in range(passes)]
        return {"held_out_loss": loss, "pass_accuracy": acc}

    with torch.no_grad():
        untrained = evaluate(draft)
    history = fit(draft.parameters(), lambda g: [prepared[i] for i in torch.randperm(len(prepared), generator=g)],
                  lambda b: losses(draft, head, b, passes)[0], lambda: evaluate(draft), epochs, lr,
                  seed, "train eagle", progress)
    return draft.eval(), history, untrained
