"""An analytical step-time model for GPUs that are not here: FLOPs and bytes on a roofline.

A step is the batch the scheduler made. Per pipeline stage, per tensor-parallel rank (the
matmuls, heads and vocabulary split evenly over `tp` ranks), three groups of kernels run
one after another, each as long as the larger of its compute time, FLOPs / (peak x
compute_efficiency), and its memory time, bytes / (bandwidth x bandwidth_efficiency):
- the layers' matmuls: 2 x matmul weights x tokens FLOPs; the weights are read once a step;
- attention: 4 x heads x head_dim FLOPs per (query, key) pair, reading each scheduled
  request's K/V up to its chunk's end once and writing the new tokens' K/V;
- the lm_head: only at sampled positions (one per request in the step, plus its drafts),
  its weights read once when any position samples.
One max per kernel group, not per stage: a prefill chunk's matmuls do not hide the K/V
reads of the decodes batched with it, as they are separate kernels.
Tensor parallelism adds two ring all-reduces of the activations per layer (and one for the
vocab-parallel embedding, one gather of the sampled logits): 2 (tp-1)/tp x tokens x hidden
x 2 bytes / (link x link_efficiency) + the link's latency each. Pipeline stages run one
after another within a step (the simulator runs one step per replica at a time, so no
micro-batches overlap: with pp > 1 this is a step's latency and a conservative
throughput), with the activations sent between stages. A fixed per-step overhead
(scheduling, sampling, kernel launches) is added once.
Not counted: activations' memory traffic, norms, rotary embeddings, int4 group scales,
and fp8/int8 tensor cores (every matmul runs at the 16-bit peak).

Sanity check (tests/unit/test_roofline_model.py): Llama-3-8B in bf16 on one H100 decodes a
single sequence in 15.0 GB / (3350 GB/s x 0.8) = 5.6 ms + the overhead, and prefills 2048
tokens in 2 x 7.0e9 x 2048 / (989 TFLOP/s x 0.7) = 41 ms of matmuls.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servelm.simulate.hardware import GPUSpec
from servelm.simulate.model_shape import ModelShape
from servelm.step_io import ScheduledRequest, SchedulerOutput

WEIGHT_DTYPES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
KV_DTYPES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
ACT_BYTES = 2  # activations in bf16: what the all-reduces and pipeline sends carry
EMBED_BYTES = 2  # embedding and lm_head stay 16-bit in quantized checkpoints (AWQ, GPTQ)
LOGIT_BYTES = 4  # float32 logits, as sampling reads them
RUNTIME_RESERVE_GIB = 1.0  # CUDA context, cuBLAS and NCCL workspaces (assumption)
GIB = 2**30


@dataclass(frozen=True)
class _Stage:
    layers: int
    first: bool
    last: bool


@dataclass
class RooflineStepModel:
    """`.seconds(step)` like StepTimeModel; `source["engine"]` is the replica it sizes."""

    gpu: GPUSpec
    shape: ModelShape
    tp: int = 1
    pp: int = 1
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    compute_efficiency: float = 0.7  # achievable share of peak FLOP/s on large matmuls
    bandwidth_efficiency: float = 0.8  # achievable share of the memory bandwidth
    link_efficiency: float = 0.8  # achievable share of the link (NCCL bus bandwidth)
    step_overhead_s: float = 0.0015  # Python scheduling, sampling, launches (no CUDA graphs)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.shape
        for name, allowed in (("weight_dtype", WEIGHT_DTYPES), ("kv_dtype", KV_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')}: {getattr(self, name)!r} is not one "
                                 f"of {', '.join(allowed)}")
        for name in ("tp", "pp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("compute_efficiency", "bandwidth_efficiency", "link_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got "
                                 f"{getattr(self, name)}")
        if not self.step_overhead_s >= 0:
            raise ValueError(f"--step-overhead-ms must be >= 0, got {self.step_overhead_s * 1e3}")
        if s.num_heads % self.tp:
            raise ValueError(f"--tp {self.tp} must divide num_attention_heads ({s.num_heads})")
        if s.num_kv_heads % self.tp and self.tp % s.num_kv_heads:
            raise ValueError(f"--tp {self.tp} must divide num_key_value_heads ({s.num_kv_heads}) "
                             "or be a multiple of it")
        if self.pp > s.num_layers:
            raise ValueError(f"--pp {self.pp} is more than the model's {s.num_layers} layers")
        base, extra = divmod(s.num_layers, self.pp)
        self._stages = [_Stage(base + (i < extra), i == 0, i == self.pp - 1) for i in range(self.pp)]
        self._flops = self.gpu.peak_tflops * 1e12 * self.compute_efficiency
        self._bw = self.gpu.mem_bandwidth_gbs * 1e9 * self.bandwidth_efficiency
        self._link = self.gpu.link_gbs * 1e9 * self.link_efficiency
        self._latency = self.gpu.link_latency_us * 1e-6
        # K/V heads a rank holds: replicated when there are fewer than ranks
        self._kv_heads = math.ceil(s.num_kv_heads / self.tp)
        self._kv_token_layer = 2 * self._kv_heads * s.head_dim * KV_DTYPES[self.kv_dtype]
        # read for every simulated step: computed once
        self._layer_params, self._embedding_params = s.layer_params, s.embedding_params

    # -- time ------------------------------------------------------------------------------

    def seconds(self, step: SchedulerOutput, after_idle: bool = False) -> float:
        return self.step_seconds(step.scheduled)  # a GPU idles warm: no wake-up cost

    def step_seconds(self, items: list[ScheduledRequest]) -> float:
        tokens, sampled = 0, len(items)
        keys = kv_read = 0.0
        for s in items:
            n, c = s.num_new_tokens, s.num_computed_tokens - s.num_evicted_tokens
            tokens += n
            keys += n * c + n * (n + 1) / 2  # token i of the chunk attends c + i + 1 keys
            kv_read += c
            sampled += s.num_draft_tokens
        return sum(self.breakdown(tokens, sampled, keys, kv_read + tokens).values())

    def breakdown(self, tokens: int, sampled: int, keys: float, kv_read: float) -> dict[str, float]:
        """Seconds by part for a step of `tokens` new tokens, `sampled` sampled positions,
        `keys` (query, key) pairs and `kv_read` tokens of K/V read."""
        s, tp, w = self.shape, self.tp, WEIGHT_DTYPES[self.weight_dtype]
        out = {"matmul": 0.0, "attention": 0.0, "lm_head": 0.0, "all_reduce": 0.0,
               "pipeline_send": 0.0, "overhead": self.step_overhead_s}
        if tokens == 0:
            return out
        act = tokens * s.hidden_size * ACT_BYTES
        for st in self._stages:
            out["matmul"] += self._roof(2 * st.layers * self._layer_params * tokens / tp,
                                        st.layers * self._layer_params * w / tp)
            out["attention"] += self._roof(
                4 * st.layers * s.num_heads * s.head_dim * keys / tp,
                st.layers * self._kv_token_layer * (kv_read + tokens))
            if st.last and sampled:
                out["lm_head"] += self._roof(2 * self._embedding_params * sampled / tp,
                                             self._embedding_params * EMBED_BYTES / tp)
            if tp > 1:
                calls = 2 * st.layers + st.first
                out["all_reduce"] += calls * (2 * (tp - 1) / tp * act / self._link + self._latency)
                if st.last and sampled:
                    logits = sampled * s.vocab_size * LOGIT_BYTES
                    out["all_reduce"] += (tp - 1) / tp * logits / self._link + self._latency
            if not st.last:
                out["pipeline_send"] += act / self._link + self._latency
        return out

    def _roof(self, flops: float, nbytes: float) -> float:
        return max(flops / self._flops, nbytes / self._bw)

    # -- memory ----------------------------------------------------------------------------

    def weight_bytes_per_gpu(self) -> float:
        """The heaviest rank's weights: its stage's layers, plus the embedding on the first
        stage and the lm_head on the last (one copy when tied and pp == 1)."""
        s, w = self.shape, WEIGHT_DTYPES[self.weight_dtype]
        heaviest = 0.0
        for st in self._stages:
            heads = st.first + (st.last and not (s.tie_word_embeddings and st.first))
            heaviest = max(heaviest, st.layers * s.layer_params * w + heads * s.embedding_params
                           * EMBED_BYTES)
        return heaviest / self.tp

    def kv_block_bytes(self, block_size: int) -> float:
        """One block's K/V on the rank with the most layers (every rank holds the same
        number of blocks)."""
        return block_size * max(st.layers for st in self._stages) * self._kv_token_layer

    def activation_reserve_bytes(self, max_num_batched_tokens: int, max_num_seqs: int) -> float:
        """Memory a step's activations may need at peak, kept out of the KV cache: the MLP's
        gate and up outputs and the residual and attention buffers for a full token budget,
        the sampled logits, plus RUNTIME_RESERVE_GIB for the CUDA context and workspaces."""
        s = self.shape
        per_token = (2 * s.intermediate_size / self.tp + 4 * s.hidden_size) * ACT_BYTES
        logits = min(max_num_seqs, max_num_batched_tokens) * s.vocab_size * LOGIT_BYTES
        return RUNTIME_RESERVE_GIB * GIB + max_num_batched_tokens * per_token + logits

    def num_kv_blocks(self, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                      gpu_memory_utilization: float = 0.9) -> int:
        """KV blocks that fit: (memory x utilization - weights - activation reserve) / bytes
        per block, per rank; 0 when the weights alone do not fit."""
        free = (self.gpu.memory_gib * GIB * gpu_memory_utilization - self.weight_bytes_per_gpu()
                - self.activation_reserve_bytes(max_num_batched_tokens, max_num_seqs))
        return max(0, int(free // self.kv_block_bytes(block_size)))

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    @property
    def usd_per_hour(self) -> float | None:
        """A replica's price: every GPU it holds at the GPU's (assumed) hourly price."""
        price = self.gpu.usd_per_gpu_hour
        return None if price is None else price * self.num_gpus

    # -- files -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "roofline", "gpu": self.gpu.to_dict(), "model": self.shape.to_dict(),
                "tp": self.tp, "pp": self.pp, "weight_dtype": self.weight_dtype,
                "kv_dtype": self.kv_dtype, "compute_efficiency": self.compute_efficiency,
                "bandwidth_efficiency": self.bandwidth_efficiency,
                "link_efficiency": self.link_efficiency, "step_overhead_s": self.step_overhead_s,
                "usd_per_hour": self.usd_per_hour, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the model file") -> RooflineStepModel:
        try:
            return cls(GPUSpec.from_dict(data["gpu"]), ModelShape.from_dict(data["model"]),
                       **{k: data[k] for k in ("tp", "pp", "weight_dtype", "kv_dtype",
                                               "compute_efficiency", "bandwidth_efficiency",
                                               "link_efficiency", "step_overhead_s") if k in data},
                       source=data.get("source", {}))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"--profile: {where} is not a whole roofline model ({exc!r}); "
                             "write it again with `simulate profile --roofline`") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> RooflineStepModel:
        data = read_model_file(path)
        return cls.from_dict(data, str(path))


def read_model_file(path: str | Path) -> dict[str, Any]:
    """A step-time model file's JSON, or a ValueError naming --profile."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--profile: cannot read a step-time model from {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--profile: {path} holds no step-time model")
    return data


