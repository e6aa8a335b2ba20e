"""Load a GGUF file (llama.cpp's format) into Hugging Face parameter names and layout.

Everything downstream speaks HF: the config dict built here goes through the same
`ModelArch.from_hf_config` as an HF folder, and tensors are renamed, dequantized and (for the
llama family) un-permuted so that the model code never needs to know where weights came from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from servelm.model.arch import ModelArch
from servelm.model.default_model import cache_root
from servelm.model.gguf_moe import MOE_ARCHITECTURES, MOE_LAYER_NAMES, moe_config, split_experts
from servelm.model.sharding import Index, Shard, index_shape
from servelm.ops.quant import BlockBF16, BlockQ4, BlockQ8, QuantWeight, map_rows

logger = logging.getLogger(__name__)

# general.architecture -> HF class. A GGUF "llama" may be a Mistral; its math is the same.
# A "llama" with experts is a Mixtral (gguf_moe.py).
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  **MOE_ARCHITECTURES}
_T = GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = (_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1)
_BLOCK_TYPES = (_T.Q8_0, _T.Q4_0, _T.Q4_1)
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    **MOE_LAYER_NAMES,
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama3-style per-dimension rope divisors, not a weight


class _FastReader(GGUFReader):
    """GGUFReader that slices a plain ndarray view of its memory map instead of the np.memmap.

    Every np.memmap slice runs Python-level bookkeeping, and the stock reader makes one or two
    slices per vocabulary entry and merge: ~4 s for a 49k vocab. A plain view of the same
    mapping shares the memory and parses it in about a third of the time.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt, count = np.dtype(dtype), int(count)
        arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


def open_gguf(path: Path) -> GGUFReader:
    try:
        return _FastReader(str(path), "r")
    except Exception:  # the speed-up relies on a private method; the stock reader decides
        pass
    try:
        return GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises assorted errors on damaged or foreign files
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def gguf_config(reader: GGUFReader, path: Path) -> dict[str, Any]:
    """Translate GGUF metadata into an HF-style config dict for ModelArch.from_hf_config."""
    name = _field(reader, "general.architecture")
    if name not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {name!r} (general.architecture); "
            f"servelm supports {sorted(_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"{name}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata field {name}.{key!r} is missing")
        return value

    heads = int(need("attention.head_count"))
    kv_heads = _field(reader, f"{name}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # some converters store one count per layer
        if len(set(kv_heads)) != 1:
            raise ValueError(f"{path}: per-layer KV head counts {sorted(set(kv_heads))} are not supported")
        kv_heads = kv_heads[0]
    hidden = int(need("embedding_length"))
    head_dim = (_field(reader, f"{name}.attention.key_length")
                or _field(reader, f"{name}.rope.dimension_count") or hidden // heads)
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    tokens = reader.get_field("tokenizer.ggml.tokens")  # its .data has one index per token
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    cfg: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[name]],
        "model_type": name,
        # The embedding's row count is what the logits really cover; the token list may be padded.
        "vocab_size": int(embd.shape[-1]) if embd is not None else len(tokens.data if tokens else []),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{name}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{name}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(int(e) for e in eos if e is not None)),
    }
    cfg["rope_scaling"] = _rope_scaling(reader, name, cfg, tensors.get(_ROPE_FREQS), path)
    cfg |= moe_config(partial(_field, reader), name, list(tensors))
    return cfg


def _rope_scaling(reader: GGUFReader, name: str, cfg: dict[str, Any], freqs: Any,
                  path: Path) -> dict[str, Any] | None:
    """Rope scaling lives in metadata (linear, yarn) or, for Llama 3.x, in a factor tensor."""
    if freqs is not None:
        factors = np.asarray(dequantize(freqs.data, freqs.tensor_type), dtype=np.float64).ravel()
        scaling = llama3_scaling_from_factors(factors, cfg["rope_theta"], cfg["head_dim"])
        if scaling is None:
            raise ValueError(f"{path}: {_ROPE_FREQS} does not match llama3 rope scaling; unsupported")
        return scaling
    kind = _field(reader, f"{name}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(_field(
        reader, f"{name}.rope.scaling.factor", 1.0))}
    orig = _field(reader, f"{name}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def llama3_scaling_from_factors(factors: np.ndarray, theta: float,
                                head_dim: int) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's per-dimension divisors.

    llama.cpp stores Llama 3.x rope scaling as a tensor of divisors, one per rotary frequency,
    not as parameters. Only the ratios of (original context, low, high) matter to the formula,
    so fix the original context at 8192, fit low/high from the smoothly blended dimensions, and
    accept the result only if it reproduces every divisor. Returns None when it does not.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape or factors.max() <= 1.0:
        return None
    factor, old = round(float(factors.max()), 4), 8192.0  # undo float32 storage noise
    wavelen = 2 * np.pi / inv_freq
    mid = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    low, high = 1.0, 4.0  # Meta's values, for when too few blended dimensions exist to fit
    if mid.sum() >= 2:
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, icpt = np.polyfit(old / wavelen[mid], smooth, 1)  # smooth = (old/wl - low)/(high-low)
        low, high = round(float(-icpt / slope), 4), round(float((1 - icpt) / slope), 4)
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1 / ((1 - smooth) / factor + smooth)
    if not np.allclose(expected, factors, rtol=1e-3):
        return None
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": int(old)}


