"""`python -m servelm.bench.gpu_check`: the CUDA path checked and measured on one GPU, in one
table (scripts/gpu_check.sh runs the native kernel tests first).

- Parity: greedy tokens and their logprobs, servelm against transformers, both in float32
  on the GPU, on a random-weight Llama, and on a real model given by `--parity-model` (an
  HF folder or a GGUF file, e.g. the cached default model).
- Throughput: 256 requests of 128-512 prompt and 128 output tokens, servelm's continuous
  batching against transformers `generate` in padded batches (its best batch size of
  those tried), both bfloat16 on the GPU. Goal: >= 20x.
- Batch-1 decode: tokens per second of one request, and the share of the GPU's memory
  bandwidth (measured here by a device copy) that the bytes each step must read (weights
  plus the KV cache) make up at that rate. Goal: >= 70%.

No model hub is needed: the measured model is a Llama of a real shape with random bfloat16
weights (`--shape`; 1b: TinyLlama-1.1B's, 8b: Llama-3-8B's), built on the GPU and saved
with a word-level tokenizer covering its vocabulary. `--device cpu --shape tiny` runs the
same script on a CPU in a minute, to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from servelm.bench.datasets import BenchRequest
from servelm.bench.harness import greedy
from servelm.bench.hf_peer import generate_timed, run_transformers

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "parity": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=2, initializer_range=0.1),  # peaked logits: few near-ties
}
VOCAB = 32000


def save_random_llama(folder: Path, shape: str, dtype: torch.dtype, device: str) -> Path:
    """A Llama of `shape` with random weights, initialized on `device` (on a GPU: seconds,
    not minutes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    del model
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2",
                            unk_token="t0").save_pretrained(folder)
    return folder


