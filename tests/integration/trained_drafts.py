"""What the trained-draft tests share: `train-draft` on a tiny deterministic target, and the
acceptance rate of drafts on the prompts it trained on, checked lossless on the way."""

from __future__ import annotations

import json
from typing import Any

from servelm import SamplingParams
from servelm.cli import main

# Engine options of the losslessness tests: one batch, and chunked prefill with preemption
ENGINE_OPTIONS = {"batch": {}, "recompute": dict(max_num_batched_tokens=24, num_kv_blocks=16,
                                                 block_size=4)}


def prompts(n: int) -> list[dict]:
    """n short prompts of 5-8 different tokens each."""
    return [{"prompt_token_ids": [1 + (7 * i + j) % 50 for j in range(5 + i % 4)]} for i in range(n)]


def assert_greedy_is_the_target_s(make_llm, target, speculative_config: dict, options: dict,
                                  rounds: int = 1) -> None:
    """Six prompts' greedy outputs with `speculative_config` equal the target's alone, under
    engine `options` (preemption happens under the recompute options), `rounds` times over
    (again: the prompts hit the prefix cache)."""
    spec = make_llm(target, speculative_config=speculative_config, **options)
    plain = make_llm(target, **options)
    params = [SamplingParams(max_tokens=20 + 3 * i, temperature=0, ignore_eos=True, logprobs=2)
              for i in range(6)]
    for _ in range(rounds):
        got = spec.generate(prompts(6), params, use_tqdm=False)
        want = plain.generate(prompts(6), params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    m = spec.get_metrics()
    assert m["spec_proposed_tokens"] > 0
    if options:
        assert m["num_preemptions"] > 0


# 40 prompts over the tokens 1..7 of a target with an 8-token vocabulary
ROWS = [[1 + (i * 3 + j * (i % 5 + 1)) % 7 for j in range(3 + i % 4)] for i in range(40)]
MAX_TOKENS = 48


def train_on_rows(tmp_path, target, method: str, *options: str) -> tuple[Any, dict]:
    """`servelm train-draft --method METHOD` on ROWS (MAX_TOKENS each, past EOS): the output
    folder and its train_summary.json."""
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt_token_ids": r}) + "\n"
                                                    for r in ROWS))
    out = tmp_path / method
    rc = main(["train-draft", "--method", method, "--model", str(target), "--output", str(out),
               "--prompts-file", str(tmp_path / "prompts.jsonl"), "--max-tokens", str(MAX_TOKENS),
               "--ignore-eos", "--quiet", *options])
    assert rc == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["output_tokens"] == len(ROWS) * MAX_TOKENS
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    first, last = summary["per_epoch"][0], summary["per_epoch"][-1]
    assert last["train_loss"] < 0.5 * first["train_loss"]  # training lowers the loss
    return out, summary


def acceptance_on_rows(make_llm, target, configs: dict[str, dict]) -> dict[str, float]:
    """Accepted / proposed drafts on ROWS for each named speculative_config, each run's
    greedy output checked equal to the target's without speculation."""
    prompts = [{"prompt_token_ids": r} for r in ROWS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(target).generate(prompts, params, use_tqdm=False)]
    rates = {}
    for name, config in configs.items():
        llm = make_llm(target, speculative_config={**config, "disable_by_batch_size": 64})
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == want, name
        m = llm.get_metrics()
        rates[name] = m["spec_accepted_tokens"] / m["spec_proposed_tokens"]
    return rates
