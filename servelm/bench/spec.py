"""`servelm bench spec`: how much speculation speeds up batch-1 decoding, per proposer.

Speculation pays where the draft guesses right and costs where it does not, so the figure is
measured per dataset (grounded rewriting, HumanEval completion, MT-Bench questions; see
spec_datasets.py), per servelm proposer (`--proposers`) and per system, each system's
speculative variant against itself without speculation, on the same weights, prompt ids and
thread count (see spec_runners.py for how each is driven and timed). Each servelm proposer
is set against a peer drafting the same way:

- ngram (prompt lookup, `speculative_config={"method": "ngram"}`): transformers `generate`
  with prompt lookup decoding, llama.cpp with `LlamaPromptLookupDecoding`.
- layer_skip (the target's first `--spec-num-layers` layers, final norm and LM head draft):
  transformers `generate(assistant_early_exit=L)`, the same self-drafting.
- draft_model (a separate draft, `--draft-model`, or the target's first `--draft-num-layers`
  layers saved as a model of their own, see spec_drafts.py): transformers assisted
  generation with that same draft folder as `assistant_model`.
- distilled (`--distilled-model`, a draft model from `servelm train-draft --method
  distill`, run as a draft_model): the same, with that folder.
- medusa and eagle (heads or a draft layer from `train-draft`, `--medusa-model`,
  `--eagle-model`): no peer drafts that way; recorded as skipped.

Both model-drafting proposers may draft a token tree (`--spec-tree 3,2,1`, SpecInfer),
which transformers cannot: it drafts a chain of len(tree) tokens (noted in the results).
Assisted drafting is fixed at k tokens a step like servelm's. llama-cpp-python drafts only
by prompt lookup, so its rows for the other proposers are recorded as skipped, as is the
whole peer when llama-cpp-python is missing or the model is not a GGUF.

Rows are named `<system>` for ngram (as before this benchmark had proposers, so old result
files stay comparable) and `<system>-<proposer>` otherwise; `vs_servelm` compares each
peer row with the servelm row of the same proposer. All servelm proposers share one plain
LLM; each speculative LLM is built in turn and dropped after its run.

Requests run one at a time, greedy, up to `max_tokens` with EOS honoured (natural lengths).
For each prompt a row's plain variant runs, then its speculative one, so drift on a shared
machine hits both alike; each variant first serves one untimed warm-up request.

Figures per dataset and row: decode tok/s (tokens after the first / seconds after the
first token, summed over requests; TTFT is reported apart), **speedup** = speculative decode
tok/s / the same system's plain decode tok/s, tokens per decode step, servelm's acceptance
rate (accepted / proposed drafts), and the fraction of requests whose speculative output ids
equal the plain ones (with the indices of those that differ): 1.0 for servelm, whose
verification is lossless (a warning is printed otherwise); peers are reported, not judged.
servelm's TTFT includes prefix caching as configured (`--no-enable-prefix-caching` to turn
it off); prompts repeat only when a dataset has fewer rows than `--num-prompts`, and the
shared plain LLM sees each prompt once per proposer, so its TTFT after the first proposer's
row comes from the prefix cache (decode figures are not affected).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servelm.bench.harness import (
    SYSTEMS,
    check_int,
    finish,
    new_result,
    progress,
    split_engine,
)
from servelm.bench.spec_datasets import SPEC_DATASETS, SpecDataset, build_dataset
from servelm.bench.spec_report import (
    PROPOSERS,
    compare,
    describe_proposer,
    num,
    print_table,
    system_name,
    vs_servelm,
)
from servelm.bench.spec_runners import Trace

__all__ = ["PROPOSERS", "SYSTEMS", "SpecBenchConfig", "compare", "run_spec"]

WARMUP_TEXT = "Repeat after me, twice: the cache is warm before anything is timed."
Runner = Callable[[list[int]], Trace]
TREE_PROPOSERS = ("layer_skip", "draft_model", "distilled", "medusa")  # eagle drafts chains
LLAMACPP_ONLY_NGRAM = ("llama.cpp peer skipped for {}: llama-cpp-python drafts only by prompt "
                       "lookup (LlamaPromptLookupDecoding)")


@dataclass
class SpecBenchConfig:
    """Everything one spec run depends on (recorded in the result file)."""

    engine: dict[str, Any] = field(default_factory=dict)  # LLM(**engine) kwargs incl. model
    datasets: list[str] = field(default_factory=lambda: list(SPEC_DATASETS))
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    proposers: list[str] = field(default_factory=lambda: ["ngram"])
    num_prompts: int = 10
    max_tokens: int = 128
    num_speculative_tokens: int = 4  # ngram always; the others when there is no tree
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    spec_num_layers: int | None = None  # layer_skip: target layers that draft
    draft_model: str | None = None  # draft_model: the draft's path ...
    draft_num_layers: int | None = None  # ... or the target's first layers, saved as one
    distilled_model: str | None = None  # distilled: `train-draft --method distill` output
    medusa_model: str | None = None  # medusa: heads from `servelm train-draft`
    eagle_model: str | None = None  # eagle: a draft layer from `servelm train-draft`
    spec_tree: list[int] | None = None  # layer_skip, draft_model, medusa: children per depth
    held_out: bool = False  # only the prompts `train-draft` leaves out (spec_datasets.held_out)
    dataset_path: str | None = None  # self-instruct JSONL for `grounded`
    seed: int = 0
    result_file: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_tokens", "num_speculative_tokens", "prompt_lookup_max",
                     "prompt_lookup_min"):
            check_int(name, getattr(self, name))
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        for name, allowed in (("datasets", SPEC_DATASETS), ("systems", SYSTEMS),
                              ("proposers", PROPOSERS)):
            values = getattr(self, name)
            if not values or any(v not in allowed for v in values) or len(set(values)) < len(values):
                raise ValueError(f"{name} must be a non-empty list of distinct names from "
                                 f"{allowed}, got {values}")
        self._check_proposer_options()

    def _check_proposer_options(self) -> None:
        p = self.proposers
        for name, flag, proposer in (("spec_num_layers", "--spec-num-layers", "layer_skip"),
                                     ("draft_num_layers", "--draft-num-layers", "draft_model"),
                                     ("draft_model", "--draft-model", "draft_model"),
                                     ("distilled_model", "--distilled-model", "distilled"),
                                     ("medusa_model", "--medusa-model", "medusa"),
                                     ("eagle_model", "--eagle-model", "eagle")):
            value = getattr(self, name)
            if value is not None and proposer not in p:
                raise ValueError(f"{name} ({flag}) applies to proposer {proposer}, which "
                                 f"proposers {p} does not list")
            if value is not None and name.endswith("num_layers"):
                check_int(name, value)
        if "layer_skip" in p and self.spec_num_layers is None:
            raise ValueError("spec_num_layers (--spec-num-layers) is required with proposer "
                             "layer_skip: how many of the target's layers draft")
        if "draft_model" in p and (self.draft_model is None) == (self.draft_num_layers is None):
            raise ValueError("proposer draft_model needs exactly one of draft_model "
                             "(--draft-model PATH) and draft_num_layers (--draft-num-layers L, "
                             "a draft cut from the target)")
        for proposer in ("distilled", "medusa", "eagle"):
            if proposer in p and getattr(self, f"{proposer}_model") is None:
                raise ValueError(f"{proposer}_model (--{proposer}-model DIR, from servelm "
                                 f"train-draft) is required with proposer {proposer}")
        for name in ("draft_model", "distilled_model", "medusa_model", "eagle_model"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a path, got {getattr(self, name)!r}")
        if self.spec_tree is not None:
            if not set(TREE_PROPOSERS) & set(p):
                raise ValueError("spec_tree (--spec-tree) applies to proposers "
                                 f"{', '.join(TREE_PROPOSERS)}, which proposers {p} does not list")
            if (not isinstance(self.spec_tree, (list, tuple)) or not self.spec_tree
                    or not all(type(b) is int and b >= 1 for b in self.spec_tree)):
                raise ValueError("spec_tree must be a non-empty list of integers >= 1 (children "
                                 f"per node at each depth), got {self.spec_tree!r}")
        from servelm.speculative.config import SpecConfig

        for proposer, sc in self.speculative_configs().items():
            try:
                SpecConfig.parse(sc)
            except ValueError as e:
                name = "spec_tree" if "tree" in sc else "speculative_config"
                raise ValueError(f"{name} ({proposer}): {e}") from None

    def speculative_configs(self, draft_path: str | None = None) -> dict[str, dict[str, Any]]:
        """servelm's `speculative_config` per proposer (`draft_path`: the draft to use)."""
        out: dict[str, dict[str, Any]] = {}
        for p in self.proposers:
            if p == "ngram":
                out[p] = {"method": "ngram", "num_speculative_tokens": self.num_speculative_tokens,
                          "prompt_lookup_max": self.prompt_lookup_max,
                          "prompt_lookup_min": self.prompt_lookup_min}
                continue
            sc: dict[str, Any] = {"method": "draft_model" if p == "distilled" else p}
            if p == "layer_skip":
                sc["num_layers"] = self.spec_num_layers
            elif p in ("distilled", "medusa", "eagle"):
                sc["model"] = getattr(self, f"{p}_model")
            else:
                sc["model"] = draft_path or self.draft_model or (
                    f"<first {self.draft_num_layers} layers of the target>")
            tree = list(self.spec_tree) if self.spec_tree and p in TREE_PROPOSERS else None
            sc["num_speculative_tokens"] = len(tree) if tree else self.num_speculative_tokens
            if tree:
                sc["tree"] = tree
            out[p] = sc
        return out


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
        say(f"  {label} {d.name}: decode {num(res['baseline']['decode_tok_s'])} -> "
            f"{num(res['speculative']['decode_tok_s'])} tok/s"
            + (f", speedup {rate:.2f}x" if rate else ""))
    return out


