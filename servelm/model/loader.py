"""One entry point that turns "a model the user named" into arch + weights + tokenizer.

Whatever the source (HF folder or GGUF file), the result uses Hugging Face parameter names and
layouts, so model code and tests compare against transformers with no translation. All input
problems are caught here, at the edge, with a message naming the file or field at fault.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from servelm.model.arch import ModelArch
from servelm.model.default_model import default_model_path
from servelm.model.gguf_loader import (
    gguf_config,
    has_blocks,
    load_gguf,
    load_gguf_tokenizer,
    open_gguf,
)
from servelm.model.hf_loader import load_hf_arch, load_hf_tokenizer, load_hf_weights
from servelm.model.layers.moe import mlp_weight_shapes
from servelm.model.sharding import Shard, index_shape

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class LoadedModel:
    """A model ready to build: its shape, its HF-named weights (cast), and its tokenizer."""

    arch: ModelArch
    weights: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase | None  # None when loaded without it
    source: str


def load_model(model: str | None, dtype: torch.dtype = torch.float32,
               keep_blocks: bool = False, with_tokenizer: bool = True,
               shard: Shard | None = None) -> LoadedModel:
    """Load `model`: None (the default GGUF), an HF folder, a folder with one .gguf, or a .gguf.
    `keep_blocks`: a GGUF's Q8_0/Q4_0/Q4_1 matrices stay in their blocks (`ops.quant`)
    instead of being dequantized to `dtype`. `with_tokenizer=False`: weights and
    shape only (a worker needs no tokenizer; rebuilding a GGUF's takes seconds). `shard`:
    read only the slices a tensor/pipeline-parallel rank holds (model/sharding.py), under
    stage-local layer names; `arch` stays the whole model's.

    Raises FileNotFoundError for a path that does not exist and ValueError for anything else
    that servelm cannot load (bad config, damaged or incomplete weights, unsupported types).
    """
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; allowed: {[str(d) for d in ALLOWED_DTYPES]}")
    path = Path(default_model_path() if model is None else model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    path = path.resolve()
    start = time.perf_counter()
    gguf = _gguf_in(path)
    if gguf is not None:
        arch, weights, tokenizer = load_gguf(gguf, dtype, keep_blocks, with_tokenizer, shard)
        source = gguf
    else:
        arch = load_hf_arch(path)
        if shard is not None:
            shard.check(arch)
        weights = load_hf_weights(path, dtype, _selector(arch, shard), arch)
        tokenizer = load_hf_tokenizer(path) if with_tokenizer else None
        source = path
    if arch.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # tied: the embedding matrix is the head
    check_weights(arch, weights, str(source), shard)
    if not arch.eos_token_ids and getattr(tokenizer, "eos_token_id", None) is not None:
        arch = replace(arch, eos_token_ids=(int(tokenizer.eos_token_id),))
    logger.info("loaded %s (%s, %d layers) in %.1fs", source, arch.family, arch.num_layers,
                time.perf_counter() - start)
    return LoadedModel(arch=arch, weights=weights, tokenizer=tokenizer, source=str(source))


def load_arch(model: str | None) -> ModelArch:
    """Only the shape of what `load_model(model)` would load: read from config.json or the
    GGUF's metadata, no weights."""
    path = Path(default_model_path() if model is None else model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    gguf = _gguf_in(path.resolve())
    if gguf is not None:
        return ModelArch.from_hf_config(gguf_config(open_gguf(gguf), gguf))
    return load_hf_arch(path.resolve())


def load_tokenizer(model: str | None) -> PreTrainedTokenizerBase:
    """Only the tokenizer of what `load_model(model)` would load (clients, benchmarks)."""
    path = Path(default_model_path() if model is None else model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    path = path.resolve()
    gguf = _gguf_in(path)
    if gguf is not None:
        return load_gguf_tokenizer(gguf)
    return load_hf_tokenizer(path)


def gguf_with_blocks(model: str | None) -> bool:
    """Whether `model` (as load_model takes it) is a GGUF whose layers hold quantized blocks."""
    path = Path(default_model_path() if model is None else model).expanduser()
    gguf = _gguf_in(path) if path.exists() else None
    return gguf is not None and has_blocks(gguf)


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 / AMX, Arm BF16)."""
    try:
        flags = next((line for line in Path(cpuinfo).read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "").split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def block_weights(model: str | None, quantization: str) -> bool:
    """Whether the matmul weights will be quantized blocks (ops/quant.py)."""
    return quantization in ("int8", "int4") or (quantization == "auto" and gguf_with_blocks(model))


def compute_dtype(dtype: str, model: str | None, quantization: str, device: str = "cpu") -> torch.dtype:
    """The torch dtype for `dtype` (config.DTYPES) on `device` (config.DEVICES). auto:
    bfloat16 on CUDA (tensor cores; the Triton block kernels take it too); on CPU float32
    where the matmul weights stay block-quantized, since the C block kernels take float32
    activations and bfloat16 would only add conversions; else bfloat16 where the CPU has it
    natively; else float32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.bfloat16
    return torch.float32 if block_weights(model, quantization) or not native_bf16() else torch.bfloat16


def kv_storage(kv_cache_dtype: str, dtype: torch.dtype, model: str | None, quantization: str) -> str:
    """kv_cache_dtype with "auto" resolved: bfloat16 under block weights (their arithmetic
    is approximate already, and 16 bits halve what attention reads, as llama.cpp's fp16
    cache does), else the compute dtype."""
    if kv_cache_dtype != "auto":
        return kv_cache_dtype
    return "bfloat16" if block_weights(model, quantization) else str(dtype).removeprefix("torch.")


def _gguf_in(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the single .gguf in a folder without config.json."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf or an HF model folder")
        return path
    if (path / "config.json").is_file():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds several .gguf files {[g.name for g in ggufs]}; name one")
    return ggufs[0] if ggufs else None


def _selector(arch: ModelArch, shard: Shard | None):
    return None if shard is None or shard.is_whole else (lambda name: shard.select(name, arch))


def expected_weight_shapes(arch: ModelArch, shard: Shard | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter the model needs for `arch`, with its HF shape (out, in); with a
    `shard`, the part that rank holds, under its local names."""
    shapes = _whole_weight_shapes(arch)
    if shard is None or shard.is_whole:
        return shapes
    local = {}
    for name, shape in shapes.items():
        picked = shard.select(name, arch)
        if picked is not None:
            local[picked[0]] = index_shape(shape, picked[1])
    return local


def _whole_weight_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            **mlp_weight_shapes(arch, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if arch.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if arch.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (arch.head_dim,),
                       p + "self_attn.k_norm.weight": (arch.head_dim,)}
        if arch.sandwich_norms:
            shapes |= {p + "pre_feedforward_layernorm.weight": (h,),
                       p + "post_feedforward_layernorm.weight": (h,)}
    return shapes


def check_weights(arch: ModelArch, weights: dict[str, torch.Tensor], source: str,
                  shard: Shard | None = None) -> None:
    """Refuse missing, unexpected or misshapen tensors: each would silently corrupt outputs."""
    expected = expected_weight_shapes(arch, shard)
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ValueError(f"{source}: {len(missing)} weight(s) missing for {arch.family}: {_few(missing)}")
    extra = [k for k in weights if k not in expected]
    if extra:
        raise ValueError(f"{source}: unexpected weight(s) for {arch.family}: {_few(extra)}")
    bad = [f"{k} {tuple(weights[k].shape)} != {s}" for k, s in expected.items()
           if tuple(weights[k].shape) != s]
    if bad:
        raise ValueError(f"{source}: weight shape mismatch: {_few(bad)}")


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
