"""The roofline step model (servelm/simulate/roofline.py) against figures worked out by hand
from the datasheets and the models' public configs, plus its files, its KV sizing, the
`simulate profile --roofline` command and the errors bad input gets."""

from __future__ import annotations

import json
import random

import pytest

from servelm.cli import main
from servelm.simulate.hardware import GPU_PRESETS, gpu_spec
from servelm.simulate.model_shape import MODEL_PRESETS, model_shape
from servelm.simulate.roofline import RooflineStepModel, replica_engine
from servelm.simulate.step_model import StepTimeModel, load_step_model
from servelm.step_io import ScheduledRequest, SchedulerOutput

# Llama-3-8B by hand: q, k, v, o and the gated MLP per layer; embedding = lm_head (untied)
LAYER = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336
assert LAYER == 218_103_808
MATMUL = 32 * LAYER  # 6.98e9
LM_HEAD = 128256 * 4096  # 5.25e8
H100_FLOPS = 989e12 * 0.7
H100_BW = 3350e9 * 0.8
KV_TOKEN = 32 * 2 * 8 * 128 * 2  # bytes of K and V per token over all layers, bf16
OVERHEAD = 1.5e-3


def llama8b(gpu: str = "h100", **kw) -> RooflineStepModel:
    return RooflineStepModel(gpu_spec(gpu), model_shape("llama-3-8b"), **kw)


def step(*items: tuple[int, int]) -> SchedulerOutput:
    """(new tokens, computed tokens) per request."""
    return SchedulerOutput([ScheduledRequest(f"r{i}", n, c) for i, (n, c) in enumerate(items)])


def test_llama3_8b_params_match_its_published_size():
    """Meta publishes 8,030,261,248 parameters; the model leaves out only the 65 RMSNorm
    weight vectors (two a layer, one final)."""
    assert model_shape("llama-3-8b").num_params == MATMUL + 2 * LM_HEAD == 8_030_261_248 - 65 * 4096


def test_batch1_decode_is_the_weights_over_the_bandwidth():
    """One token after 1024: every weight read once (memory-bound), ~6 ms on an H100."""
    weights = MATMUL * 2 + LM_HEAD * 2  # 15.0 GB
    kv = KV_TOKEN * (1025 + 1)  # the context read, the new token written
    expected = (weights + kv) / H100_BW + OVERHEAD
    got = llama8b().seconds(step((1, 1024)))
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(5.6e-3 + OVERHEAD, rel=0.03)  # 15.0e9 / 2.68e12 = 5.6 ms


def test_2048_token_prefill_is_compute_bound():
    """2 x 6.98e9 x 2048 FLOPs at 0.7 x 989 TFLOP/s = 41 ms of matmuls, plus attention over
    2048 x 2049 / 2 query-key pairs and one sampled position's lm_head (memory-bound)."""
    matmul = 2 * MATMUL * 2048 / H100_FLOPS
    attention = 4 * 32 * 32 * 128 * (2048 * 2049 / 2) / H100_FLOPS
    lm_head = LM_HEAD * 2 / H100_BW
    got = llama8b().seconds(step((2048, 0)))
    assert matmul == pytest.approx(41.3e-3, rel=0.01)
    assert got == pytest.approx(matmul + attention + lm_head + OVERHEAD, rel=1e-9)


def test_tensor_parallel_halves_the_matmuls_and_adds_the_all_reduces():
    one, two = llama8b(), llama8b(tp=2)
    for tokens in (1, 64, 2048):
        a, b = one.breakdown(tokens, 1, 0.0, 0.0), two.breakdown(tokens, 1, 0.0, 0.0)
        assert b["matmul"] == pytest.approx(a["matmul"] / 2, rel=1e-12)
        assert a["all_reduce"] == 0.0
    # one decode: 2 all-reduces per layer + the embedding's, of 4096 bf16 activations, each
    # ring-moving 2 (tp-1)/tp of them over 450 GB/s x 0.8, 10 us apiece; then the logits gather
    link = 450e9 * 0.8
    per_call = 2 * (1 / 2) * 4096 * 2 / link + 10e-6
    gather = (1 / 2) * 128256 * 4 / link + 10e-6
    assert two.breakdown(1, 1, 0.0, 0.0)["all_reduce"] == pytest.approx(65 * per_call + gather)
    # decode is memory-bound: half the weights per rank, so faster, but not twice as fast
    t1, t2 = one.seconds(step((1, 512))), two.seconds(step((1, 512)))
    assert t2 < t1 < 2 * t2


