"""`servelm train-draft --method medusa --output DIR`: train a draft on the target's outputs.

The target (the default model unless --model) generates greedily from a prompt set that
needs no network: the MT-Bench questions and HumanEval functions that `make setup`
installs, less the quarter kept back to measure trained drafts on
(spec_datasets.held_out), or a file of prompts. The heads train on those outputs' hidden
states (train/medusa.py) and are saved with their config, a summary of the run and the
loss curve, ready for `--speculative-config '{"method": "medusa", "model": "DIR"}'`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from servelm.bench.datasets import encode_prompt
from servelm.bench.spec_datasets import held_out, prompt_ids
from servelm.engine_args import engine_kwargs
from servelm.llm import LLM
from servelm.speculative.medusa import save_heads
from servelm.train import medusa
from servelm.train.collect import collect, runner_of

DEFAULT_DATASETS = "mt-bench,humaneval"


def add_train_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("train-draft", help="train speculative-decoding heads on the target's outputs")
    p.add_argument("--method", choices=["medusa"], required=True)
    p.add_argument("--output", required=True, help="folder for the trained draft")
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help="comma-separated prompt sources: mt-bench, humaneval (their held-out "
                        "quarter excluded)")
    p.add_argument("--prompts-file", default=None,
                   help="instead of --datasets: one prompt per line, as text (chat template "
                        'applied) or JSON {"prompt_token_ids": [...]}')
    p.add_argument("--num-prompts", type=int, default=None, help="at most this many prompts")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate max-tokens tokens per prompt, past end-of-sequence")
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--num-layers", type=int, default=1, help="residual blocks per head")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_args(p)
    p.set_defaults(func=cmd_train_draft)


def _prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    if args.prompts_file:
        lines = [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        prompts = [json.loads(line)["prompt_token_ids"] if line.lstrip().startswith("{")
                   else encode_prompt(tokenizer, line) for line in lines]
    else:
        prompts = []
        for name in args.datasets.split(","):
            ids, _ = prompt_ids(name.strip(), tokenizer, args.max_prompt_len)
            prompts += [p for p in ids if not held_out(p)]
    if not prompts:
        raise ValueError("no prompts to train on")
    return prompts[: args.num_prompts] if args.num_prompts else prompts


def lm_head_matrix(llm: LLM) -> torch.Tensor:
    """The target's LM head as a float [hidden, vocab] matrix, whatever its storage
    (quantized blocks included): the logits of the identity's rows."""
    model = runner_of(llm).model
    if model.arch.final_logit_softcap is not None:
        raise ValueError("train-draft needs a linear LM head; this model caps its logits")
    with torch.inference_mode():
        eye = torch.eye(model.arch.hidden_size, dtype=model.dtype, device=model.device)
        logits = model.compute_logits(eye).float().cpu()
    return logits.clone()  # a plain tensor again: training differentiates through it


def cmd_train_draft(args: argparse.Namespace) -> int:
    for name in ("num_heads", "num_layers", "epochs", "batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    t0 = time.monotonic()
    engine = engine_kwargs(args)
    if engine.get("speculative_config"):
        raise ValueError("--speculative-config: train-draft collects the target's plain outputs")
    llm = LLM(args.model, **{**engine, "enable_prefix_caching": False})  # every position's state
    try:
        prompts = _prompts(args, llm.get_tokenizer())
        traces = collect(llm, prompts, args.max_tokens, args.ignore_eos, progress=not args.quiet)
        lm_head = lm_head_matrix(llm)
        source = llm.engine.model_source
    finally:
        llm.shutdown()
    t_data = time.monotonic() - t0
    heads, history = medusa.train(traces, lm_head, args.num_heads, args.num_layers, args.epochs,
                                  args.batch_size, args.lr, args.seed, progress=not args.quiet)
    summary = {
        "target": source, "num_prompts": len(prompts), "num_traces": len(traces),
        "output_tokens": sum(len(t.output) for t in traces), "max_tokens": args.max_tokens,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "data_seconds": round(t_data, 1), "train_seconds": round(time.monotonic() - t0 - t_data, 1),
        "untrained": medusa.baseline(traces, lm_head, args.num_heads, args.seed),
        "per_epoch": history.epochs,
    }
    out = Path(args.output)
    save_heads(heads, out, {"target": source})
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(history, out / "loss.png")
    last = history.epochs[-1]
    print(f"trained {args.num_heads} Medusa heads on {summary['output_tokens']} tokens from "
          f"{len(traces)} generations in {summary['data_seconds'] + summary['train_seconds']:.0f} s "
          f"(data {summary['data_seconds']:.0f} s)")
    if "head_accuracy" in last:
        acc = ", ".join(f"{a:.2f}" for a in last["head_accuracy"])
        was = ", ".join(f"{a:.2f}" for a in summary["untrained"]["head_accuracy"])
        print(f"held-out top-1 accuracy per head: {acc} (untrained: {was})")
    print(f"saved to {out}; use --speculative-config '{{\"method\": \"medusa\", \"model\": \"{out}\"}}'")
    return 0


def _plot(history: medusa.History, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no loss plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history.steps, history.train_loss, lw=1, label="training batches")
    per_epoch = [(e["epoch"] * len(history.steps) / len(history.epochs), e["held_out_loss"])
                 for e in history.epochs if "held_out_loss" in e]
    if per_epoch:
        ax.plot(*zip(*per_epoch), "o-", label="held out (end of epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
