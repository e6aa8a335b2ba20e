"""One C call per decode step for all layers of a Llama-family model (csrc/decoder.c).

The model binds its weights and KV caches once (`FusedDecoder(...)`); each decode-only
step then passes the residual rows, positions, cache slots, block tables and context
lengths. It runs only where its arithmetic is the torch path's: float32 activations,
block-quantized or bfloat16 matmul weights (ops/quant.py) and a float32 or bfloat16 KV cache; anything
else keeps the per-op torch path, which stays the reference.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from servelm.ops import c_build, qgemm
from servelm.ops.qgemm import ptr
from servelm.ops.quant import BlockBF16, BlockQ4, BlockQ8, QuantWeight, kernel_layout

_P = ctypes.c_void_p


class _QWeight(ctypes.Structure):
    _fields_ = [("q", _P), ("d", _P), ("m", _P), ("d8", _P), ("m8", _P), ("s8", _P), ("qi", _P),
                ("bf16", _P), ("group", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [(n, _QWeight) for n in ("qkv", "o", "gate_up", "down")] + [
        (n, _P) for n in ("input_norm", "post_norm", "qkv_bias", "q_norm", "k_norm", "k_cache", "v_cache")]


class _Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("hidden", "intermediate", "num_heads", "num_kv", "head_dim",
                                              "block_size")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", _P), ("sin", _P), ("kv16", ctypes.c_int64),
        ("allreduce", _P), ("allreduce_ctx", _P)]


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    lib = c_build.load("decoder")
    if lib is None:
        return None
    lib.decoder_layers.argtypes = [_P, ctypes.c_int64, _P, _P, ctypes.c_int64, _P, _P, _P,
                                   ctypes.c_int64, _P]
    lib.decoder_layers.restype = ctypes.c_int
    return lib


@dataclass
class LayerWeights:
    """One layer as the kernel reads it; the tensors must outlive the FusedDecoder."""

    qkv: QuantWeight
    o: QuantWeight
    gate_up: QuantWeight
    down: QuantWeight
    input_norm: Tensor
    post_norm: Tensor
    qkv_bias: Tensor | None
    q_norm: Tensor | None
    k_norm: Tensor | None
    kv_cache: Tensor  # [2, slots, num_kv, head_dim] float32 or bfloat16


MAX_HEAD_DIM, MAX_GROUP = 512, 64  # decoder.c's buffers: head size, query heads per KV head


def supported(layers: list[LayerWeights], num_heads: int, num_kv: int, head_dim: int) -> bool:
    """Whether every layer is in the one form the kernel runs, within its sizes (and the
    kernel is built)."""
    floats = [t for lw in layers for t in (lw.input_norm, lw.post_norm, lw.qkv_bias, lw.q_norm, lw.k_norm)
              if t is not None]
    weights = [w for lw in layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down)]
    return (head_dim <= MAX_HEAD_DIM and num_heads // num_kv <= MAX_GROUP
            and all(isinstance(w, (BlockQ8, BlockQ4)) and qgemm.fits(w.shape[1])
                    or isinstance(w, BlockBF16) and w.w.is_contiguous() for w in weights)
            and all(isinstance(lw.kv_cache, Tensor) and lw.kv_cache.dtype == layers[0].kv_cache.dtype
                    in (torch.float32, torch.bfloat16) and lw.kv_cache.is_contiguous()
                    and lw.kv_cache.device.type == "cpu" for lw in layers)
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in floats)
            and load() is not None)


def _qweight(w: QuantWeight) -> _QWeight:
    if isinstance(w, BlockBF16):
        return _QWeight(bf16=w.w.data_ptr())
    d8, second, qi = kernel_layout(w)
    if isinstance(w, BlockQ8):
        return _QWeight(w.q.data_ptr(), w.d.data_ptr(), None, ptr(d8), None, ptr(second), ptr(qi), None,
                        w.group_size)
    return _QWeight(w.packed.data_ptr(), w.d.data_ptr(), w.m.data_ptr(), ptr(d8), ptr(second), None, ptr(qi),
                    None, w.group_size)


class FusedDecoder:
    def __init__(self, layers: list[LayerWeights], intermediate: int, num_heads: int, num_kv: int,
                 head_dim: int, block_size: int, eps: float, cos: Tensor, sin: Tensor,
                 allreduce: tuple[int, int] | None = None) -> None:
        """`allreduce`: under tensor parallelism, the C function and context that sum the
        output and down projections over the ranks (distributed/shm_allreduce.py)."""
        assert supported(layers, num_heads, num_kv, head_dim) and cos.dtype == sin.dtype == torch.float32
        self._keep = (layers, cos.contiguous(), sin.contiguous())
        self._layers = (_Layer * len(layers))(*(
            _Layer(_qweight(lw.qkv), _qweight(lw.o), _qweight(lw.gate_up), _qweight(lw.down),
                   lw.input_norm.data_ptr(), lw.post_norm.data_ptr(), ptr(lw.qkv_bias), ptr(lw.q_norm),
                   ptr(lw.k_norm), lw.kv_cache[0].data_ptr(), lw.kv_cache[1].data_ptr())
            for lw in layers))
        hidden = layers[0].input_norm.shape[0]
        self._dims = _Dims(hidden, intermediate, num_heads, num_kv, head_dim, block_size, eps,
                           head_dim**-0.5, self._keep[1].data_ptr(), self._keep[2].data_ptr(),
                           int(layers[0].kv_cache.dtype == torch.bfloat16), *(allreduce or (None, None)))
        self.num_layers = len(layers)

    def forward(self, x: Tensor, positions: Tensor, slots: Tensor, block_tables: Tensor,
                context_lens: Tensor, num_layers: int | None = None) -> Tensor:
        """x [T, hidden] float32, updated in place through the layers and returned; row r
        (position positions[r]) writes its K/V to cache slot slots[r] and attends to
        context_lens[r] cache indices through block_tables[r]."""
        n = self.num_layers if num_layers is None else min(num_layers, self.num_layers)
        x = x.contiguous()
        tables = block_tables.contiguous()
        rc = load().decoder_layers(
            ctypes.byref(self._layers), n, ctypes.byref(self._dims), x.data_ptr(), x.shape[0],
            positions.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1],
            context_lens.data_ptr())
        if rc != 0:
            why = {-2: "out of memory", -3: "a tensor-parallel rank did not reach the all-reduce"}
            raise RuntimeError(f"fused decoder kernel failed ({why.get(rc, rc)})")
        return x