# ---- the run -------------------------------------------------------------------------------

def run_spec(cfg: SpecBenchConfig) -> dict[str, Any]:
    """Build the prompts, run every row's two variants, write and return the result dict."""
    from servelm.bench.datasets import encode_prompt
    from servelm.bench.spec_runners import ServelmRunner
    from servelm.llm import LLM

    model, engine, dtype = split_engine(cfg.engine)
    if engine.pop("speculative_config", None) is not None:
        raise ValueError("bench spec sets speculative_config itself; leave it out of engine")
    say = progress(cfg.quiet)
    draft = cfg.draft_model
    for path, flag in ((draft, "draft_model (--draft-model)"),
                       (cfg.distilled_model, "distilled_model (--distilled-model)"),
                       (cfg.medusa_model, "medusa_model (--medusa-model)"),
                       (cfg.eagle_model, "eagle_model (--eagle-model)")):
        if path is not None and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if "draft_model" in cfg.proposers and draft is None:
        from servelm.bench.spec_drafts import write_pruned_draft

        say(f"writing (or reusing) a draft of the target's first {cfg.draft_num_layers} layers ...")
        draft = str(write_pruned_draft(model, cfg.draft_num_layers, None, dtype))
        say(f"  draft: {draft}")
    specs = cfg.speculative_configs(draft)
    plain = LLM(model, **engine)  # sets torch's thread count; transformers then reuses it
    target_layers = plain.engine.arch.num_layers
    if cfg.spec_num_layers is not None and cfg.spec_num_layers >= target_layers:
        raise ValueError(f"spec_num_layers must be below the target's {target_layers} layers, "
                         f"got {cfg.spec_num_layers}")
    tok, max_len = plain.get_tokenizer(), plain.engine.max_model_len
    if cfg.max_tokens >= max_len:
        raise ValueError(f"max_tokens {cfg.max_tokens} leaves no room for a prompt in "
                         f"servelm's max_model_len {max_len}")
    datasets = [build_dataset(n, tok, cfg.num_prompts, max_len - cfg.max_tokens, cfg.seed,
                              cfg.dataset_path, held_out_only=cfg.held_out) for n in cfg.datasets]
    for d in datasets:
        if d.skipped:
            say(d.skipped)
    live = [d for d in datasets if not d.skipped]
    if not live:
        raise FileNotFoundError("no dataset to run: " + "; ".join(d.skipped or "" for d in datasets))
    warmup = encode_prompt(tok, WARMUP_TEXT)
    result = new_result("spec", cfg, dtype, speculative_config=specs)
    result.update(datasets={d.name: d.summary() for d in datasets}, systems={},
                  results={d.name: {} for d in live})
    say(f"spec: batch 1, {', '.join(f'{d.name} x{len(d.prompts)}' for d in live)}, up to "
        f"{cfg.max_tokens} output tokens; "
        + "; ".join(describe_proposer(p, sc) for p, sc in specs.items()))

    def record(system: str, runners: tuple[Runner, Runner], info: dict[str, Any]) -> None:
        say(f"running {system} ...")
        result["systems"][system] = info
        for name, res in measure(runners, live, warmup, say, system).items():
            result["results"][name][system] = res

    if "servelm" in cfg.systems:
        base = ServelmRunner(plain, cfg.max_tokens)
        for proposer, sc in specs.items():  # one speculative LLM at a time, to save memory
            spec_llm = LLM(model, speculative_config=sc, **engine)
            record(system_name("servelm", proposer),
                   (base, ServelmRunner(spec_llm, cfg.max_tokens)), {"speculative_config": sc})
            del spec_llm
            gc.collect()
        del base
    del plain
    gc.collect()
    if "transformers" in cfg.systems:
        _run_transformers(model, dtype, cfg.max_tokens, specs, record, say, result["systems"])
    if "llama.cpp" in cfg.systems:
        longest = max(len(p) for d in live for p in d.prompts) + cfg.max_tokens
        _run_llamacpp(model, engine, cfg, specs, longest, record, say, result["systems"])
    result["vs_servelm"] = vs_servelm(result)
    return finish(result, "spec", cfg, print_table)


