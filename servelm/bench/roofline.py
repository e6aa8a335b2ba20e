"""`servelm bench roofline`: how close servelm runs to what this machine can do at all.

Tokens per second alone cannot say whether an engine is good or the machine is slow. So this
benchmark first measures the machine's own ceilings, with the thread count the engine uses:
peak matmul FLOP/s (best of square `torch.matmul`s in the engine's dtype and in bfloat16,
whichever is higher: an engine whose weights run in integer kernels is held to the machine's
best GEMM, not to its own dtype's) and achievable memory
bandwidth (best of a streaming sum and a copy over buffers far larger than the caches). Then it
runs servelm twice and reports each run against the ceiling that bounds it:

- throughput mode (many requests batched, compute-bound): model FLOPs utilization, MFU =
  model FLOPs done per second / peak matmul FLOP/s;
- batch-1 decode (one request, memory-bound): memory-bandwidth utilization, MBU = bytes a
  decode step must read (weights + KV cache) x steps per second / bandwidth.

FLOPs counted (a request of P prompt and O output tokens; the last output token is sampled but
never fed back, so P + O - 1 positions go through the decoder):
  linear    2 x decoder matmul params (q, k, v, o, gate, up, down per layer) per position
  lm_head   2 x vocab x hidden per generated token (logits are computed only where we sample)
  attention 4 x layers x heads x head_dim x keys attended (QK^T and AV; a causal position p
            attends to p + 1 keys)
Norms, RoPE, biases, softmax and sampling are left out (under 1% for real models); recompute
after a preemption is not counted as useful work (`num_preemptions` is recorded).

Energy comes from hardware counters (servelm.bench.energy) or is reported unavailable, never
estimated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from servelm.bench.datasets import random_token_prompts
from servelm.bench.harness import (
    Table,
    check_int,
    finish,
    greedy,
    measure,
    new_result,
    print_report,
    progress,
    split_engine,
)
from servelm.model.arch import ModelArch

# ---- the machine's ceilings ----------------------------------------------------------------


def measure_peak_flops(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096),
                       seconds_per_size: float = 1.0) -> dict[str, Any]:
    """Best achieved 2n^3/t over square matmuls of growing size.

    Small matrices underfill the cores and large ones take long on a CPU, so sizes are tried in
    order and a size is skipped once one product would take longer than `seconds_per_size`.
    Each size is warmed up once (thread pool, packing buffers) and then repeated.
    """
    per_size: dict[int, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        first = time.perf_counter() - t0
        if per_size and first > seconds_per_size:
            break
        times: list[float] = []
        while len(times) < 2 or sum(times) < seconds_per_size:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            times.append(time.perf_counter() - t0)
        per_size[n] = 2 * n**3 / min(times)
    best = max(per_size, key=per_size.get)
    return {"dtype": str(dtype).removeprefix("torch."), "flops": per_size[best], "best_size": best,
            "flops_by_size": per_size, "threads": torch.get_num_threads()}


def measure_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> dict[str, Any]:
    """Achievable DRAM bandwidth: best of a float32 sum (bytes read / t) and a copy (2 x bytes /
    t, read + write as STREAM counts it). `nbytes` must be far above the last-level cache or
    this measures the cache instead."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    x.sum()  # warm up, and fault every page in
    y.copy_(x)
    read = copy = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        read = max(read, x.nbytes / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        y.copy_(x)
        copy = max(copy, 2 * x.nbytes / (time.perf_counter() - t0))
    return {"bytes_per_s": max(read, copy), "read_bytes_per_s": read, "copy_bytes_per_s": copy,
            "buffer_bytes": x.nbytes, "threads": torch.get_num_threads()}


# ---- what servelm's work costs -------------------------------------------------------------


def decoder_matmul_params(arch: ModelArch) -> int:
    """Weights of the decoder's matmuls (q, k, v, o, gate, up, down), all layers."""
    q, kv, h = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.hidden_size
    return arch.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * arch.intermediate_size)


