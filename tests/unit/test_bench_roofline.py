"""`servelm bench roofline`: the FLOP and byte formulas by hand, and one quick CLI run."""

from __future__ import annotations

import json

import pytest
from fixtures_models import small_arch

from servelm.bench.roofline import (
    decode_bytes_per_step,
    decoder_matmul_params,
    request_flops,
)
from servelm.cli import main
from servelm.model.arch import ModelArch


def _arch(**kw):
    return small_arch(**kw)


def test_flops_per_request_by_hand():
    arch = _arch()
    # per layer: q 8x8=64, k 8x4=32, v 32, o 64, gate+up+down 3x8x12=288 -> 480; 2 layers
    assert decoder_matmul_params(arch) == 960
    # P=3 prompt, O=2 output: positions 0..3 go through the decoder (4 = P + O - 1);
    # they attend to 1+2+3+4 = 10 keys; logits for the 2 sampled tokens only.
    f = request_flops(arch, prompt_len=3, output_len=2)
    assert f["linear"] == 2 * 960 * 4
    assert f["lm_head"] == 2 * 100 * 8 * 2
    assert f["attention"] == 2 * 4 * 4 * 2 * 10  # layers x 4 x heads x head_dim x keys
    assert f["total"] == 7680 + 3200 + 640


def test_decode_bytes_per_step_by_hand():
    # P=10, O=5: steps attend to 11..14 keys, mean 12.5 = P + O/2
    assert decode_bytes_per_step(1000, 32, 10, 5) == 1000 + 32 * 12.5


def _step_weight_params(arch: ModelArch) -> int:
    """Weights a decode step reads in full, by hand: decoder matmuls, the two norms per
    layer, the final norm and lm_head (the embedding only via lm_head)."""
    h = arch.hidden_size
    params = decoder_matmul_params(arch) + arch.num_layers * 2 * h + h + arch.vocab_size * h
    if arch.qkv_bias:
        params += arch.num_layers * (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
    return params


def test_weight_bytes_match_the_stored_model(tiny_model_dir):
    from servelm.llm import LLM

    for tied in (False, True):
        llm = LLM(str(tiny_model_dir("llama", tie_word_embeddings=tied)), num_kv_blocks=8,
                  num_threads=1)
        info = llm.engine.worker_info
        arch = info.arch
        params = _step_weight_params(arch)
        assert info.decode_weight_bytes == params * 4  # float32; embedding only via lm_head
        embedding = 0 if tied else arch.vocab_size * arch.hidden_size * 4
        assert info.model_weight_bytes == params * 4 + embedding
        # K and V x layers x KV heads x head_dim, float32
        assert info.kv_bytes_per_token == 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 4


def test_roofline_cli_end_to_end(tmp_path, tiny_model_dir, capsys):
    from servelm.model.loader import load_model

    model = tiny_model_dir("llama")
    out = tmp_path / "res" / "r.json"
    rc = main(["bench", "roofline", "--model", str(model), "--num-prompts", "4",
               "--input-len", "16", "--output-len", "8", "--num-kv-blocks", "32",
               "--num-threads", "1", "--quick", "--result-file", str(out)])
    assert rc == 0
    assert "MFU" in capsys.readouterr().out
    res = json.loads(out.read_text())
    for key in ("date", "command", "machine", "config", "model", "peak_flops", "bandwidth",
                "throughput_mode", "decode", "energy"):
        assert key in res
    assert res["machine"]["torch_threads"] == res["peak_flops"]["threads"] == 1
    pk, bw = res["peak_flops"], res["bandwidth"]
    assert pk["flops"] == max(pk["flops_by_size"].values()) == pk["flops_by_size"][
        str(pk["best_size"])]
    assert bw["bytes_per_s"] == max(bw["read_bytes_per_s"], bw["copy_bytes_per_s"])
    # Every figure again from the raw counts and times, with the FLOPs and bytes by hand.
    arch = load_model(str(model)).arch
    tp, dec = res["throughput_mode"], res["decode"]
    assert tp["output_tokens"] == 4 * 8 and tp["prompt_tokens"] == 4 * 16
    flops = 4 * (2 * decoder_matmul_params(arch) * 23 + 2 * arch.vocab_size * arch.hidden_size * 8
                 + 4 * arch.num_layers * arch.num_heads * arch.head_dim * (23 * 24 // 2))
    assert tp["flops_per_request"]["total"] * 4 == flops
    assert tp["total_tok_s"] == pytest.approx(4 * 24 / tp["elapsed_s"])
    assert tp["output_tok_s"] == pytest.approx(4 * 8 / tp["elapsed_s"])
    assert tp["flops_per_token"] == pytest.approx(flops / (4 * 24))
    assert tp["achieved_flops"] == pytest.approx(flops / tp["elapsed_s"])
    assert tp["mfu"] == pytest.approx(flops / tp["elapsed_s"] / pk["flops"])
    assert dec["decode_steps"] == 7 and dec["output_tokens"] == 8
    kv = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 4  # K and V, float32
    weights = 4 * _step_weight_params(arch)  # float32
    assert dec["weight_bytes"] == weights and dec["kv_bytes_per_token"] == kv
    per_step = weights + kv * (16 + 8 / 2)
    assert dec["bytes_per_step"] == pytest.approx(per_step)
    assert dec["tok_s"] == pytest.approx(7 / dec["decode_s"])
    assert dec["achieved_bandwidth"] == pytest.approx(per_step * 7 / dec["decode_s"])
    assert dec["mbu"] == pytest.approx(per_step * 7 / dec["decode_s"] / bw["bytes_per_s"])
    for mode in ("throughput_mode", "decode"):
        e = res["energy"][mode]
        assert (e["energy_j"] is None) == (e["energy_unavailable_reason"] is not None)
