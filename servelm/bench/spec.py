"""`servelm bench spec`: how much prompt-lookup speculation speeds up batch-1 decoding.

Speculation pays where the answer copies its input and costs where it does not, so the
figure is measured per dataset (grounded rewriting, HumanEval completion, MT-Bench questions;
see spec_datasets.py) and per system: servelm with `speculative_config={"method": "ngram"}`,
transformers `generate` with prompt lookup decoding, and llama.cpp with
`LlamaPromptLookupDecoding` (skipped with the reason when llama-cpp-python is missing), each
against itself without speculation, on the same weights, prompt ids and thread count (see
spec_runners.py for how each is driven and timed).

Requests run one at a time, greedy, up to `max_tokens` with EOS honoured (natural lengths).
For each prompt the system's plain variant runs, then its speculative one, so drift on a
shared machine hits both alike; each variant first serves one untimed warm-up request.

Figures per dataset and system: decode tok/s (tokens after the first / seconds after the
first token, summed over requests; TTFT is reported apart), **speedup** = speculative decode
tok/s / the same system's plain decode tok/s, tokens per decode step, servelm's acceptance
rate (accepted / proposed drafts), and the fraction of requests whose speculative output ids
equal the plain ones (with the indices of those that differ): 1.0 for servelm, whose
verification is lossless (a warning is printed otherwise); peers are reported, not judged. servelm's TTFT includes prefix caching as configured (`--no-enable-prefix-caching`
to turn it off); prompts repeat only when a dataset has fewer rows than `--num-prompts`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from servelm.bench.latency import describe
from servelm.bench.report import make_table, print_report
from servelm.bench.spec_datasets import SPEC_DATASETS, SpecDataset, build_dataset
from servelm.bench.spec_runners import Trace

SYSTEMS = ("servelm", "transformers", "llama.cpp")
WARMUP_TEXT = "Repeat after me, twice: the cache is warm before anything is timed."
Runner = Callable[[list[int]], Trace]


@dataclass
class SpecBenchConfig:
    """Everything one spec run depends on (recorded in the result file)."""

    engine: dict[str, Any] = field(default_factory=dict)  # LLM(**engine) kwargs incl. model
    datasets: list[str] = field(default_factory=lambda: list(SPEC_DATASETS))
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    num_prompts: int = 10
    max_tokens: int = 128
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    dataset_path: str | None = None  # self-instruct JSONL for `grounded`
    seed: int = 0
    result_file: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_tokens", "num_speculative_tokens", "prompt_lookup_max",
                     "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        for name, allowed in (("datasets", SPEC_DATASETS), ("systems", SYSTEMS)):
            values = getattr(self, name)
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"{name} must be a non-empty list from {allowed}, got {values}")

    @property
    def speculative_config(self) -> dict[str, Any]:
        return {"method": "ngram", "num_speculative_tokens": self.num_speculative_tokens,
                "prompt_lookup_max": self.prompt_lookup_max,
                "prompt_lookup_min": self.prompt_lookup_min}


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected names from {','.join(allowed)}, "
                                             f"got {text!r}")
        return values
    return parse


def add_spec_parser(bsub: Any, add_engine_args: Callable[[argparse.ArgumentParser], None],
                    ) -> None:
    """Register `bench spec` on the bench subparsers `bsub`."""
    p = bsub.add_parser("spec", help="batch-1 decode speed-up of prompt-lookup speculation, "
                        "servelm vs transformers and llama.cpp")
    add_engine_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--datasets", type=_names(SPEC_DATASETS), default=list(SPEC_DATASETS),
                   help="comma-separated, from " + ",".join(SPEC_DATASETS))
    g.add_argument("--num-prompts", type=int, default=10, help="requests per dataset")
    g.add_argument("--max-tokens", type=int, default=128, help="output cap (EOS also stops)")
    g.add_argument("--dataset-path", default=None,
                   help="self-instruct JSONL ('instruction', 'input') for grounded "
                        "(default: ../shared/data/self-instruct/predictions.jsonl)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompt order")
    g = p.add_argument_group("speculation")
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="drafts per step (k)")
    g.add_argument("--prompt-lookup-max", type=int, default=3, help="longest n-gram looked up")
    g.add_argument("--prompt-lookup-min", type=int, default=1,
                   help="shortest n-gram looked up (servelm only; the peers go down to 1)")
    g = p.add_argument_group("systems")
    g.add_argument("--systems", type=_names(SYSTEMS), default=list(SYSTEMS),
                   help="comma-separated, from " + ",".join(SYSTEMS))
    g = p.add_argument_group("output")
    g.add_argument("--result-file", default=None, help="default: bench-results/spec-<date>.json")
    g.add_argument("--quiet", action="store_true", help="no progress or table")
    p.set_defaults(func=cmd_spec)


def cmd_spec(args: argparse.Namespace) -> int:
    from servelm.cli import engine_kwargs

    if args.speculative_config is not None:
        raise ValueError("bench spec sets speculation itself: use --num-speculative-tokens and "
                         "--prompt-lookup-max/min instead of --speculative-config")
    engine = engine_kwargs(args)
    engine.pop("speculative_config")
    cfg = SpecBenchConfig(
        engine={"model": args.model, **engine}, datasets=args.datasets, systems=args.systems,
        num_prompts=args.num_prompts, max_tokens=args.max_tokens,
        num_speculative_tokens=args.num_speculative_tokens,
        prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
        dataset_path=args.dataset_path, seed=args.seed, result_file=args.result_file,
        quiet=args.quiet,
    )
    run_spec(cfg)
    return 0


# ---- figures -------------------------------------------------------------------------------

def figures(traces: list[Trace]) -> dict[str, Any]:
    """Totals and rates of one variant on one dataset."""
    dec_tok, dec_s = sum(t.decode_tokens for t in traces), sum(t.decode_s for t in traces)
    steps = (None if any(t.decode_steps is None for t in traces)
             else sum(t.decode_steps or 0 for t in traces))
    out: dict[str, Any] = {
        "num_requests": len(traces), "output_tokens": sum(len(t.token_ids) for t in traces),
        "decode_tokens": dec_tok, "decode_s": dec_s,
        "decode_tok_s": dec_tok / dec_s if dec_s > 0 else None,
        "ttft_s": describe([t.ttft_s for t in traces]),
        "decode_steps": steps, "tokens_per_step": dec_tok / steps if steps else None,
    }
    if all(t.proposed is not None for t in traces):
        proposed, accepted = sum(t.proposed or 0 for t in traces), sum(t.accepted or 0 for t in traces)
        out.update(spec_proposed_tokens=proposed, spec_accepted_tokens=accepted,
                   acceptance_rate=accepted / proposed if proposed else None)
    return out


def compare(plain: list[Trace], spec: list[Trace]) -> dict[str, Any]:
    """Both variants' figures, the speedup and how often their outputs are identical."""
    a, b = figures(plain), figures(spec)
    differ = [i for i, (x, y) in enumerate(zip(plain, spec, strict=True))
              if x.token_ids != y.token_ids]
    speedup = (b["decode_tok_s"] / a["decode_tok_s"]
               if a["decode_tok_s"] and b["decode_tok_s"] else None)
    return {"baseline": a, "speculative": b, "speedup": speedup,
            "identical_fraction": 1 - len(differ) / max(1, len(plain)),
            "differing_requests": differ}