def _reverse_llama_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for llama-family GGUFs.

    llama.cpp rotates adjacent pairs (x0, y0, x1, y1, ...) within each head, so its converter
    reorders each head's rows from HF's halves layout (x0, x1, ..., y0, y1, ...) into pairs.
    Here each head's rows are viewed as (half, 2) and transposed back to (2, half).
    """
    half = w.shape[0] // n_heads // 2
    rest = w.shape[1:]
    return w.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _blocks(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> BlockQ8 | BlockQ4:
    """A Q8_0/Q4_0/Q4_1 tensor's own blocks of 32 weights: an fp16 scale d (Q4_1: and an
    fp16 min m), then the values, Q8_0 as 32 signed bytes (w = q * d), Q4 as 16 bytes whose
    low nibbles are weights 0-15 and high nibbles 16-31 (Q4_1: w = q * d + m; Q4_0:
    w = (q - 8) * d, that is m = -8 d). The bytes are kept as they are."""
    n, k = shape
    blocks = np.ascontiguousarray(data).reshape(n, k // 32, -1)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
    if qtype == _T.Q8_0:
        q = torch.from_numpy(blocks[..., 2:34].copy().view(np.int8).reshape(n, k))
        return BlockQ8(q.clamp_(-127, 127), d)
    if qtype == _T.Q4_1:
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
        qs = blocks[..., 4:20]
    else:
        m = -8 * d
        qs = blocks[..., 2:18]
    return BlockQ4(torch.from_numpy(qs.copy().reshape(n, k // 2)), d, m)


def has_blocks(path: Path) -> bool:
    """Whether the file's layer matrices include Q8_0/Q4_0/Q4_1 blocks or BF16 (kept as stored).

    Asked twice while an engine is built, and answering means parsing the whole file's
    metadata (about a second for a 49k vocab), so the answer is kept in the local cache
    beside the tokenizer's: a replica started again (a cold start) skips both parses."""
    facts = cache_root() / "gguf-facts"
    name = f"{path.stem}-{_tokenizer_cache_key(path)}-blocks"
    for answer in (True, False):
        if (facts / f"{name}-{answer}").exists():
            return answer
    answer = any(t.tensor_type in _BLOCK_TYPES + (_T.BF16,) and t.name.startswith("blk.")
                 for t in open_gguf(path).tensors)
    try:
        facts.mkdir(parents=True, exist_ok=True)
        (facts / f"{name}-{answer}").touch()
    except OSError as e:  # a read-only cache only costs speed next time
        logger.warning("could not cache what %s holds: %s", path, e)
    return answer


def _read_slice(t: Any, data: np.ndarray, shape: tuple[int, ...], index: Index, path: Path) -> np.ndarray:
    """`index` (rows, or all rows and a range of columns) of a matrix's stored `data` (of
    tensor `t`), read from the memory map without the rest. A stored row is `shape[-1]`
    columns in whole blocks, so a column range must start and end on block boundaries."""
    if not index:
        return data
    if len(index) == 1:
        return data[index[0]]
    cols, units = index[1], data.shape[-1]
    lo, hi = cols.start * units, cols.stop * units
    block_cols = GGML_QUANT_SIZES[t.tensor_type][0]
    if cols.start % block_cols or cols.stop % block_cols:
        raise ValueError(f"{path}: cannot split {t.name!r} ({t.tensor_type.name}, {shape[-1]} columns) "
                         f"at columns {cols.start}-{cols.stop}: not on its block boundaries; "
                         "choose another tensor_parallel_size")
    return data[:, lo // shape[-1]:hi // shape[-1]]


def load_gguf_weights(reader: GGUFReader, arch: ModelArch, dtype: torch.dtype, path: Path,
                      keep_blocks: bool = False,
                      shard: Shard | None = None) -> dict[str, torch.Tensor | QuantWeight]:
    """Every tensor in HF names and layout. With `keep_blocks`, Q8_0/Q4_0/Q4_1 matrices stay
    in their blocks and BF16 ones (unless `dtype` is bfloat16 anyway) as BlockBF16 (ops.quant,
    run by kernels that read them as they are); everything else, and everything without
    `keep_blocks`, is dequantized and cast to `dtype`. `shard`: only what a parallel rank
    holds (model/sharding.py), read as slices of the file, under stage-local names."""
    weights: dict[str, torch.Tensor | QuantWeight] = {}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue
        hf = _hf_name(t.name)
        if hf is None:
            raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r} (not a {arch.family} weight)")
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            allowed = [q.name for q in SUPPORTED_TENSOR_TYPES]
            raise ValueError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}; servelm dequantizes {allowed}"
            )
        # GGUF lists dims fastest-first (ne[0] = columns); torch wants them slowest-first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        permute = arch.family in ("llama", "mistral", "mixtral") and (".attn_q." in t.name or ".attn_k." in t.name)
        for name, data, part in split_experts(hf, t.data, shape):  # an MoE's stacks per expert
            index: Index = ()
            if shard is not None and not shard.is_whole:
                picked = shard.select(name, arch)
                if picked is None:
                    continue
                name, index = picked
            stored = _read_slice(t, data, part, index, path)
            weights[name] = _convert(t, stored, index_shape(part, index), dtype, keep_blocks, permute,
                                     arch.head_dim, path)
    return weights