def request_flops(arch: ModelArch, prompt_len: int, output_len: int) -> dict[str, int]:
    """Model FLOPs one request needs (see the module docstring for what is counted)."""
    positions = prompt_len + output_len - 1
    keys = positions * (positions + 1) // 2  # position p attends to p + 1 keys
    parts = {"linear": 2 * decoder_matmul_params(arch) * positions,
             "lm_head": 2 * arch.vocab_size * arch.hidden_size * output_len,
             "attention": 4 * arch.num_layers * arch.num_heads * arch.head_dim * keys}
    return {**parts, "total": sum(parts.values())}


def decode_bytes_per_step(weight_bytes: int, kv_bytes_per_token: int, prompt_len: int,
                          output_len: int) -> float:
    """Average bytes one batch-1 decode step reads: all weights plus the KV cache so far.

    Decode step j (1..O-1) feeds position P + j - 1 and attends over P + j keys, so the mean
    context is P + O/2 tokens.
    """
    return weight_bytes + kv_bytes_per_token * (prompt_len + output_len / 2)


# ---- running it --------------------------------------------------------------------------


@dataclass
class RooflineConfig:
    engine: dict[str, Any] = field(default_factory=dict)  # LLM(**engine) kwargs incl. model
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    seed: int = 0
    quick: bool = False  # tiny probes: for tests, not for numbers anyone should quote
    result_file: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        for name, low in (("num_prompts", 1), ("input_len", 1), ("output_len", 2)):
            check_int(name, getattr(self, name), low)


def _generate(llm: Any, prompts: list[list[int]], output_len: int) -> tuple[list[Any], float, Any]:
    """Greedy, EOS ignored, inside an energy meter; returns outputs, seconds, energy reading."""
    run = measure(lambda: greedy(llm, prompts, output_len))
    return run.value, run.elapsed_s, run.energy


def run_roofline(cfg: RooflineConfig) -> dict[str, Any]:
    """Measure the ceilings, run both servelm workloads, write and return the result dict."""
    from servelm.llm import LLM

    model, engine, dtype = split_engine(cfg.engine)
    say = progress(cfg.quiet)
    llm = LLM(model, **engine)  # sets torch's thread count, which the probes below then use
    info = llm.engine.worker_info  # the model's shape and sizes, from the worker
    arch, source, torch_dtype = info.arch, info.model_source, getattr(torch, dtype)
    dtypes = dict.fromkeys((torch_dtype, torch.bfloat16))
    say(f"measuring peak {' and '.join(str(d).removeprefix('torch.') for d in dtypes)} matmul FLOP/s "
        f"and memory bandwidth ({torch.get_num_threads()} threads) ...")
    if cfg.quick:
        peaks = [measure_peak_flops(d, (128, 256), 0.02) for d in dtypes]
        bw = measure_bandwidth(64 * 2**20, 2)
    else:
        peaks, bw = [measure_peak_flops(d) for d in dtypes], measure_bandwidth()
    peak = max(peaks, key=lambda p: p["flops"])

    tok = llm.get_tokenizer()
    prompts = random_token_prompts(tok, cfg.num_prompts + 1, cfg.input_len, cfg.seed)
    _generate(llm, [prompts[0][:16]], 4)  # warm up kernels and the allocator

    say(f"throughput mode: {cfg.num_prompts} requests x ({cfg.input_len} + {cfg.output_len}) "
        "tokens ...")
    preempt0 = llm.get_metrics()["num_preemptions"]
    outs, elapsed, tp_energy = _generate(llm, prompts[1:], cfg.output_len)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    flops = request_flops(arch, cfg.input_len, cfg.output_len)
    total_flops = flops["total"] * cfg.num_prompts
    n_tokens = cfg.num_prompts * cfg.input_len + n_out
    throughput = {
        "requests": cfg.num_prompts, "prompt_tokens": cfg.num_prompts * cfg.input_len,
        "output_tokens": n_out, "elapsed_s": elapsed, "total_tok_s": n_tokens / elapsed,
        "output_tok_s": n_out / elapsed, "flops_per_request": flops,
        "flops_per_token": total_flops / n_tokens, "achieved_flops": total_flops / elapsed,
        "mfu": total_flops / elapsed / peak["flops"],
        "num_preemptions": llm.get_metrics()["num_preemptions"] - preempt0,
    }

    say(f"batch-1 decode: {cfg.input_len} prompt + {cfg.output_len} output tokens ...")
    outs, _, dec_energy = _generate(llm, prompts[:1], cfg.output_len)
    m = outs[0].metrics
    decode_s = m.finished_time - m.first_token_time
    steps = len(outs[0].outputs[0].token_ids) - 1  # the first token comes from the prefill
    weights, kv_per_token = info.decode_weight_bytes, info.kv_bytes_per_token
    per_step = decode_bytes_per_step(weights, kv_per_token, cfg.input_len, cfg.output_len)
    decode = {
        "prompt_tokens": cfg.input_len, "output_tokens": steps + 1, "decode_steps": steps,
        "ttft_s": m.first_token_time - m.arrival_time, "decode_s": decode_s,
        "tok_s": steps / decode_s, "weight_bytes": weights,
        "kv_bytes_per_token": kv_per_token, "bytes_per_step": per_step,
        "achieved_bandwidth": per_step * steps / decode_s,
        "mbu": per_step * steps / decode_s / bw["bytes_per_s"],
    }
    del llm
    result = new_result("roofline", cfg, dtype)
    result.update({
        "model": {"source": str(source), "family": arch.family, "decoder_matmul_params": decoder_matmul_params(arch),
                  "lm_head_params": arch.vocab_size * arch.hidden_size},
        "peak_flops": peak, "peak_flops_by_dtype": {p["dtype"]: p["flops"] for p in peaks}, "bandwidth": bw,
        "ridge_point_flops_per_byte": peak["flops"] / bw["bytes_per_s"],
        "throughput_mode": throughput, "decode": decode,
        "energy": {"throughput_mode": {**tp_energy.as_dict(n_out), "tokens": "output"},
                   "decode": {**dec_energy.as_dict(steps + 1), "tokens": "output"}},
    })
    return finish(result, "roofline", cfg, print_table)


