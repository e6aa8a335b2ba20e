"""Load a Hugging Face model folder: config.json, safetensors weights, tokenizer.

Only safetensors are read: they can be opened without running pickled code, and lazily, one
tensor at a time, so a sharded checkpoint never needs two copies in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from servelm.model.arch import ModelArch

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters save that the engine recomputes itself.
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)
_MIXTRAL_MOE = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.(gate|experts\.\d+\.w[123])\.weight")
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def canonical_name(name: str) -> str:
    """Mixtral's MoE tensors under the names the Qwen MoEs use (`mlp.gate`,
    `mlp.experts.E.gate_proj/up_proj/down_proj`), so one set of names serves sharding, shape
    checks and the model."""
    m = _MIXTRAL_MOE.fullmatch(name)
    if m is None:
        return name
    layer, part = m.groups()
    if part == "gate":
        return f"{layer}mlp.gate.weight"
    _, expert, w = part.split(".")
    return f"{layer}mlp.experts.{expert}.{_MIXTRAL_EXPERT[w]}.weight"


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, turning syntax errors into a ValueError that names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_hf_arch(folder: Path) -> ModelArch:
    """config.json -> ModelArch, with generation_config.json's stop tokens merged in.

    Instruct models often list their end-of-turn token only in generation_config.json
    (e.g. `<|im_end|>` next to `<|endoftext|>`); without it generation would run past the turn.
    """
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    arch = ModelArch.from_hf_config(read_json(cfg_path))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path)
        extra = gen.get("eos_token_id")
        extra = [extra] if isinstance(extra, int) else list(extra or [])
        merged = tuple(dict.fromkeys([*arch.eos_token_ids, *(int(x) for x in extra)]))
        bos = arch.bos_token_id if arch.bos_token_id is not None else gen.get("bos_token_id")
        arch = dataclasses.replace(arch, eos_token_ids=merged, bos_token_id=bos)
    return arch


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: one file, or the shards an index names."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' object")
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that do not exist: {missing}")
        return shards
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = f"; found {others}, which servelm does not load (convert to safetensors)" if others else ""
    raise ValueError(f"{folder} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def fused_parts(name: str, arch: ModelArch) -> list[tuple[str, slice]] | None:
    """Phi-3 keeps q, k and v in one `qkv_proj` and gate and up in one `gate_up_proj`: each
    part's name and rows, so the rest of servelm sees the Llama layout."""
    if name.endswith("self_attn.qkv_proj.weight"):
        base = name.removesuffix("qkv_proj.weight")
        q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        return [(base + "q_proj.weight", slice(0, q)), (base + "k_proj.weight", slice(q, q + kv)),
                (base + "v_proj.weight", slice(q + kv, q + 2 * kv))]
    if name.endswith("mlp.gate_up_proj.weight"):
        base, inner = name.removesuffix("gate_up_proj.weight"), arch.intermediate_size
        return [(base + "gate_proj.weight", slice(0, inner)), (base + "up_proj.weight", slice(inner, 2 * inner))]
    return None


def load_hf_weights(folder: Path, dtype: torch.dtype,
                    select: Callable[[str], tuple[str, tuple[slice, ...]] | None] | None = None,
                    arch: ModelArch | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor from the folder's safetensors file(s), cast to `dtype`. `select`
    (a parallel rank's, model/sharding.py): name -> (name to keep it under, slice to read),
    or None to skip it; a slice is read from the file without the rest of the tensor.
    With `arch`, fused tensors (`fused_parts`) are read whole and cut into their parts."""
    weights: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_DROPPED_SUFFIXES):
                        continue
                    canonical = canonical_name(name)
                    parts = None if arch is None else fused_parts(canonical, arch)
                    if parts is not None:
                        _put_parts(weights, f.get_tensor(name), parts, select, dtype)
                        continue
                    picked = (canonical, None) if select is None else select(canonical)
                    if picked is None:
                        continue
                    local, index = picked
                    if local in weights:
                        raise ValueError(f"tensor {name!r} appears in more than one shard ({path.name})")
                    tensor = f.get_tensor(name) if not index else f.get_slice(name)[index]
                    weights[local] = tensor.to(dtype)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise ValueError(f"cannot read safetensors file {path}: {e}") from None
    return weights


def _put_parts(weights: dict[str, torch.Tensor], whole: torch.Tensor, parts: list[tuple[str, slice]],
               select: Callable[[str], tuple[str, tuple[slice, ...]] | None] | None,
               dtype: torch.dtype) -> None:
    for part, rows in parts:
        picked = (part, ()) if select is None else select(part)
        if picked is None:
            continue
        local, index = picked
        t = whole[rows]
        weights[local] = (t[index] if index else t).to(dtype).clone()  # not a view of `whole`


def load_hf_tokenizer(folder: Path) -> Any:
    """Load the folder's tokenizer with transformers (it also picks up the chat template)."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / f).is_file() for f in files):
        raise ValueError(f"{folder} has no tokenizer (none of {', '.join(files)}); give one with "
                         "--tokenizer PATH (tokenizer=...), or run on token ids with "
                         "--skip-tokenizer-init")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer from {folder}: {e}") from None