def replica_engine(model: RooflineStepModel, block_size: int = 16, max_num_seqs: int = 256,
                   max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                   gpu_memory_utilization: float = 0.9, num_kv_blocks: int | None = None,
                   swap_space_gb: float = 4.0, **scheduling: Any) -> dict[str, Any]:
    """The simulated replica's engine options (SimEngineConfig's names): its KV blocks are
    what fits the GPUs, and max_model_len is the model's, capped by them, as the engine
    caps it. Raises when the weights leave no room, naming what to change."""
    for flag, value in (("--block-size", block_size), ("--max-num-seqs", max_num_seqs),
                        ("--max-num-batched-tokens", max_num_batched_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    blocks = num_kv_blocks or model.num_kv_blocks(block_size, max_num_batched_tokens,
                                                  max_num_seqs, gpu_memory_utilization)
    if blocks < 1:
        raise ValueError(
            f"{model.shape.name} in {model.weight_dtype} needs "
            f"{model.weight_bytes_per_gpu() / GIB:.1f} GiB of weights per GPU at tp={model.tp} "
            f"pp={model.pp}, leaving no KV cache in {model.gpu.name}'s {model.gpu.memory_gib} GiB "
            f"x {gpu_memory_utilization}; raise --tp or --pp, or lower --weight-dtype")
    cache_tokens = blocks * block_size
    limit = model.shape.max_position_embeddings
    if max_model_len is not None and max_model_len > min(cache_tokens, limit):
        raise ValueError(f"--max-model-len {max_model_len} is more than the KV cache holds "
                         f"({blocks} blocks x {block_size} = {cache_tokens} tokens) or the "
                         f"model's context ({limit})")
    swap = (int(swap_space_gb * GIB // model.kv_block_bytes(block_size))
            if scheduling.get("preemption_mode") == "swap" else 0)
    return {"num_kv_blocks": blocks, "block_size": block_size, "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "max_model_len": max_model_len or min(limit, cache_tokens), "num_swap_blocks": swap,
            **scheduling}


def describe_roofline(model: RooflineStepModel) -> dict[str, Any]:
    """What `simulate profile --roofline` prints: the setup and a few steps' times."""
    def ms(items: list[tuple[int, int]]) -> float:
        return round(1e3 * model.step_seconds([ScheduledRequest("", n, c) for n, c in items]), 3)

    return {"kind": "roofline", "gpu": model.gpu.name, "model": model.shape.name,
            "params_b": round(model.shape.num_params / 1e9, 2), "tp": model.tp, "pp": model.pp,
            "weight_gib_per_gpu": round(model.weight_bytes_per_gpu() / GIB, 2),
            "usd_per_hour": model.usd_per_hour,
            "step_ms": {"decode_1_ctx_1024": ms([(1, 1024)]),
                        "decode_64_ctx_1024": ms([(1, 1024)] * 64),
                        "prefill_2048": ms([(2048, 0)])},
            **model.source}
