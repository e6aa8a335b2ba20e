"""Step times of a few batches, as each simulator's step-time model gives them.

Vidur (in its venv, with the same flags as the runs, so its trained predictor is reused):
  python step_times.py vidur <vidur.main flags...>
servelm (in the project's venv):
  python step_times.py servelm PROFILE.json
A batch is a list of (new tokens, tokens already in the KV cache) per request."""
import json
import sys

BATCHES = {
    "decode 1 @1024": [(1, 1024)],
    "decode 32 @1024": [(1, 1024)] * 32,
    "decode 128 @1536": [(1, 1536)] * 128,
    "prefill 512": [(512, 0)],
    "prefill 2048": [(2048, 0)],
    "prefill chunk 1024 + 64 decodes @1024": [(1024, 0)] + [(1, 1024)] * 64,
}


def vidur(breakdown: bool = False) -> dict:
    from types import SimpleNamespace

    from vidur.config import SimulationConfig
    from vidur.execution_time_predictor import ExecutionTimePredictorRegistry

    sys.argv = [sys.argv[0]] + sys.argv[2:]
    config = SimulationConfig.create_from_cli_args()
    predictor = ExecutionTimePredictorRegistry.get(
        config.execution_time_predictor_config.get_type(),
        predictor_config=config.execution_time_predictor_config,
        replica_config=config.cluster_config.replica_config,
        cache_config=config.cluster_config.cache_config)
    out, parts = {}, {}
    for name, items in BATCHES.items():
        q = [n for n, _ in items]
        kv = [n + c for n, c in items]  # Vidur's num_kv_tokens: the context after this step
        total = sum(q)
        batch = SimpleNamespace(num_q_tokens=q, num_kv_tokens=kv, _total_num_q_tokens=total,
                                _total_num_q_tokens_rounded=(total + 7) // 8 * 8)
        t = predictor.get_execution_time(batch, 0)
        out[name] = round(1e3 * t.total_time, 3)
        if breakdown:  # per layer, ms, as Vidur predicts each operation
            parts[name] = {k: round(getattr(t, k), 4) for k in dir(t)
                           if k.endswith(("_time", "_execution_time")) and not k.startswith("_")
                           and k not in ("total_time", "model_time")}
    return {"step_ms": out, "per_layer_ms": parts} if breakdown else out


def servelm(path: str) -> dict:
    from servelm.simulate.roofline import RooflineStepModel
    from servelm.step_io import ScheduledRequest

    model = RooflineStepModel.load(path)
    out = {name: round(1e3 * model.step_seconds([ScheduledRequest("", n, c) for n, c in items]), 3)
           for name, items in BATCHES.items()}
    parts = {}
    for name, items in BATCHES.items():  # the same sums step_seconds makes, split by part
        tokens = sum(n for n, _ in items)
        keys = sum(n * c + n * (n + 1) / 2 for n, c in items)
        kv = sum(c + n for n, c in items)
        parts[name] = {k: round(1e3 * v, 3) for k, v in
                       model.breakdown(tokens, len(items), keys, kv).items()}
    return {"step_ms": out, "parts_ms": parts}


if __name__ == "__main__":
    result = vidur(breakdown=True) if sys.argv[1] == "vidur" else servelm(sys.argv[2])
    print("STEP_TIMES " + json.dumps(result))  # Vidur logs to stdout too
