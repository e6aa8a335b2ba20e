"""The replica pool's failover rules, over stand-in replicas (no Ray): a lost replica leaves
rotation, a request is retried while nothing of it reached the client, a stream under way
ends with an error saying the output is incomplete, and a request waits (bounded) for a
replica when there is none, counting a cold start. Disaggregated: a prefill replica's
handover goes on at a decode replica as one stream, and a decode replica lost mid-stream is
replaced from the handover without a gap or a repeat."""

from __future__ import annotations

import asyncio

import pytest

from servelm.cluster.handle import ReplicaHandle, ReplicaLost
from servelm.cluster.kv_transport import Handover
from servelm.cluster.options import ClusterOptions, ModelSpec
from servelm.cluster.pool import ReplicaPool
from servelm.engine.async_engine import EngineDeadError, EngineStepError
from servelm.engine.handoff import RequestHandoff
from servelm.outputs import CompletionOutput, RequestOutput
from servelm.sampling_params import SamplingParams


class StandIn(ReplicaHandle):
    """Yields `outputs` outputs, then finishes, or is lost after `lose_after` of them."""

    def __init__(self, name: str, lose_after: int | None = None, outputs: int = 3) -> None:
        super().__init__(name, actor=None, group=None, state="ready")
        self.lose_after, self.outputs, self.served = lose_after, outputs, []

    def stream(self, request_id, prompt, params, priority, transport):
        self.served.append(request_id)
        return self._outputs(request_id, prompt["prompt"], prompt["prompt_token_ids"], 0)

    async def _outputs(self, request_id, prompt, prompt_ids, start):
        for i in range(start, self.outputs):
            if i - start == self.lose_after:
                raise ReplicaLost(f"replica {self.name} is gone: ActorDiedError")
            await asyncio.sleep(0)
            text = "".join(f"{self.name}:{j} " for j in range(i + 1))
            done = i == self.outputs - 1
            yield RequestOutput(request_id, prompt, prompt_ids,
                                [CompletionOutput(0, text, list(range(i + 1)),
                                                  "length" if done else None, delta_text=f"{self.name}:{i} ")], done)


class Prefill(StandIn):
    """Yields the first token, then hands the request over."""

    def stream(self, request_id, prompt, params, priority, transport):
        self.served.append(request_id)
        return self._first(request_id, prompt, params)

    async def _first(self, request_id, prompt, params):
        yield RequestOutput(request_id, prompt["prompt"], prompt["prompt_token_ids"],
                            [CompletionOutput(0, "t0 ", [0], delta_text="t0 ")], False,
                            num_cached_tokens=4)
        yield Handover(RequestHandoff(request_id, prompt["prompt"], prompt["prompt_token_ids"], [0],
                                      params, None, None, text_sent=3), "shm")


class Decode(StandIn):
    """Goes on from a handover: token i is "t{i} " (as the prefill replica's was)."""

    def resume(self, handover):
        self.served.append(handover.handoff.request_id)
        self.resumed.append(handover.handoff.kv)
        h = handover.handoff
        return self._outputs(h.request_id, h.prompt, h.prompt_token_ids, len(h.output_token_ids))

    def __init__(self, name, lose_after=None, outputs=6):
        super().__init__(name, lose_after, outputs)
        self.resumed = []

    async def _outputs(self, request_id, prompt, prompt_ids, start):
        async for out in super()._outputs(request_id, prompt, prompt_ids, start):
            i = len(out.outputs[0].token_ids) - 1
            out.outputs[0].delta_text = f"t{i} "
            out.outputs[0].text = "".join(f"t{j} " for j in range(i + 1))
            yield out


def make_pool(tiny_model_dir, *replicas: StandIn, decode: tuple[StandIn, ...] = (), **options) -> ReplicaPool:
    more = {"prefill_replicas": len(replicas), "decode_replicas": len(decode)} if decode else {}
    pool = ReplicaPool(ModelSpec("tiny", {"model": str(tiny_model_dir("llama"))}, **more),
                       ClusterOptions(router="round-robin", **options))
    for group, members in zip(pool.groups, (replicas, decode)):
        for r in members:
            group.replicas[r.name] = r
            group.router.add_replica(r.name)
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
    assert a.state == "down" and "a" not in pool.groups[0].router.replicas
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
        pool.groups[0].replicas[r.name] = r
        pool.groups[0]._put_in(r)
        return await waiting

    assert asyncio.run(scenario())[-1].finished
    assert pool.num_cold_starts == 1 and pool.last_cold_start_s >= 0.05


def test_bad_request_is_not_retried(tiny_model_dir):
    class Rejects(StandIn):
        def stream(self, request_id, prompt, params, priority, transport):
            self.served.append(request_id)
            return self._refuse()

        async def _refuse(self):
            raise ValueError("max_tokens must be at least 1")
            yield  # an async generator

    a, b = Rejects("a"), Rejects("b")
    pool = make_pool(tiny_model_dir, a, b)
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(run(pool, stream=False))
    assert len(a.served) + len(b.served) == 1 and a.state == b.state == "ready"


def test_disaggregated_legs_join_into_one_stream(tiny_model_dir):
    p, d = Prefill("p"), Decode("d")
    pool = make_pool(tiny_model_dir, p, decode=(d,))
    outs = asyncio.run(run(pool, stream=True))
    assert "".join(o.outputs[0].delta_text for o in outs) == "t0 t1 t2 t3 t4 t5 "
    assert outs[-1].outputs[0].token_ids == list(range(6)) and outs[-1].num_cached_tokens == 4
    assert (p.served, d.served, pool.num_handovers) == (["r"], ["r"], 1)
    assert p.in_flight == d.in_flight == 0 and not pool.flights


@pytest.mark.parametrize("stream", [True, False])
def test_lost_decode_replica_is_replaced_from_the_handover(tiny_model_dir, stream):
    """Lost after streaming t1 t2: the next decode replica recomputes from the handover
    (no K/V) and the client gets t3 onwards, nothing twice."""
    p, d1, d2 = Prefill("p"), Decode("d1", lose_after=2), Decode("d2")
    pool = make_pool(tiny_model_dir, p, decode=(d1, d2))
    outs = asyncio.run(run(pool, stream=stream))
    text = "".join(o.outputs[0].delta_text for o in outs)
    if stream:
        assert text == "t0 t1 t2 t3 t4 t5 "
    assert outs[-1].outputs[0].text == "t0 t1 t2 t3 t4 t5 " and outs[-1].finished
    assert d1.served == d2.served == ["r"] and d2.resumed == [None]
    assert d1.state == "down" and (pool.num_retried, pool.num_failed) == (1, 0)


def test_recomputed_output_that_differs_ends_the_stream(tiny_model_dir):
    class Differs(Decode):
        async def _outputs(self, request_id, prompt, prompt_ids, start):
            async for out in super()._outputs(request_id, prompt, prompt_ids, start):
                out.outputs[0].token_ids = [t + 100 for t in out.outputs[0].token_ids]
                yield out

    p, d1, d2 = Prefill("p"), Decode("d1", lose_after=2), Differs("d2")
    pool = make_pool(tiny_model_dir, p, decode=(d1, d2))
    with pytest.raises(EngineStepError, match="differs from what was streamed"):
        asyncio.run(run(pool, stream=True))