def _convert(t: Any, stored: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype, keep_blocks: bool,
             permute: bool, head_dim: int, path: Path) -> torch.Tensor | QuantWeight:
    """One matrix or vector of tensor `t` as servelm holds it: blocks kept (`keep_blocks`),
    or dequantized and cast to `dtype`; llama q/k rows un-permuted."""
    heads = shape[0] // head_dim  # whole heads: a shard's rows hold some of them
    if keep_blocks and t.tensor_type in _BLOCK_TYPES and len(shape) == 2:
        blocks = _blocks(stored, t.tensor_type, shape)
        return map_rows(blocks, partial(_reverse_llama_permute, n_heads=heads)) if permute else blocks
    if keep_blocks and t.tensor_type == _T.BF16 and len(shape) == 2 and dtype != torch.bfloat16:
        rows = torch.from_numpy(np.array(stored).view(np.int16).reshape(shape)).view(torch.bfloat16)
        return BlockBF16(_reverse_llama_permute(rows, heads) if permute else rows)
    try:
        data = dequantize(stored, t.tensor_type)
    except Exception as e:
        raise ValueError(f"{path}: cannot decode tensor {t.name!r}: {e}") from None
    if not data.flags.writeable:  # F32 comes back as a read-only view of the file
        data = data.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(data).reshape(shape)).to(dtype)
    return _reverse_llama_permute(tensor, heads) if permute else tensor


def _tokenizer_cache_key(path: Path) -> str:
    """Hash of the file's path, size and modification time: found without parsing the
    file (seconds for a 49k vocab), and a changed file gets a new key."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]


def load_gguf_tokenizer(path: Path, reader: GGUFReader | None = None) -> Any:
    """Rebuild the tokenizer (and chat template) from GGUF metadata via transformers,
    cached on disk.

    transformers' GGUF tokenizer conversion is correct but slow (seconds for a 49k vocab), so
    its result is saved once under the servelm cache; a cache hit does not even parse the
    file (`reader`, when the caller has one open, saves that on a miss).
    """
    from transformers import AutoTokenizer

    cache = cache_root() / "tokenizers" / f"{path.stem}-{_tokenizer_cache_key(path)}"
    if (cache / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception as e:
            logger.warning("ignoring unreadable tokenizer cache %s: %s", cache, e)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ValueError(f"{path}: cannot build a tokenizer from GGUF metadata: {e}") from None
    template = _field(reader or open_gguf(path), "tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    _save_atomically(tok, cache)
    return tok


def _save_atomically(tok: Any, target: Path) -> None:
    """Write into a temp folder then rename, so a concurrent reader never sees half a cache."""
    tmp = target.parent / f".tmp-{os.getpid()}-{target.name}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError as e:  # a read-only or contended cache only costs speed next time
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():  # else another process cached it first, which is fine
            logger.warning("could not cache tokenizer at %s: %s", target, e)


def load_gguf(path: str | Path, dtype: torch.dtype, keep_blocks: bool = False,
              with_tokenizer: bool = True, shard: Shard | None = None,
              ) -> tuple[ModelArch, dict[str, torch.Tensor | QuantWeight], Any]:
    """Read a GGUF file into (arch, HF-named weights, tokenizer or None)."""
    path = Path(path)
    reader = open_gguf(path)
    arch = ModelArch.from_hf_config(gguf_config(reader, path))
    if shard is not None:
        shard.check(arch)
    weights = load_gguf_weights(reader, arch, dtype, path, keep_blocks, shard)
    tokenizer = load_gguf_tokenizer(path, reader) if with_tokenizer else None
    return arch, weights, tokenizer