def measure(runners: tuple[Runner, Runner], datasets: list[SpecDataset], warmup: list[int],
            say: Callable[..., None], label: str) -> dict[str, dict[str, Any]]:
    """One untimed warm-up per variant, then every prompt: plain variant, speculative one."""
    for run in runners:
        run(warmup)
    out = {}
    for d in datasets:
        traces: tuple[list[Trace], list[Trace]] = ([], [])
        for prompt in d.prompts:
            for run, sink in zip(runners, traces, strict=True):
                sink.append(run(prompt))
        out[d.name] = res = compare(*traces)
        rate = res["speedup"]
        say(f"  {label} {d.name}: decode {_num(res['baseline']['decode_tok_s'])} -> "
            f"{_num(res['speculative']['decode_tok_s'])} tok/s"
            + (f", speedup {rate:.2f}x" if rate else ""))
    return out


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


# ---- the run -------------------------------------------------------------------------------

def run_spec(cfg: SpecBenchConfig) -> dict[str, Any]:
    """Build the prompts, run every system's two variants, write and return the result dict."""
    from servelm.bench import llamacpp_peer as lcp
    from servelm.bench.datasets import encode_prompt
    from servelm.bench.results import result_header, result_path, write_result
    from servelm.bench.spec_runners import HFRunner, LlamaCppRunner, ServelmRunner
    from servelm.llm import LLM

    engine = dict(cfg.engine)
    model = engine.pop("model", None)
    if engine.pop("speculative_config", None) is not None:
        raise ValueError("bench spec sets speculative_config itself; leave it out of engine")
    dtype = engine.get("dtype", "float32")
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    plain = LLM(model, **engine)  # sets torch's thread count; transformers then reuses it
    tok, max_len = plain.get_tokenizer(), plain.engine.max_model_len
    if cfg.max_tokens >= max_len:
        raise ValueError(f"max_tokens {cfg.max_tokens} leaves no room for a prompt in "
                         f"servelm's max_model_len {max_len}")
    datasets = [build_dataset(n, tok, cfg.num_prompts, max_len - cfg.max_tokens, cfg.seed,
                              cfg.dataset_path) for n in cfg.datasets]
    for d in datasets:
        if d.skipped:
            say(d.skipped)
    live = [d for d in datasets if not d.skipped]
    if not live:
        raise FileNotFoundError("no dataset to run: " + "; ".join(d.skipped or "" for d in datasets))
    warmup = encode_prompt(tok, WARMUP_TEXT)
    longest = max(len(p) for d in live for p in d.prompts) + cfg.max_tokens
    k, ngram = cfg.num_speculative_tokens, cfg.prompt_lookup_max
    result: dict[str, Any] = {
        **result_header("spec", dtype),
        "config": {**{key: v for key, v in vars(cfg).items() if key != "engine"},
                   "engine": {"model": model, **engine},
                   "speculative_config": cfg.speculative_config},
        "datasets": {d.name: d.summary() for d in datasets},
        "systems": {}, "results": {d.name: {} for d in live},
    }
    say(f"spec: batch 1, {', '.join(f'{d.name} x{len(d.prompts)}' for d in live)}, up to "
        f"{cfg.max_tokens} output tokens, k={k}, n-grams {cfg.prompt_lookup_min}-{ngram}")

    def record(system: str, per_dataset: dict[str, dict[str, Any]], info: dict) -> None:
        result["systems"][system] = info
        for name, res in per_dataset.items():
            result["results"][name][system] = res

    if "servelm" in cfg.systems:
        say("running servelm ...")
        spec_llm = LLM(model, speculative_config=cfg.speculative_config, **engine)
        pair = (ServelmRunner(plain, cfg.max_tokens), ServelmRunner(spec_llm, cfg.max_tokens))
        record("servelm", measure(pair, live, warmup, say, "servelm"),
               {"speculative_config": cfg.speculative_config})
        del spec_llm, pair
    del plain
    if "transformers" in cfg.systems:
        from servelm.bench.hf_peer import load_hf_model

        say("loading transformers model ...")
        hf = load_hf_model(model, dtype)
        say("running transformers ...")
        pair = (HFRunner(hf, cfg.max_tokens), HFRunner(hf, cfg.max_tokens, k, ngram))
        record("transformers", measure(pair, live, warmup, say, "transformers"),
               {"attn_implementation": hf.config._attn_implementation,
                "prompt_lookup_num_tokens": k, "max_matching_ngram_size": ngram})
        del hf, pair
    if "llama.cpp" in cfg.systems:
        why = lcp.unavailable_reason(model)
        if why is not None:
            say(why)
            result["systems"]["llama.cpp"] = {"skipped": why}
        else:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            say("loading llama.cpp models ...")
            threads = lcp.default_threads(engine)
            lms = (lcp.load_llamacpp(model, threads, longest, cfg.seed),
                   lcp.load_llamacpp(model, threads, longest, cfg.seed, LlamaPromptLookupDecoding(
                       max_ngram_size=ngram, num_pred_tokens=k)))
            say(f"running llama.cpp ({threads} threads) ...")
            pair = (LlamaCppRunner(lms[0], cfg.max_tokens), LlamaCppRunner(lms[1], cfg.max_tokens))
            record("llama.cpp", measure(pair, live, warmup, say, "llama.cpp"),
                   {**lms[0].settings(), "draft_model": f"LlamaPromptLookupDecoding("
                    f"max_ngram_size={ngram}, num_pred_tokens={k})"})
            del lms, pair
    result["vs_servelm"] = _vs_servelm(result)
    write_result(result, result_path(cfg.result_file, "spec"))
    if not cfg.quiet:
        print_table(result)
    return result


