"""Moving a running request from one engine to another: disaggregated prefill/decode (the
prefill engine hands the request over after its first token) and live migration.

The sending engine exports a decoding request between steps: its tokens, sampling
settings, what its stream has sent, the state of its random generator, and the K/V of every
computed token as stored (worker/kv_payload.py); it then forgets the request, keeping the
prompt's blocks findable by its prefix cache. The receiving engine writes the K/V into
freshly allocated blocks and the request continues at its next token, drawing the same
samples it would have drawn where it was. When the K/V cannot be taken (no payload, another
cache layout, no room) the receiver recomputes it from the tokens instead, as after a
preemption: slower, same output.

Live migration copies in stages so the request stops only briefly: while it keeps decoding
at the source, `read_kv` copies its full blocks (which no later step changes) and the
target's `stage_kv` writes them into blocks it holds for the request; the final export then
carries only the blocks written since (`kv_first_block` onwards), and the import joins them
to the staged ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from servelm.engine.detokenizer import IncrementalDetokenizer
from servelm.engine.output_processor import RequestGroup
from servelm.engine.request import Request, RequestStatus
from servelm.kv.manager import cdiv
from servelm.outputs import PositionLogprobs
from servelm.sampling_params import SamplingParams
from servelm.worker.kv_payload import KVPayload

logger = logging.getLogger("servelm")

# `engine` below is an LLMEngine (not imported: engine.py imports this module)


@dataclass
class RequestHandoff:
    """A request in flight, as plain data: everything another engine needs to go on."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed: int | None
    generator_state: bytes | None
    text_sent: int  # characters of output text its stream has handed out
    priority: int = 0
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    # K/V of every token but the last, one payload per worker process; None: recompute it
    kv: list[KVPayload] | None = None
    kv_first_block: int = 0  # blocks before this one were staged at the receiver beforehand
    exported_at: float = 0.0  # time.time() when it left its engine: a move's downtime starts

    @property
    def num_computed_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) - 1


def _running(engine: Any, request_id: str) -> Request:
    group = engine.outputs.groups.get(request_id)
    if group is None:
        raise ValueError(f"request {request_id!r} is not running here")
    if len(group.seqs) != 1:
        raise ValueError(f"request {request_id!r} has n={len(group.seqs)} samples; only n=1 moves")
    return group.seqs[0]


def export_request(engine: Any, request_id: str, first_block: int = 0) -> RequestHandoff:
    """Take a decoding request out of `engine` (between steps) as a handoff, with the K/V of
    its blocks from `first_block` on (those before were staged at the receiver)."""
    req = _running(engine, request_id)
    s = engine.scheduler
    if req.status is not RequestStatus.RUNNING or not req.is_decoding or req.request_id in s.in_flight:
        raise ValueError(f"request {request_id!r} is not between two decode steps")
    if engine.num_steps_in_flight:
        raise ValueError(f"request {request_id!r} cannot move while pipeline steps are in flight")
    if req.num_evicted_tokens:
        raise ValueError(f"request {request_id!r} lost K/V to KV compression; it cannot move")
    table = s.kv.block_table(req.request_id)[:cdiv(req.num_computed_tokens, s.kv.block_size)]
    if not 0 <= first_block < len(table):
        raise ValueError(f"request {request_id!r} has {len(table)} blocks; first_block "
                         f"{first_block} is out of range")
    kv, state = engine.executor.export_request(req.request_id, table[first_block:])
    handoff = RequestHandoff(
        request_id, engine.outputs.groups[request_id].prompt, list(req.prompt_token_ids),
        list(req.output_token_ids), req.params, req.seed, state, req.detokenizer.sent_chars,
        req.priority, None if req.logprobs is None else list(req.logprobs),
        req.cumulative_logprob, kv, first_block, time.time())
    engine.outputs.pop(request_id)
    s.finish(req, RequestStatus.FINISHED_ABORTED)  # blocks freed; full ones stay findable
    return handoff


def read_kv(engine: Any, request_id: str, first_block: int,
            max_blocks: int | None = None) -> tuple[list[KVPayload] | None, int]:
    """A copy of a running request's full blocks from `first_block` on (at most
    `max_blocks`: each copy holds up its steps), one payload per worker, and how many there
    are; it keeps running. (None, 0) when there is nothing new or the workers cannot be
    asked now (pipeline steps in flight)."""
    req = _running(engine, request_id)
    kv = engine.scheduler.kv
    full = req.num_computed_tokens // kv.block_size
    end = full if max_blocks is None else min(full, first_block + max_blocks)
    table = kv.block_table(req.request_id)[:end]
    if first_block >= len(table) or engine.num_steps_in_flight or req.num_evicted_tokens:
        return None, 0
    payloads, _ = engine.executor.export_request(req.request_id, table[first_block:])
    return payloads, len(table) - first_block