def test_pipeline_stages_run_one_after_another():
    """Two stages of 16 layers take as long as one of 32, plus sending the activations."""
    one, two = llama8b(), llama8b(pp=2)
    s = step((1, 100), (1, 300), (7, 0))
    send = 9 * 4096 * 2 / (450e9 * 0.8) + 10e-6
    assert two.seconds(s) == pytest.approx(one.seconds(s) + send, rel=1e-9)
    assert two.weight_bytes_per_gpu() < 0.6 * one.weight_bytes_per_gpu()


def test_more_tokens_never_take_less_time():
    rng = random.Random(0)
    for model in (llama8b(), llama8b(tp=2), llama8b("l4", pp=2)):
        for _ in range(200):
            items = [(rng.choice([1, 1, 1, rng.randint(2, 2048)]), rng.randint(0, 8000))
                     for _ in range(rng.randint(1, 40))]
            base = model.seconds(step(*items))
            i = rng.randrange(len(items))
            n, c = items[i]
            assert model.seconds(step(*items, (1, rng.randint(1, 4000)))) >= base  # one more
            longer = items[:i] + [(n + rng.randint(1, 512), c)] + items[i + 1:]
            assert model.seconds(step(*longer)) >= base  # a longer chunk
            later = items[:i] + [(n, c + rng.randint(1, 4000))] + items[i + 1:]
            assert model.seconds(step(*later)) >= base  # a longer context


def test_kv_blocks_are_what_the_memory_left_over_holds():
    model = llama8b()
    weights = (MATMUL + 2 * LM_HEAD) * 2
    reserve = 2**30 + 2048 * (2 * 14336 + 4 * 4096) * 2 + 256 * 128256 * 4
    free = 80 * 2**30 * 0.9 - weights - reserve
    blocks = model.num_kv_blocks(16, 2048, 256)
    assert blocks == int(free // (16 * KV_TOKEN)) == 28543
    # two ranks: half the weights and half the K/V heads each, so more than twice the blocks
    assert llama8b(tp=2).num_kv_blocks(16, 2048, 256) > 2 * blocks
    engine = replica_engine(model, 16, 256, 2048)
    assert engine["num_kv_blocks"] == blocks and engine["max_model_len"] == 8192


def test_a_model_that_does_not_fit_says_what_to_change():
    model = RooflineStepModel(gpu_spec("l4"), model_shape("llama-3-70b"))
    assert model.num_kv_blocks(16, 2048, 256) == 0
    with pytest.raises(ValueError, match="raise --tp or --pp"):
        replica_engine(model)
    with pytest.raises(ValueError, match="--max-model-len 9000"):
        replica_engine(llama8b(), max_model_len=9000)


def test_save_and_load_round_trip(tmp_path):
    model = llama8b("a100-40gb", tp=2, weight_dtype="int4", kv_dtype="fp8", step_overhead_s=0.002)
    model.source = {"engine": replica_engine(model, 16, 128, 4096)}
    path = tmp_path / "roofline.json"
    model.save(path)
    assert json.loads(path.read_text())["kind"] == "roofline"
    loaded = load_step_model(path)
    assert isinstance(loaded, RooflineStepModel)
    assert loaded.to_dict() == model.to_dict()
    s = step((1, 4000), (300, 100), (1, 17))
    assert loaded.seconds(s) == model.seconds(s)
    assert loaded.usd_per_hour == pytest.approx(2 * GPU_PRESETS["a100-40gb"].usd_per_gpu_hour)


def test_fitted_files_still_load(tmp_path):
    old = tmp_path / "old.json"  # as StepTimeModel.save wrote it before the kind field
    old.write_text(json.dumps({"features": ["step", "prefill_tokens", "decode_seqs",
                                            "decode_context", "prefill_attention"],
                               "coefficients": [0.01, 1e-4, 1e-3, 0.0, 0.0],
                               "source": {"engine": {"num_kv_blocks": 64}}, "fit_error": {}}))
    model = load_step_model(old)
    assert isinstance(model, StepTimeModel) and model.coefficients[0] == 0.01
    new = tmp_path / "new.json"
    model.save(new)
    assert json.loads(new.read_text())["kind"] == "fitted"
    assert load_step_model(new).coefficients == model.coefficients
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "vidur"}))
    with pytest.raises(ValueError, match="'fitted' or 'roofline'"):
        load_step_model(other)