def _vs_servelm(result: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """servelm decode tok/s / each peer's, per dataset and variant (above 1: servelm faster)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, per_system in result["results"].items():
        sv = per_system.get("servelm")
        if sv is None:
            continue
        for peer in SYSTEMS[1:]:
            if peer not in per_system:
                continue
            out.setdefault(name, {})[peer] = {
                v: (sv[v]["decode_tok_s"] / p if (p := per_system[peer][v]["decode_tok_s"])
                    and sv[v]["decode_tok_s"] else None) for v in ("baseline", "speculative")}
    return out


def print_table(result: dict[str, Any]) -> None:
    """One row per dataset and system, then cross-system ratios and notes."""
    cfg = result["config"]
    cols = ["dataset", "system", "req", "out tok", "TTFT med ms", "decode tok/s",
            "spec TTFT med ms", "spec decode tok/s", "speedup", "accept", "tok/step",
            "identical"]

    def ms(stats: dict[str, float] | None) -> str:
        return "-" if stats is None else f"{stats['median'] * 1e3:.1f}"

    rows = []
    for name, per_system in result["results"].items():
        for system in SYSTEMS:
            r = per_system.get(system)
            if r is None:
                continue
            a, b = r["baseline"], r["speculative"]
            rows.append([name, system, str(a["num_requests"]),
                         f"{a['output_tokens']}/{b['output_tokens']}", ms(a["ttft_s"]),
                         _num(a["decode_tok_s"]), ms(b["ttft_s"]), _num(b["decode_tok_s"]),
                         "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                         _num(b.get("acceptance_rate"), ".0%"), _num(b["tokens_per_step"], ".2f"),
                         f"{r['identical_fraction']:.0%}"])
    notes = ["speedup: speculative decode tok/s / the same system's without speculation; "
             "decode = tokens after the first / time after the first token; out tok: "
             "plain/speculative; identical: requests whose speculative output ids equal the "
             "plain ones"]
    for name, peers in result.get("vs_servelm", {}).items():
        parts = [f"{peer} {_num(r['baseline'], '.2f')}x plain, {_num(r['speculative'], '.2f')}x "
                 f"speculative" for peer, r in peers.items()]
        notes.append(f"{name}: servelm / peer decode tok/s (>1 = servelm faster): "
                     + "; ".join(parts))
    for name, per_system in result["results"].items():
        if (sv := per_system.get("servelm")) and sv["differing_requests"]:
            notes.append(f"WARNING {name}: servelm's speculative output differs from its plain "
                         f"one for requests {sv['differing_requests']} (verification should be "
                         "lossless)")
    notes += [d["skipped"] for d in result["datasets"].values() if "skipped" in d]
    notes += [s["skipped"] for s in result["systems"].values() if "skipped" in s]
    notes.append(f"results: {result['result_file']}")
    sc = cfg["speculative_config"]
    title = (f"spec: batch 1, up to {cfg['max_tokens']} output tokens, k="
             f"{sc['num_speculative_tokens']}, n-grams {sc['prompt_lookup_min']}-"
             f"{sc['prompt_lookup_max']}")
    print_report([make_table(title, cols, rows)], notes)
