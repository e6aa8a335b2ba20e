"""The replica pool's failover rules, over stand-in replicas (no Ray): a lost replica leaves
rotation, a request is retried while nothing of it reached the client, a stream under way
ends with an error saying the output is incomplete, and a request waits (bounded) for a
replica when there is none, counting a cold start."""

from __future__ import annotations

import asyncio

import pytest

from servelm.cluster.handle import ReplicaHandle, ReplicaLost
from servelm.cluster.options import ClusterOptions, ModelSpec
from servelm.cluster.pool import ReplicaPool
from servelm.engine.async_engine import EngineDeadError, EngineStepError
from servelm.outputs import CompletionOutput, RequestOutput
from servelm.sampling_params import SamplingParams


class StandIn(ReplicaHandle):
    """Yields `outputs` outputs, then finishes, or is lost after `lose_after` of them."""

    def __init__(self, name: str, lose_after: int | None = None, outputs: int = 3) -> None:
        super().__init__(name, actor=None, group=None, state="ready")
        self.lose_after, self.outputs, self.served = lose_after, outputs, []

    async def stream(self, request_id, prompt, params, priority):
        self.served.append(request_id)
        for i in range(self.outputs):
            if i == self.lose_after:
                raise ReplicaLost(f"replica {self.name} is gone: ActorDiedError")
            await asyncio.sleep(0)
            text = "".join(f"{self.name}:{j} " for j in range(i + 1))
            done = i == self.outputs - 1
            yield RequestOutput(request_id, prompt["prompt"], prompt["prompt_token_ids"],
                                [CompletionOutput(0, text, list(range(i + 1)),
                                                  "length" if done else None)], done)


def make_pool(tiny_model_dir, *replicas: StandIn, **options) -> ReplicaPool:
    pool = ReplicaPool(ModelSpec("tiny", {"model": str(tiny_model_dir("llama"))}),
                       ClusterOptions(router="round-robin", **options))
    for r in replicas:
        pool.replicas[r.name] = r
        pool.router.add_replica(r.name)
    return pool


async def run(pool: ReplicaPool, stream: bool) -> list[RequestOutput]:
    return [out async for out in pool.generate("r", "hello world", SamplingParams(max_tokens=3),
                                              stream=stream)]


def test_non_streamed_request_is_retried_after_outputs(tiny_model_dir):
    a, b = StandIn("a", lose_after=2), StandIn("b")
    pool = make_pool(tiny_model_dir, a, b)
    outs = asyncio.run(run(pool, stream=False))
    assert outs[-1].finished and outs[-1].outputs[0].text == "b:0 b:1 b:2 "
    assert (a.served, b.served) == (["r"], ["r"])
    assert a.state == "down" and "a" not in pool.router.replicas
    assert (pool.num_retried, pool.num_failed) == (1, 0)
    assert a.in_flight == b.in_flight == 0


@pytest.mark.parametrize("lose_after, retried", [(0, True), (1, False)])
def test_stream_retried_only_before_output(tiny_model_dir, lose_after, retried):
    a, b = StandIn("a", lose_after=lose_after), StandIn("b")
    pool = make_pool(tiny_model_dir, a, b)
    if retried:
        assert asyncio.run(run(pool, stream=True))[-1].outputs[0].text.startswith("b:0")
        assert (pool.num_retried, pool.num_failed) == (1, 0)
        return
    with pytest.raises(EngineStepError, match="output is incomplete"):
        asyncio.run(run(pool, stream=True))
    assert b.served == [] and (pool.num_retried, pool.num_failed) == (0, 1)


def test_every_replica_lost_fails_with_503_error(tiny_model_dir):
    pool = make_pool(tiny_model_dir, StandIn("a", lose_after=0), StandIn("b", lose_after=0),
                     acquire_timeout_s=0.2)
    with pytest.raises(EngineDeadError, match="no replica of model 'tiny' became ready"):
        asyncio.run(run(pool, stream=False))
    assert pool.num_retried == 2 and pool.num_waiting == 0


def test_request_waits_for_a_replica_and_counts_a_cold_start(tiny_model_dir):
    pool = make_pool(tiny_model_dir)

    async def scenario():
        waiting = asyncio.ensure_future(run(pool, stream=True))
        await asyncio.sleep(0.05)
        assert pool.num_waiting == 1  # what the autoscaler sees as demand
        r = StandIn("late")
        pool.replicas[r.name] = r
        pool._put_in(r)
        return await waiting

    assert asyncio.run(scenario())[-1].finished
    assert pool.num_cold_starts == 1 and pool.last_cold_start_s >= 0.05


def test_bad_request_is_not_retried(tiny_model_dir):
    class Rejects(StandIn):
        async def stream(self, request_id, prompt, params, priority):
            self.served.append(request_id)
            raise ValueError("max_tokens must be at least 1")
            yield  # an async generator

    a, b = Rejects("a"), Rejects("b")
    pool = make_pool(tiny_model_dir, a, b)
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(run(pool, stream=False))
    assert len(a.served) + len(b.served) == 1 and a.state == b.state == "ready"
