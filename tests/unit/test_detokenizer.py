"""IncrementalDetokenizer against tokenizers trained in-process (byte-level and SentencePiece-style)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from servelm.engine.detokenizer import IncrementalDetokenizer
from servelm.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a test of the tokenizer. STOP here.",
    "The quick brown fox jumps over the lazy dog. Stop words and ### markers.",
] * 20
TEXTS = [
    "Hello world, the quick brown fox.",
    "Hello 你好世界 👋🏽 world! café naïve",
    "🎉🎉 emoji at start, then 日本語 and ends with 🚀",
    "  leading and   repeated spaces\nnew line\ttab",
]


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """Llama-2-like: Metaspace pieces, <0xNN> byte fallback, leading space stripped on decode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    base = len(vocab)
    vocab.update({f"<0x{b:02X}>": base + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def decode(tok: PreTrainedTokenizerFast, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(
    tok: PreTrainedTokenizerFast,
    ids: list[int],
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ids one at a time as an engine would; return the deltas including the flush."""
    detok = IncrementalDetokenizer(tok, prompt or [], params or SamplingParams())
    deltas, stop = [], None
    for t in ids:
        stop = detok.update([t])
        deltas.append(detok.get_delta())
        if stop is not None:
            break
    deltas.append(detok.flush())
    return detok, deltas, stop


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_matches_full_decode(kind: str, text: str, request) -> None:
    tok = request.getfixturevalue(kind)
    ids = encode(tok, text)
    detok, deltas, stop = stream(tok, ids)
    assert stop is None
    assert "".join(deltas) == detok.output_text == decode(tok, ids)
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_characters_really_are_split_across_tokens(kind: str, request) -> None:
    tok = request.getfixturevalue(kind)
    ids = encode(tok, "你好 👋🏽")
    assert any("\ufffd" in decode(tok, [t]) for t in ids)


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_prompt_context_keeps_leading_space(kind: str, request) -> None:
    tok = request.getfixturevalue(kind)
    prompt_text, out_text = "The quick brown fox 你", " jumps over 好 the lazy dog"
    prompt = encode(tok, prompt_text)
    ids = encode(tok, prompt_text + out_text)[len(prompt) :]
    assert encode(tok, prompt_text + out_text)[: len(prompt)] == prompt
    _, deltas, _ = stream(tok, ids, prompt=prompt)
    full, head = decode(tok, prompt + ids), decode(tok, prompt)
    assert "".join(deltas) == full[len(head) :]
    assert "".join(deltas).startswith(" jumps")


def test_multi_token_update_and_incomplete_tail(byte_level: PreTrainedTokenizerFast) -> None:
    ids = encode(byte_level, "ok 👋🏽")
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams())
    assert detok.update(ids[:-1]) is None
    first = detok.get_delta()
    assert first.startswith("ok ") and "\ufffd" not in first  # emoji's last byte missing
    rest = detok.flush()
    assert "\ufffd" in rest  # only once finished, exactly as a full decode writes it
    assert first + rest == detok.output_text == decode(byte_level, ids[:-1])


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates_and_never_leaks(kind: str, include: bool, request) -> None:
    tok = request.getfixturevalue(kind)
    text = "Hello ST and STO then STOP here. More text after"
    params = SamplingParams(stop=["STOP", "never"], include_stop_str_in_output=include)
    detok, deltas, stop = stream(tok, encode(tok, text), params)
    expected = "Hello ST and STO then STOP" if include else "Hello ST and STO then "
    assert stop == "STOP"
    assert detok.output_text == expected and detok.finished
    streamed = ""
    for d in deltas:
        streamed += d
        assert expected.startswith(streamed)  # nothing beyond the final text ever went out
    assert streamed == expected


def test_partial_stop_held_back_then_released(byte_level: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["###"]))
    seen = ""
    for t in encode(byte_level, "a ## b"):
        detok.update([t])
        seen += detok.get_delta()
        assert not seen.endswith("#")
    assert seen == "a ## b"


def test_earliest_stop_wins_and_later_tokens_ignored(byte_level: PreTrainedTokenizerFast) -> None:
    ids = encode(byte_level, "one two three four")
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["four", "two"]))
    assert detok.update(ids) == "two"
    assert detok.output_text == "one "
    assert detok.update(encode(byte_level, " more")) is None
    assert detok.flush() == "one " and detok.get_delta() == ""
    assert len(detok.output_token_ids) < len(ids)


def test_stop_string_spanning_many_tokens(metaspace: PreTrainedTokenizerFast) -> None:
    text = "brown 世界🚀 fox"
    _, deltas, stop = stream(metaspace, encode(metaspace, text), SamplingParams(stop=["界🚀"]))
    assert stop == "界🚀" and "".join(deltas) == "brown 世"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(byte_level: PreTrainedTokenizerFast, skip: bool) -> None:
    eos = byte_level.eos_token_id
    ids = encode(byte_level, "Hello") + [eos] + encode(byte_level, " world")
    detok, deltas, _ = stream(byte_level, ids, SamplingParams(skip_special_tokens=skip))
    assert detok.output_text == ("Hello world" if skip else "Hello<eos> world")
    assert "".join(deltas) == detok.output_text