def _run_transformers(model: str | None, dtype: str, max_tokens: int,
                      specs: dict[str, dict[str, Any]], record: Callable[..., None],
                      say: Callable[..., None], systems: dict[str, Any]) -> None:
    """One plain transformers runner against a speculative one per proposer (a recorded
    skip for medusa and eagle: transformers has neither)."""
    from servelm.bench.hf_peer import load_hf_model
    from servelm.bench.spec_runners import HF_NO_TREE, HFRunner, hf_spec_settings

    say("loading transformers model ...")
    hf = load_hf_model(model, dtype)
    base = HFRunner(hf, max_tokens)
    for proposer, sc in specs.items():
        if proposer in ("medusa", "eagle"):
            systems[system_name("transformers", proposer)] = {
                "skipped": f"transformers generate has no {proposer} drafting"}
            continue
        settings = hf_spec_settings(sc)
        info: dict[str, Any] = {"attn_implementation": hf.config._attn_implementation, **settings}
        assistant = None
        if sc["method"] == "draft_model":
            say("loading the draft in transformers ...")
            assistant = load_hf_model(sc["model"], dtype)
            info["assistant_model"] = sc["model"]
        if sc.get("tree"):
            info["token_tree"] = HF_NO_TREE
        record(system_name("transformers", proposer),
               (base, HFRunner(hf, max_tokens, settings, assistant)), info)
        del assistant
        gc.collect()


