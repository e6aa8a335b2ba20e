"""A model folder without a tokenizer: the loader's error names the missing files and the
two ways on; `tokenizer=` takes another folder's; `skip_tokenizer_init` runs on token ids
alone (the same ids as with a tokenizer, empty text) and refuses what needs text."""

from __future__ import annotations

import shutil

import pytest

from servelm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def bare_folder(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    dst = tmp_path / "weights-only"
    dst.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return src, dst


def test_missing_tokenizer_and_the_ways_on(bare_folder, make_llm):
    src, bare = bare_folder
    with pytest.raises(ValueError, match=r"has no tokenizer .*--tokenizer PATH.*--skip-tokenizer-init"):
        LLM(str(bare))
    prompt = {"prompt_token_ids": [5, 17, 42, 8]}
    want = make_llm(src).generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    borrowed = make_llm(bare, tokenizer=str(src)).generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    assert (borrowed.token_ids, borrowed.text) == (want.token_ids, want.text)
    ids_only = make_llm(bare, skip_tokenizer_init=True)
    out = ids_only.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == want.token_ids and out.text == ""
    for bad, message in (("text", "no tokenizer"), (prompt, "need a tokenizer")):
        params = GREEDY if bad == "text" else SamplingParams(stop=["x"])
        with pytest.raises(ValueError, match=message):
            ids_only.generate(bad, params, use_tqdm=False)
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        ids_only.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