def _energy_text(e: dict[str, Any]) -> str:
    if e["energy_j"] is None:
        return f"unavailable ({e['energy_unavailable_reason']})"
    return f"{e['energy_j']:.1f} J, {e['energy_per_token_j']:.4f} J/output token ({', '.join(e['energy_sources'])})"


def print_table(result: dict[str, Any]) -> None:
    """Each run beside the ceiling that bounds it."""
    pk, bw, tp, dec = result["peak_flops"], result["bandwidth"], result["throughput_mode"], result["decode"]
    cfg = result["config"]
    table = Table(f"roofline ({pk['dtype']}, {pk['threads']} threads)",
                  ["run", "tok/s", "achieved", "machine ceiling", "utilization"])
    table.add_row(f"throughput mode, {tp['requests']} x ({cfg['input_len']}+{cfg['output_len']})",
                  f"{tp['total_tok_s']:.1f} total", f"{tp['achieved_flops'] / 1e9:.2f} GFLOP/s",
                  f"{pk['flops'] / 1e9:.1f} GFLOP/s matmul (n={pk['best_size']})",
                  f"MFU {tp['mfu']:.1%}")
    table.add_row(f"batch-1 decode, {cfg['input_len']}+{cfg['output_len']}",
                  f"{dec['tok_s']:.1f} decode", f"{dec['achieved_bandwidth'] / 1e9:.2f} GB/s",
                  f"{bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['buffer_bytes'] / 2**20:.0f} MiB sum/copy)",
                  f"MBU {dec['mbu']:.1%}")
    f = tp["flops_per_request"]
    print_report([table], [
        f"model FLOPs per token {tp['flops_per_token'] / 1e6:.1f} M (per request: linear "
        f"{f['linear'] / 1e9:.2f} G, lm_head {f['lm_head'] / 1e9:.2f} G, attention "
        f"{f['attention'] / 1e9:.2f} G); decode bytes per step "
        f"{dec['bytes_per_step'] / 2**20:.1f} MiB (weights {dec['weight_bytes'] / 2**20:.1f} MiB + KV)",
        f"energy, throughput mode: {_energy_text(result['energy']['throughput_mode'])}",
        f"energy, batch-1 decode: {_energy_text(result['energy']['decode'])}",
        f"results: {result['result_file']}"])
