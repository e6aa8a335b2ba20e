"""A record of every engine step as served, for fitting the simulator's step-time model on
real traffic (`servelm serve --step-trace FILE`, then `servelm simulate profile
--from-step-trace FILE`).

The file is JSON lines: first the engine's scheduling options, then per step its start
(seconds, perf_counter), whether work was left after it (then the next step started right
away, so the gap between two starts is the step's period as served), and its batch: per
request, tokens computed, tokens before them, draft tokens.
"""

from __future__ import annotations

import json
from typing import Any


class StepTrace:
    def __init__(self, path: str, engine: Any) -> None:
        c, info, spec = engine.config, engine.worker_info, engine.scheduler.spec
        self._file = open(path, "a", buffering=1 << 16)  # kept open while the engine serves
        header = {"engine": {
            "num_kv_blocks": info.num_kv_blocks, "block_size": c.block_size,
            "max_num_batched_tokens": c.max_num_batched_tokens, "max_num_seqs": c.max_num_seqs,
            "max_model_len": engine.max_model_len, "enable_prefix_caching": c.enable_prefix_caching,
            "preemption_mode": c.preemption_mode, "num_swap_blocks": info.num_swap_blocks,
            "scheduling_policy": c.scheduling_policy,
            "num_speculative_tokens": spec.num_speculative_tokens if spec else 0},
            "model": info.model_source,
            "num_threads": c.num_threads}
        self._file.write(json.dumps(header) + "\n")

    def record(self, started: float, engine: Any) -> None:
        step = engine.last_step
        if step is None or not step.scheduled:
            return
        batch = [[s.num_new_tokens, s.num_computed_tokens, s.num_draft_tokens] for s in step.scheduled]
        self._file.write(json.dumps({"t": started, "busy": engine.has_unfinished_requests(),
                                     "batch": batch}) + "\n")
        engine.last_step = None

    def close(self) -> None:
        self._file.close()