def _prompts(n: int, low: int, high: int, seed: int, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hbm_bandwidth(device: str, nbytes: int = 4 * 2**30, repeats: int = 10) -> float:
    """Bytes per second a copy within the device's memory moves (read + write), best of
    `repeats`."""
    x = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = max(best, 2 * x.nbytes / (time.perf_counter() - t0))
    del x, y
    _free()
    return best


def _hf(path: str, dtype: torch.dtype, device: str, gguf: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf} if gguf else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval()


def check_parity(path: str, device: str, gguf: str | None = None, n: int = 8,
                 new: int = 32) -> dict[str, Any]:
    """Greedy tokens of servelm and transformers, float32, on `device`; prompts of 8-200
    tokens."""
    from servelm import LLM, SamplingParams

    llm = LLM(str(Path(path) / gguf) if gguf else path, device=device, dtype="float32",
              quantization="none")
    prompts = _prompts(n, 8, 200, seed=1, vocab=llm.engine.arch.vocab_size)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=0)
    outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                use_tqdm=False)]
    llm.shutdown()
    del llm
    _free()
    hf = _hf(path, torch.float32, device, gguf)
    same, worst = 0, 0.0
    with torch.inference_mode():
        for p, out in zip(prompts, outs):
            ids, lps = list(p), []
            for _ in range(new):
                lp = hf(torch.tensor([ids], device=device)).logits[0, -1].float().log_softmax(-1)
                ids.append(int(lp.argmax()))
                lps.append(float(lp[ids[-1]]))
            if ids[len(p):] == out.token_ids:  # logprobs compared where the tokens agree
                same += 1
                ours = [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
                worst = max(worst, max(abs(a - b) for a, b in zip(ours, lps)))
    del hf
    _free()
    return {"prompts": n, "identical": same, "max_logprob_diff": worst}


def measure_servelm(path: str, device: str, requests: list[BenchRequest], one: list[int],
                    new: int) -> dict[str, Any]:
    from servelm import LLM

    llm = LLM(path, device=device, dtype="bfloat16")
    info = llm.engine.worker_info
    prompts = [r.prompt_token_ids for r in requests]
    greedy(llm, prompts[:8], 8)  # warm-up: Triton compiles, the allocator grows
    t0 = time.perf_counter()
    outs = greedy(llm, prompts, [r.output_len for r in requests])
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    greedy(llm, [one], new + 1)  # warm-up at batch 1
    t0 = time.perf_counter()
    greedy(llm, [one], 1)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy(llm, [one], new + 1)
    decode_s = time.perf_counter() - t0 - ttft
    llm.shutdown()
    del llm
    _free()
    # Bytes one decode step reads: the weights, and the K/V of its context (mean over the run).
    step_bytes = info.decode_weight_bytes + info.kv_bytes_per_token * (len(one) + new / 2)
    return {"throughput_tok_s": tokens / elapsed, "ttft_s": ttft, "decode_tok_s": new / decode_s,
            "decode_step_bytes": step_bytes}


def measure_transformers(path: str, device: str, requests: list[BenchRequest], one: list[int],
                         new: int, batch_sizes: list[int]) -> dict[str, Any]:
    hf = _hf(path, torch.bfloat16, device)
    run, rates = run_transformers(hf, requests, batch_sizes, probe_batches=1)
    generate_timed(hf, [one], 4)  # warm-up
    _, start, times = generate_timed(hf, [one], new + 1)
    del hf
    _free()
    return {"throughput_tok_s": run.useful_output / run.elapsed_s, "batch_size": run.batch_size,
            "rates_by_batch_size": rates, "ttft_s": times[0] - start,
            "decode_tok_s": new / (times[-1] - times[0])}


def report(result: dict[str, Any]) -> str:
    s, h, p, bw = result["servelm"], result["transformers"], result["parity"], result["hbm_bytes_per_s"]
    mbu = s["decode_step_bytes"] * s["decode_tok_s"] / bw
    rows = [
        ("greedy parity, float32 (prompts identical)", f"{p['identical']}/{p['prompts']}", "", "",
         "all", p["identical"] == p["prompts"]),
        ("throughput, output tok/s", f"{s['throughput_tok_s']:.0f}", f"{h['throughput_tok_s']:.0f}",
         f"{s['throughput_tok_s'] / h['throughput_tok_s']:.1f}x", ">= 20x",
         s["throughput_tok_s"] >= 20 * h["throughput_tok_s"]),
        ("batch-1 decode, tok/s", f"{s['decode_tok_s']:.0f}", f"{h['decode_tok_s']:.0f}",
         f"{s['decode_tok_s'] / h['decode_tok_s']:.2f}x", "", None),
        ("batch-1 decode, share of HBM bandwidth", f"{mbu:.0%}", "", "", ">= 70%", mbu >= 0.7),
        ("batch-1 TTFT, ms", f"{s['ttft_s'] * 1e3:.1f}", f"{h['ttft_s'] * 1e3:.1f}", "", "", None),
    ]
    if "parity_model" in result:
        g = result["parity_model"]
        rows.insert(1, ("greedy parity, --parity-model, float32", f"{g['identical']}/{g['prompts']}",
                        "", "", "all", g["identical"] == g["prompts"]))
    lines = [f"{result['gpu']}, {result['shape']} random-weight Llama, HBM copy {bw / 1e9:.0f} GB/s",
             "| figure | servelm | transformers | ratio | goal | met |", "|---|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} | {'' if ok is None else 'yes' if ok else 'NO'} |"
              for a, b, c, d, e, ok in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["1b", "8b", "tiny"], default="1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: check this script on a machine without a GPU (with --shape tiny)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--parity-model", default=None, metavar="PATH",
                    help="an HF folder or .gguf file to check parity on as well")
    ap.add_argument("--result-file", default=None)
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; torch sees none (--device cpu checks the script)")
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    result: dict[str, Any] = {"gpu": name, "shape": args.shape}
    with tempfile.TemporaryDirectory() as tmp:
        parity = save_random_llama(Path(tmp) / "parity", "tiny" if args.shape == "tiny" else "parity",
                                   torch.float32, dev)
        result["parity"] = check_parity(str(parity), dev)
        if args.parity_model:
            real = Path(args.parity_model)
            result["parity_model"] = (check_parity(str(real.parent), dev, real.name) if real.is_file()
                                      else check_parity(str(real), dev))
        folder = str(save_random_llama(Path(tmp) / args.shape, args.shape, torch.bfloat16, dev))
        prompts = _prompts(args.num_prompts, 128, 512, seed=0)
        requests = [BenchRequest(p, args.output_len) for p in prompts]
        one = prompts[0][:128]
        result["hbm_bytes_per_s"] = hbm_bandwidth(dev, 4 * 2**30 if dev == "cuda" else 2**28)
        result["servelm"] = measure_servelm(folder, dev, requests, one, args.output_len)
        result["transformers"] = measure_transformers(folder, dev, requests, one, args.output_len,
                                                      args.hf_batch_sizes)
    print(report(result))
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
