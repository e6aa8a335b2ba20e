"""`speculative_config`: which proposer drafts tokens and how many per step.

Accepted as a dict (offline API) or JSON (`--speculative-config`), with vLLM's key names.
Unknown methods and keys are errors that name the key, so a typo never silently turns
speculation off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from servelm.dict_option import parse_dict_option

METHODS = ("ngram", "draft_model", "layer_skip", "medusa", "eagle")
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
         "disable_by_batch_size", "model", "num_layers", "tree"}
MAX_TREE_NODES = 64
DEFAULT_DISABLE_BY_BATCH_SIZE = 8


@dataclass(frozen=True)
class SpecConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: shortest suffix n-gram to look up
    prompt_lookup_max: int = 4  # ngram: longest, tried first
    # No drafts while more requests than this are decoding: a big batch is compute-bound,
    # and verifying drafts that get rejected only adds work to it.
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    # draft_model: the draft's path (the target's tokenizer); medusa, eagle: the trained folder
    model: str | None = None
    num_layers: int | None = None  # layer_skip: how many of the target's layers draft
    # draft_model, layer_skip, medusa: children per node at each depth (SpecInfer token tree), e.g.
    # [3, 2, 1] drafts 3 + 6 + 6 nodes; None: a chain of num_speculative_tokens.
    tree: tuple[int, ...] | None = None

    def num_nodes(self, depth: int) -> int:
        """Draft tokens `depth` levels of drafting verify: a chain's depth, or a tree's nodes."""
        return num_tree_nodes(self.tree, depth) if self.tree else depth

    @classmethod
    def parse(cls, value: dict[str, Any] | str | None) -> SpecConfig | None:
        value = parse_dict_option("speculative_config", value, _KEYS)
        if value is None:
            return None
        method = value.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {method!r}")
        tree = value.get("tree")
        if tree is not None:
            if method == "ngram":
                raise ValueError("speculative_config.tree needs a draft that scores candidates: "
                                 "method 'draft_model', 'layer_skip' or 'medusa'")
            if (not isinstance(tree, (list, tuple)) or not tree
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in tree)):
                raise ValueError("speculative_config.tree must be a non-empty list of integers >= 1 "
                                 f"(children per node at each depth), got {tree!r}")
            tree = tuple(tree)
        k = value.get("num_speculative_tokens", len(tree) if tree else None)
        cfg = cls(method, k, *(value.get(key, d) for key, d in (
            ("prompt_lookup_min", 1), ("prompt_lookup_max", 4),
            ("disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE),
            ("model", None), ("num_layers", None))), tree=tree)
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                     "disable_by_batch_size"):
            _check_positive(name, getattr(cfg, name))
        if cfg.prompt_lookup_min > cfg.prompt_lookup_max:
            raise ValueError("speculative_config.prompt_lookup_min must be <= prompt_lookup_max, "
                             f"got {cfg.prompt_lookup_min} > {cfg.prompt_lookup_max}")
        if tree:
            if k != len(tree):
                raise ValueError(f"speculative_config.num_speculative_tokens ({k}) must equal the "
                                 f"depth of speculative_config.tree ({len(tree)})")
            nodes = num_tree_nodes(tree, len(tree))
            if nodes > MAX_TREE_NODES:
                raise ValueError(f"speculative_config.tree {list(tree)} has {nodes} nodes; "
                                 f"at most {MAX_TREE_NODES} are allowed")
        if tree and method == "eagle":
            raise ValueError("speculative_config.tree: method 'eagle' drafts a chain "
                             "(num_speculative_tokens); trees are for 'draft_model', "
                             "'layer_skip' and 'medusa'")
        if method in ("draft_model", "medusa", "eagle") and not isinstance(cfg.model, str):
            what = {"draft_model": "the draft model's", "medusa": "the Medusa heads'",
                    "eagle": "the EAGLE draft's"}[method]
            raise ValueError(f"speculative_config.model ({what} path) is required for method "
                             f"{method!r}, got {cfg.model!r}")
        if method == "layer_skip":
            _check_positive("num_layers", cfg.num_layers)
        return cfg


def num_tree_nodes(branching: tuple[int, ...], depth: int) -> int:
    """Draft nodes of the static tree `branching` cut at `depth` levels (a chain: depth)."""
    total, width = 0, 1
    for b in branching[:depth]:
        width *= b
        total += width
    return total


def _check_positive(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {v!r}")