def stage_kv(engine: Any, request_id: str, first_block: int, payloads: list[KVPayload]) -> int:
    """Write blocks copied by `read_kv` at the source into blocks held here for the request's
    arrival; returns how many blocks are staged. Raises ValueError (nothing kept from this
    call) when they do not follow the staged ones, do not fit or are of another layout."""
    key, kv = f"{request_id}#0", engine.scheduler.kv
    staged = engine.staged_kv.get(request_id, 0)
    if request_id in engine.outputs.groups:
        raise ValueError(f"request_id {request_id!r} is already in use")
    if first_block != staged:
        raise ValueError(f"request {request_id!r}: {staged} blocks staged, got blocks from {first_block}")
    if engine.num_steps_in_flight:
        raise ValueError("cannot stage K/V while pipeline steps are in flight")
    total = (staged + payloads[0].num_blocks) * kv.block_size
    if not kv.can_allocate(key, total):
        raise ValueError(f"no room for request {request_id!r}'s K/V")
    kv.allocate(key, total)
    blocks = kv.block_table(key)[staged:]
    try:
        engine.executor.import_kv(blocks, payloads)
    except (ValueError, NotImplementedError) as exc:
        kv.trim(key, staged * kv.block_size)
        raise ValueError(str(exc)) from exc
    engine.staged_kv[request_id] = staged + len(blocks)
    return staged + len(blocks)


def drop_staged(engine: Any, request_id: str) -> None:
    """A migration that will not arrive: free what was staged for it."""
    if engine.staged_kv.pop(request_id, None) is not None:
        engine.scheduler.kv.free(f"{request_id}#0")


def import_request(engine: Any, h: RequestHandoff, stream: bool = True) -> bool:
    """Continue a handed-off request in `engine`. Returns whether its K/V was taken (False:
    it is recomputed from its tokens)."""
    if h.request_id in engine.outputs.groups:
        raise ValueError(f"request_id {h.request_id!r} is already in use")
    try:
        engine.validate_prompt(h.prompt_token_ids)
        if not h.output_token_ids:
            raise ValueError("a handoff carries at least the first generated token")
        if len(h.prompt_token_ids) + len(h.output_token_ids) >= engine.max_model_len:
            raise ValueError(f"request {h.request_id!r} does not fit this engine's context window")
    except ValueError:
        drop_staged(engine, h.request_id)
        raise
    req = Request(f"{h.request_id}#0", list(h.prompt_token_ids), h.params, engine.eos_token_ids,
                  engine.max_model_len, seed=h.seed)
    req.priority, req.generator_state = h.priority, h.generator_state
    for token in h.output_token_ids:
        req.append_token(token)
    if req.logprobs is not None and h.logprobs is not None:
        req.logprobs, req.cumulative_logprob = list(h.logprobs), h.cumulative_logprob
    req.detokenizer = IncrementalDetokenizer(engine.tokenizer, req.prompt_token_ids, h.params)
    req.detokenizer.resume(h.output_token_ids, h.text_sent)
    if h.params.structured_outputs is not None:  # the grammar's state: replay what was generated
        compiled = engine.structured.compile(h.params.structured_outputs)
        engine.structured.attach(req, compiled, engine.structured.serialize(compiled)
                                 if engine.may_draft(h.params) else None)
        for token in h.output_token_ids:
            if not req.grammar.accept_token(token):
                raise ValueError(f"request {h.request_id!r}: its output does not follow its "
                                 "structured_outputs grammar")
    req.first_scheduled_time = req.first_token_time = time.monotonic()  # counted where it ran
    took_kv = _take_kv(engine, req, h)
    engine.outputs.add(RequestGroup(h.request_id, h.prompt, [req], stream))
    if took_kv:
        engine.scheduler.adopt(req)
    else:
        engine.scheduler.add(req)  # computes prompt and output again, then goes on
    return took_kv


def _take_kv(engine: Any, req: Request, h: RequestHandoff) -> bool:
    """Blocks staged for it, then the handoff's own, into its block table; False (nothing
    held) when they are missing, do not join up or do not fit."""
    kv, n = engine.scheduler.kv, h.num_computed_tokens
    staged = engine.staged_kv.pop(h.request_id, None)
    if h.kv is None or (staged or 0) != h.kv_first_block:
        kv.free(req.request_id)
        if h.kv is not None:
            logger.warning("recomputing %s: %s of its blocks staged here, %d expected",
                           h.request_id, staged or 0, h.kv_first_block)
        return False
    if engine.num_steps_in_flight:  # the workers answer in order: no call between steps in flight
        kv.free(req.request_id)
        logger.warning("recomputing %s: pipeline steps are in flight", h.request_id)
        return False
    fits = h.kv_first_block + h.kv[0].num_blocks == cdiv(n, kv.block_size)
    if not fits or not kv.can_allocate(req.request_id, n):
        kv.free(req.request_id)
        logger.warning("recomputing %s: its K/V does not fit here", h.request_id)
        return False
    kv.allocate(req.request_id, n)
    try:
        engine.executor.import_kv(kv.block_table(req.request_id)[h.kv_first_block:], h.kv)
    except (ValueError, NotImplementedError) as exc:
        kv.free(req.request_id)
        logger.warning("recomputing %s: %s", h.request_id, exc)
        return False
    req.num_computed_tokens = n
    return True