def test_hf_config_folders(tmp_path):
    cfg = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 28,
           "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
           "intermediate_size": 3072, "vocab_size": 151936, "tie_word_embeddings": True,
           "max_position_embeddings": 40960, "sliding_window": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(str(tmp_path))
    assert (shape.head_dim, shape.num_kv_heads, shape.tie_word_embeddings) == (128, 8, True)
    del cfg["head_dim"], cfg["num_key_value_heads"]
    cfg["sliding_window"] = 4096  # Mistral v0.1 style: the engine caps the context at it
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(str(tmp_path / "config.json"))
    assert (shape.head_dim, shape.num_kv_heads, shape.max_position_embeddings) == (64, 16, 4096)


@pytest.mark.parametrize("call, message", [
    (lambda: gpu_spec("b200"), "allowed: .*h100-sxm"),
    (lambda: gpu_spec("h100", peak_tflops=-5), "--peak-tflops must be a number > 0"),
    (lambda: gpu_spec("custom", peak_tflops=100), "--mem-bandwidth-gbs, --memory-gib"),
    (lambda: model_shape("llama-9"), "allowed: " + ", ".join(MODEL_PRESETS)),
    (lambda: llama8b(tp=3), "--tp 3 must divide num_attention_heads"),
    (lambda: llama8b(weight_dtype="int3"), "--weight-dtype: 'int3'"),
    (lambda: llama8b(compute_efficiency=1.5), "--compute-efficiency must be in"),
])
def test_bad_input_names_the_flag(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_configs_name_the_field(tmp_path):
    cfg = dict(MODEL_PRESETS["llama-3-8b"])
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing intermediate_size"):
        model_shape(str(tmp_path))
    cfg.update(intermediate_size=14336, num_local_experts=8)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        model_shape(str(tmp_path))
    cfg.update(num_local_experts=0, hidden_size=-4096)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size must be > 0"):
        model_shape(str(tmp_path))


def test_profile_roofline_writes_a_model_that_simulate_run_uses(tmp_path, capsys):
    out, result = tmp_path / "h100.json", tmp_path / "sim.json"
    assert main(["simulate", "profile", "--roofline", "--gpu", "h100", "--model-config",
                 "llama-3-8b", "--tp", "2", "--max-num-batched-tokens", "4096",
                 "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tp"] == 2 and printed["engine"]["max_num_batched_tokens"] == 4096
    assert main(["simulate", "run", "--profile", str(out), "--num-prompts", "20",
                 "--random-input-len", "256", "--random-output-len", "16", "--request-rate", "5",
                 "--result-file", str(result), "--quiet"]) == 0
    doc = json.loads(result.read_text())
    assert doc["completed"] == 20 and doc["replicas"][0]["engine"]["num_kv_blocks"] == printed["engine"]["num_kv_blocks"]
    # a roofline without its GPU, and GPU flags without --roofline, are refused
    assert main(["simulate", "profile", "--roofline", "--model-config", "llama-3-8b",
                 "--output", str(out)]) == 2
    assert "--roofline needs --gpu and --model-config" in capsys.readouterr().err
    assert main(["simulate", "profile", "--gpu", "h100", "--output", str(out)]) == 2
    assert "go with --roofline" in capsys.readouterr().err
