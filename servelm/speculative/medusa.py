"""Medusa heads: extra decoding heads on the target's own last hidden state (Cai et al., 2024).

Head k (1..K) reads the final hidden state h_i, the one the target's LM head turned into
token x_{i+1}, and predicts x_{i+1+k}: k residual blocks h + SiLU(W h + b) of its own,
then the target's LM head. A head costs one hidden x hidden matmul per block, a small part
of one layer, and sees nothing but h_i: it cannot follow the path drafted before it.

The proposer keeps each request's last hidden state, which the model runner hands it every
step (`observe`), and drafts the static tree of `branching` under the root
(the token h_i produced): every node of depth d gets the best b_d tokens of head d as its
children (greedy), or b_d draws from head d's distribution q (sampled), which verification
corrects for (speculative/verify.py), so the output stays the target's.

Heads are trained by `servelm train-draft --method medusa` (servelm/train/medusa.py) and
stored as a folder: `medusa_config.json` and `heads.safetensors`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from servelm.speculative.proposer import Draft, DraftRequest
from servelm.speculative.tree import DraftTree, static_tree_for
from servelm.speculative.verify import distribution

CONFIG_FILE, WEIGHTS_FILE = "medusa_config.json", "heads.safetensors"


class MedusaHeads(nn.Module):
    """`num_heads` stacks of `num_layers` residual blocks over a hidden state."""

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
            for _ in range(num_heads))
        for layers in self.blocks:  # zero: each head starts as the LM head's own next-token guess
            for linear in layers:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [num_heads, n, hidden], each head's input to the LM head."""
        out = []
        for layers in self.blocks:
            x = hidden
            for linear in layers:
                x = x + F.silu(linear(x))
            out.append(x)
        return torch.stack(out)


def save_heads(heads: MedusaHeads, folder: str | Path, info: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()},
              str(folder / WEIGHTS_FILE))
    config = {"method": "medusa", "hidden_size": heads.hidden_size, "num_heads": heads.num_heads,
              "num_layers": heads.num_layers, **info}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_heads(folder: str | Path, hidden_size: int, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> MedusaHeads:
    """The heads in `folder`, checked against the target's hidden size."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"speculative_config.model {str(folder)!r} has no {CONFIG_FILE}: train "
                         "heads with `servelm train-draft --method medusa --output DIR`")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("hidden_size") != hidden_size:
        raise ValueError(f"speculative_config.model {str(folder)!r} has heads for hidden size "
                         f"{config.get('hidden_size')}, the target's is {hidden_size}")
    heads = MedusaHeads(hidden_size, config["num_heads"], config["num_layers"])
    heads.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return heads.to(device=device, dtype=dtype).eval().requires_grad_(False)


class MedusaProposer:
    """A `Proposer` from Medusa heads; `compute_logits` is the target's LM head."""

    def __init__(self, heads: MedusaHeads, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                 branching: tuple[int, ...]) -> None:
        if len(branching) > heads.num_heads:
            raise ValueError(f"speculative_config asks for {len(branching)} draft levels; the "
                             f"Medusa model has {heads.num_heads} heads")
        self.heads, self.compute_logits, self.branching = heads, compute_logits, branching
        self._hidden: dict[str, torch.Tensor] = {}  # request -> its last sampled token's state

    def observe(self, req_id: str, first: int, hidden: torch.Tensor) -> None:
        """Rows of a step's real tokens; the last one's is what the heads read next (when
        the step ends a prompt chunk without sampling, a later step's replaces it)."""
        self._hidden[req_id] = hidden[-1].detach().clone()

    def reset(self, req_id: str) -> None:
        self._hidden.pop(req_id, None)

    def accepted(self, req_id: str, path: list[int]) -> None:
        """Nothing to do: the next step's state comes with its sampled token (`observe`)."""

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        ready = [i for i, r in enumerate(requests) if r.req_id in self._hidden]
        drafts = [Draft([]) for _ in requests]  # none until a request has sampled once
        if not ready:
            return drafts
        hidden = torch.stack([self._hidden[requests[i].req_id] for i in ready])
        feats = self.heads(hidden)  # [heads, n, hidden]
        depth = len(self.branching)
        logits = self.compute_logits(feats[:depth].reshape(-1, hidden.shape[-1]))
        logits = logits.view(depth, len(ready), -1)
        for j, i in enumerate(ready):
            req = requests[i]
            tree = static_tree_for(self.branching, req.max_drafts)
            tokens, probs = self._grow(req, tree, logits[:, j])
            n = req.max_drafts
            drafts[i] = Draft(tokens[:n], tree.truncated(n), torch.stack(probs[:n]) if probs else None)
        return drafts

    def _grow(self, req: DraftRequest, tree: DraftTree,
              logits: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
        """Tokens of the tree's nodes in level order (and, sampled, the q each came from)."""
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        parents = 1
        for d, level in enumerate(tree.levels):
            b = self.branching[d]
            if req.params.greedy:
                best = logits[d].topk(b).indices.tolist()
                tokens.extend(best * parents)
            else:
                q = distribution(logits[d : d + 1], req.params)[0]
                draws = torch.multinomial(q.expand(parents, -1), b, replacement=True,
                                          generator=req.generator)
                tokens.extend(draws.flatten().tolist())
                probs.extend([q] * (parents * b))
            parents = len(level)
        return tokens, probs
