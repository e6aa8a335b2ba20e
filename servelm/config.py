"""Engine configuration: one dataclass whose fields are the engine's options.

Each field carries its help text and allowed values (`option(...)`), and everything else is
derived from them: the `LLM(...)` keyword arguments are the fields, `servelm ... --flags`
are generated from them (servelm/engine_args.py), and one validation pass turns a bad value
into an error naming the field and what is allowed. Nothing here imports torch or the
engine, so any part of servelm (and any process) can read a config.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass
from typing import Any

from servelm.kv.compression import CompressionConfig
from servelm.speculative.config import SpecConfig

DTYPES = ("auto", "float32", "bfloat16")
PREEMPTION_MODES = ("recompute", "swap")
SCHEDULING_POLICIES = ("fcfs", "priority", "sjf", "mlfq")
QUANTIZATION_METHODS = ("auto", "none", "int8", "int4")
QUANTIZATION_GROUP_SIZES = (32, 64, 128)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8", "fp8")
DEVICES = ("auto", "cpu", "cuda")
ROLES = ("both", "prefill", "decode")


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           above: float | None = None, cli: bool = True, metavar: str | None = None) -> Any:
    """A config field with what the CLI and validation need: `choices` (allowed values; None
    is allowed too when it is the default), `minimum` (>=) or `above` (>) for numbers,
    `cli=False` for options that get no command-line flag."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "above": above, "cli": cli,
            "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs besides the weights.

    `num_kv_blocks` wins over `kv_cache_memory_gb`. `max_model_len=None` means the model's
    own context length, capped by what the KV cache can hold.
    """

    model: str | None = option(None, "HF folder or .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    device: str = option("auto", "where the model runs: cuda (Triton kernels, CUDA graphs), cpu, "
                         "or auto: cuda when torch sees a GPU", choices=DEVICES)
    tokenizer: str | None = option(
        None, "HF folder (or .gguf) to take the tokenizer and chat template from (default: the "
        "model's)", metavar="PATH")
    skip_tokenizer_init: bool = option(
        False, "load no tokenizer: prompts must be token ids, outputs are token ids with empty "
        "text (no stop strings, chat or structured outputs)")
    dtype: str = option(
        "auto", "compute dtype of activations and float weights; auto: bfloat16 on CUDA; on "
        "CPU float32 where the matmul weights stay block-quantized (a GGUF, or --quantization "
        "int8/int4), else bfloat16 on a CPU with native bf16, else float32", choices=DTYPES)
    block_size: int = option(16, "tokens per KV-cache block", minimum=1)
    num_kv_blocks: int | None = option(None, "KV-cache blocks (default: from --kv-cache-memory-gb)",
                                       minimum=1)
    kv_cache_memory_gb: float = option(2.0, "CPU: memory for the KV cache, GiB", above=0)
    gpu_memory_utilization: float = option(
        0.9, "CUDA: the share of the GPU's memory servelm may use; the KV cache takes what the "
        "weights and the largest step's activations leave of it", above=0)
    enforce_eager: bool = option(
        False, "CUDA: run decode steps op by op instead of replaying captured CUDA graphs")
    max_num_batched_tokens: int = option(2048, "token budget of one step (prefill chunk size)",
                                         minimum=1)
    max_num_seqs: int = option(256, "requests running at once", minimum=1)
    max_model_len: int | None = option(None, "context window (default: the model's, capped by "
                                       "the KV cache)", minimum=2)
    seed: int = option(0, "seed of torch's global generator", cli=False)
    num_threads: int | None = option(None, "CPU threads (default: all cores)", minimum=1)
    enable_prefix_caching: bool = option(True, "reuse the KV of cached prompt prefixes")
    preemption_mode: str = option(
        "recompute", "what happens to a preempted request's KV: dropped and recomputed, or "
        "swapped to CPU memory and back", choices=PREEMPTION_MODES)
    swap_space_gb: float = option(4.0, "CPU swap space for --preemption-mode swap, GiB", above=0)
    cpu_offload_gb: float = option(
        0.0, "CPU memory for prefix-cache KV blocks evicted from the KV cache, restored instead "
        "of recomputed on a later hit (0: off); KV, not weights", minimum=0)
    scheduling_policy: str = option("fcfs", "who runs first when not everyone fits (see "
                                    "servelm/engine/policies.py)", choices=SCHEDULING_POLICIES)
    length_predictor: str | None = option(
        None, "sjf: output-length predictor from `servelm length-predictor train` (default: "
        "rank by max_tokens)", metavar="FILE")
    speculative_config: dict | str | None = option(
        None, 'speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        "(see servelm/speculative/config.py)", metavar="JSON")
    quantization: str = option(
        "auto", "weights at load: auto keeps a GGUF's Q8_0/Q4_0/Q4_1 blocks as stored and "
        "other weights in --dtype; none dequantizes everything to --dtype; int8 / int4 "
        "quantize every matmul weight in groups of --quantization-group-size columns",
        choices=QUANTIZATION_METHODS)
    quantization_group_size: int = option(32, "int8 / int4: input columns per scale",
                                          choices=QUANTIZATION_GROUP_SIZES)
    kv_cache_dtype: str = option(
        "auto", "KV cache storage: float32 or bfloat16, or 8 bits (int8, or fp8 e4m3) with a "
        "scale per token and head; auto: bfloat16 where the matmul weights are quantized "
        "blocks (16-bit like llama.cpp's cache; half the bytes attention reads), else the "
        "compute dtype", choices=KV_CACHE_DTYPES)
    kv_compression: dict | str | None = option(
        None, 'bound every request\'s KV cache, e.g. \'{"method": "streamingllm", "budget": '
        "512}' (methods: streamingllm, h2o, snapkv; see servelm/kv/compression.py); turns "
        "prefix caching off", metavar="JSON")

    step_trace: str | None = option(
        None, "append one JSON line per engine step (its batch and start time) to this file, "
        "for `servelm simulate profile --from-step-trace`", metavar="FILE")
    role: str = option(
        "both", "disaggregated serving: prefill (computes the prompt and the first token, then "
        "hands the request with its KV to a decode engine), decode (only continues requests "
        "handed over), or both", choices=ROLES)

    tensor_parallel_size: int = option(
        1, "worker processes that each hold a slice of every layer (tensor parallelism on "
        "torch.distributed); each holds its KV heads' cache, so KV capacity grows with it",
        minimum=1)
    pipeline_parallel_size: int = option(
        1, "worker processes (stages) that each hold a range of the layers, with up to this "
        "many micro-batches in flight", minimum=1)
    enable_expert_parallel: bool = option(
        False, "mixture-of-experts models with tensor_parallel_size T: each rank holds "
        "num_experts / T whole experts instead of a 1/T slice of every expert")
    allreduce: str = option(
        "shm", "tensor parallelism's all-reduce: shm (through memory the ranks share, one "
        "machine; microseconds) or gloo (torch.distributed over loopback TCP; about a "
        "millisecond per call on CPU)", choices=("shm", "gloo"))
    distributed_timeout_s: float = option(
        60.0, "with several workers: how long setting up the process group, or one collective, "
        "may wait for the other ranks", above=0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):  # model and length_predictor: paths are fine
                value = os.fspath(value)
                setattr(self, f.name, value)
            _check_field(f, value)
        if self.gpu_memory_utilization > 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got "
                             f"{self.gpu_memory_utilization!r}")
        if self.length_predictor is not None and self.scheduling_policy != "sjf":
            raise ValueError("length_predictor is used only by scheduling_policy 'sjf', "
                             f"got scheduling_policy {self.scheduling_policy!r}")
        spec = SpecConfig.parse(self.speculative_config)  # raises on a bad one
        if spec is not None and self.pipeline_parallel_size > 1 and spec.method == "layer_skip":
            # Its drafts come from the target's first layers and LM head, which other stages hold.
            raise ValueError("speculative_config method 'layer_skip' cannot run with "
                             "pipeline_parallel_size > 1; use 'ngram' or 'draft_model'")
        if CompressionConfig.parse(self.kv_compression) is not None:
            if spec is not None:
                raise ValueError("kv_compression cannot be combined with speculative_config")
            # A compacted block no longer holds the tokens its hash names.
            self.enable_prefix_caching = False

    @property
    def spec(self) -> SpecConfig | None:
        return SpecConfig.parse(self.speculative_config)

    @property
    def compression(self) -> CompressionConfig | None:
        return CompressionConfig.parse(self.kv_compression)


@functools.cache
def field_types() -> dict[str, set[type]]:
    """Each field's types, None left out: {int} for `int | None`, {dict, str} for a JSON option."""
    return {name: set(typing.get_args(t) or (t,)) - {type(None)}
            for name, t in typing.get_type_hints(EngineConfig).items()}


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """Validate one value against its field's type and metadata; the error names the field."""
    meta, name = f.metadata, f.name
    if value is None and f.default is None:
        return
    base = field_types()[name]
    if base == {str} and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if base == {bool} and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if base == {int} and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer{_range(meta)}, got {value!r}")
    if base == {float} and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise ValueError(f"{name} must be a number{_range(meta)}, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        extra = " or None" if f.default is None else ""
        raise ValueError(f"{name} must be one of {meta['choices']}{extra}, got {value!r}")
    if (meta["minimum"] is not None and value < meta["minimum"]) or (
            meta["above"] is not None and not value > meta["above"]):
        what = "an integer" if base == {int} else "a number"
        raise ValueError(f"{name} must be {what}{_range(meta)}, got {value!r}")


def _range(meta: dict[str, Any]) -> str:
    if meta["minimum"] is not None:
        return f" >= {meta['minimum']}"
    return f" > {meta['above']}" if meta["above"] is not None else ""