def _run_llamacpp(model: str | None, engine: dict[str, Any], cfg: SpecBenchConfig,
                  specs: dict[str, dict[str, Any]], longest: int, record: Callable[..., None],
                  say: Callable[..., None], systems: dict[str, Any]) -> None:
    """llama.cpp's prompt lookup against ngram; a recorded skip for the other proposers."""
    from servelm.bench import llamacpp_peer as lcp
    from servelm.bench.spec_runners import LlamaCppRunner

    for proposer in specs:
        if proposer != "ngram":
            systems[system_name("llama.cpp", proposer)] = {
                "skipped": LLAMACPP_ONLY_NGRAM.format(proposer)}
    if "ngram" not in specs:
        return
    skip = lcp.llamacpp_skip(model, say)
    if skip is not None:
        systems["llama.cpp"] = skip
        return
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    k, ngram = specs["ngram"]["num_speculative_tokens"], specs["ngram"]["prompt_lookup_max"]
    say("loading llama.cpp models ...")
    threads = lcp.default_threads(engine)
    lms = (lcp.load_llamacpp(model, threads, longest, cfg.seed),
           lcp.load_llamacpp(model, threads, longest, cfg.seed, LlamaPromptLookupDecoding(
               max_ngram_size=ngram, num_pred_tokens=k)))
    record("llama.cpp", (LlamaCppRunner(lms[0], cfg.max_tokens),
                         LlamaCppRunner(lms[1], cfg.max_tokens)),
           {**lms[0].settings(), "threads": threads, "draft_model": f"LlamaPromptLookupDecoding("
            f"max_ngram_size={ngram}, num_pred_tokens={k})"})
