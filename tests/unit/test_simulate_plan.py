"""`servelm simulate plan` (issue 20): per (gpu, tp, pp) the highest rate one replica sustains
within the SLO, then replicas for the target, validated on the whole cluster, cheapest wins.
A tiny dense model on made-up GPUs keeps every simulation to a few dozen short requests."""

from __future__ import annotations

import json
import math

import pytest

from servelm.cli import main
from servelm.simulate.hardware import gpu_spec
from servelm.simulate.model_shape import ModelShape
from servelm.simulate.plan import PlanSpec, Workload, plan
from servelm.simulate.workload import synthetic

# 134M parameters: 268 MB of bf16 weights
SHAPE = ModelShape("tiny", hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=4,
                   head_dim=128, intermediate_size=4096, vocab_size=4096,
                   max_position_embeddings=4096)
CONFIG = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8,
          "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 4096,
          "max_position_embeddings": 4096}
# too small for the weights on one GPU (1 GiB runtime reserve), room for them on two
SMALL = dict(peak_tflops=50, mem_bandwidth_gbs=100, memory_gib=1.4, usd_per_gpu_hour=1.0)
BIG = dict(peak_tflops=100, mem_bandwidth_gbs=200, memory_gib=4, usd_per_gpu_hour=2.5)
# this model prefills 512 tokens in a few ms, so its SLOs are a few ms: 7 ms of TTFT binds
SLO, TIGHT = {"ttft": 12.0, "tpot": 15.0}, {"ttft": 7.0, "tpot": 15.0}


def workload() -> Workload:
    return Workload(lambda n: synthetic("random", n, 512, 32, 0.0, math.inf, 1.0, 0), 544)


def spec(rate: float, slos: dict[str, float] = SLO, **kw) -> PlanSpec:
    kw = {"tp_options": (1, 2), "pp_options": (1,), "num_prompts": 60,
          "max_validate_prompts": 200, **kw}
    return PlanSpec(rate, slos, **kw)


def gpus():
    return [gpu_spec("custom", **SMALL), gpu_spec("custom", **BIG)]


def test_a_candidate_that_does_not_fit_is_reported_not_a_crash():
    candidates, _ = plan(SHAPE, [gpu_spec("custom", **SMALL)], spec(50, tp_options=(1, 2, 3)),
                         workload())
    tp1, tp2, tp3 = candidates
    assert "leaving no KV cache" in tp1.reason and tp1.max_rate is None and not tp1.meets_slo
    assert "must divide num_attention_heads" in tp3.reason
    assert tp2.reason is None and tp2.max_rate > 0 and tp2.meets_slo


def test_a_higher_target_never_needs_fewer_gpus():
    one = spec(1.0, tp_options=(1,))
    (c,), _ = plan(SHAPE, [gpu_spec("custom", **BIG)], one, workload())
    capacity = c.max_rate
    needed = []
    for share in (0.5, 1.5, 2.5, 4.0):
        (c,), _ = plan(SHAPE, [gpu_spec("custom", **BIG)], spec(share * capacity, tp_options=(1,)),
                       workload())
        assert c.max_rate == pytest.approx(capacity)  # the search does not depend on the target
        needed.append(c.gpus)
    assert needed == sorted(needed) and needed[0] < needed[-1]


def test_the_plan_is_the_cheapest_that_meets_the_slo():
    candidates, best = plan(SHAPE, gpus(), spec(300), workload())
    met = [c for c in candidates if c.meets_slo]
    assert best is not None and len(met) >= 2
    assert best.usd_per_hour == min(c.usd_per_hour for c in met)
    assert best.usd_per_hour == best.replicas * best.tp * best.pp * best.usd_per_gpu_hour
    for c in met:  # each validated at the target on its replica count
        assert c.validation[-1]["meets_slo"] and c.validation[-1]["replicas"] == c.replicas


def test_a_tighter_slo_never_picks_a_cheaper_plan():
    _, loose = plan(SHAPE, gpus(), spec(300), workload())
    _, tight = plan(SHAPE, gpus(), spec(300, TIGHT), workload())
    assert loose is not None
    assert tight is None or tight.usd_per_hour >= loose.usd_per_hour
    assert tight is not None and tight.usd_per_hour > loose.usd_per_hour  # the SLO binds here


def _cli(tmp_path, *extra: str) -> list[str]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    return ["simulate", "plan", "--gpu", "custom", "--peak-tflops", "100", "--mem-bandwidth-gbs",
            "200", "--memory-gib", "4", "--usd-per-gpu-hour", "2.5", "--model-config", str(config),
            "--tp-options", "1,2", "--pp-options", "1", "--num-prompts", "30",
            "--max-validate-prompts", "120", "--random-input-len", "128",
            "--random-output-len", "16", "--quiet", *extra]


def test_the_command_prints_the_table_and_writes_the_result_file(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(_cli(tmp_path, "--target-rate", "60", "--slo", "ttft:200", "tpot:15",
                   "--result-file", str(out)))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "custom *" in printed and "p90 TTFT ms" in printed and "* the plan: " in printed
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "simulate-plan" and len(doc["candidates"]) == 2
    chosen = doc["chosen"]
    assert chosen["meets_slo"] and chosen["gpus"] == chosen["replicas"] * chosen["tp"]
    assert doc["plan"]["slos"] == {"ttft": 200.0, "tpot": 15.0} and doc["simulations"] > 0


@pytest.mark.parametrize("extra, flag", [
    (["--target-rate", "0", "--slo", "ttft:200"], "--target-rate"),
    (["--target-rate", "5", "--slo", "tpot:15"], "--slo"),
    (["--target-rate", "5", "--slo", "ttft=200"], "--slo"),
    (["--target-rate", "5", "--slo", "ttft:200", "--slo-percentile", "0"], "--slo-percentile"),
    (["--target-rate", "5", "--slo", "ttft:200", "--gpu", "b200"], "--gpu"),
    (["--target-rate", "5", "--slo", "ttft:200", "--memory-gib", "0.5"], "--max-gpus"),
    (["--target-rate", "5", "--slo", "ttft:200", "--max-gpus", "0"], "--max-gpus"),
    (["--target-rate", "5", "--slo", "ttft:200", "--compute-efficiency", "2"],
     "--compute-efficiency"),
])
def test_bad_flags_are_errors_that_name_the_flag(tmp_path, capsys, extra, flag):
    assert main(_cli(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err


def test_a_bad_list_of_degrees_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_cli(tmp_path, "--target-rate", "5", "--slo", "ttft:200", "--tp-options", "0"))
    assert "--tp-options" in capsys.readouterr().err
