"""A draft model cut from the target: its first L layers, final norm and LM head, saved as a
Hugging Face folder that servelm (`speculative_config={"method": "draft_model"}`) and
transformers (`generate(assistant_model=...)`) both load.

`servelm bench spec --draft-num-layers L` uses it when no `--draft-model` is given, so the
draft-model proposer can be measured on any target without a second checkpoint, and both
systems draft with the very same weights. Such a draft computes what servelm's layer_skip
proposer computes, but as a separate model with its own KV cache, which is what a real
draft model costs. The target is read with servelm's own loader (an HF folder or a GGUF,
dequantized to `dtype`), so the folder holds exactly the tensors servelm runs; it is cached
under `<servelm cache>/drafts/` keyed by the target's path, newest file time, L and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from servelm.bench.harness import check_int

DRAFT_WEIGHTS = "model.safetensors"


def default_drafts_dir() -> Path:
    from servelm.model.default_model import cache_root

    return cache_root() / "drafts"


def write_pruned_draft(model: str | None, num_layers: int, out_dir: Path | None = None,
                       dtype: torch.dtype | str = torch.float32) -> Path:
    """The folder of `model`'s first `num_layers` layers under `out_dir` (default
    `default_drafts_dir()`), written on first use and reused after."""
    from servelm.bench.hf_peer import resolve_model_path

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    check_int("num_layers", num_layers)
    source = resolve_model_path(model)
    if not source.exists():
        raise FileNotFoundError(f"model path {str(source)!r} does not exist")
    files = [p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source]
    stamp = max((p.stat().st_mtime_ns for p in files), default=0)  # a changed target: new key
    key = json.dumps([str(source), stamp, num_layers, str(torch_dtype)])
    name = (f"{source.stem if source.is_file() else source.name}-{num_layers}l-"
            f"{str(torch_dtype).removeprefix('torch.')}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    root = Path(out_dir) if out_dir is not None else default_drafts_dir()
    folder = root / name
    if (folder / DRAFT_WEIGHTS).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=root))
    try:
        _write(str(source), num_layers, torch_dtype, tmp)
        try:
            os.replace(tmp, folder)  # atomic: a reader never sees a half-written folder
        except OSError:  # another run wrote it meanwhile
            if not (folder / DRAFT_WEIGHTS).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write(source: str, num_layers: int, dtype: torch.dtype, folder: Path) -> None:
    from safetensors.torch import save_file

    from servelm.model.loader import load_model

    loaded = load_model(source, dtype)
    arch = loaded.arch
    if num_layers >= arch.num_layers:
        raise ValueError(f"draft num_layers must be below the target's {arch.num_layers} layers, "
                         f"got {num_layers}")
    config = hf_config(arch, num_layers)
    config.save_pretrained(folder)
    kept = {n: t.contiguous() for n, t in loaded.weights.items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < num_layers}
    save_file(kept, str(folder / DRAFT_WEIGHTS), metadata={"format": "pt"})
    loaded.tokenizer.save_pretrained(folder)
    gen = {"bos_token_id": arch.bos_token_id, "eos_token_id": list(arch.eos_token_ids)}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")


def hf_config(arch: Any, num_layers: int) -> Any:
    """A transformers config of `arch`'s family with `num_layers` layers (servelm's ModelArch
    reads every field back as it was)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch.family == "llama" and arch.qkv_bias:  # HF Llama's attention_bias also biases o_proj
        raise ValueError("a pruned draft of a Llama model with attention biases is not supported")
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
               "qwen3": Qwen3Config}
    rope = {"rope_theta": arch.rope_theta, "rope_type": "default", **(arch.rope_scaling or {})}
    kw: dict[str, Any] = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim, rms_norm_eps=arch.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings, bos_token_id=arch.bos_token_id,
        eos_token_id=list(arch.eos_token_ids) or None, hidden_act="silu",
    )
    if arch.family == "mistral":
        kw["sliding_window"] = arch.sliding_window
    elif arch.family in ("qwen2", "qwen3"):
        kw.update(use_sliding_window=arch.sliding_window is not None,
                  sliding_window=arch.sliding_window, max_window_layers=num_layers)
    config = classes[arch.family](**kw)
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    return config
