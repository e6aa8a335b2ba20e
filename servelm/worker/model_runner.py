"""Runs one step for the scheduler: the worker's request copies brought up to date, drafts
proposed, one forward pass over every scheduled token, then sampling or verification.

Everything it gets and returns is plain data (servelm/step_io.py); the model, the KV
tensors and each request's random generator stay here.

Every tensor-parallel rank runs all of this alike, sampling included: the logits are
gathered whole on each rank and every rank holds the same generators, so the ranks stay
in step (drafts and all) without sending sampled tokens around; the engine keeps the
output of one. A pipeline stage before the last sends its residual stream on instead of
sampling; the ranks after it receive it in place of the embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from servelm.kv.compression import CompressionConfig
from servelm.model.batch import SeqChunk, StepBatch, build_step_batch
from servelm.model.llama import LlamaForCausalLM
from servelm.ops.attention import AttentionBackend, ScoredRows, attention_context
from servelm.ops.sampler import Sampler, SamplingMetadata, apply_token_bitmask
from servelm.speculative.proposer import Draft, DraftRequest, Proposer
from servelm.speculative.verify import verify
from servelm.step_io import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from servelm.worker.cache_engine import CacheEngine
from servelm.worker.cuda_graphs import DecodeGraphs
from servelm.worker.draft_grammar import DraftGrammars
from servelm.worker.logprobs import logprobs_for
from servelm.worker.request_state import CachedRequestState, RequestStates


def _chunk(state: CachedRequestState, n: int, draft: Draft | None) -> SeqChunk:
    """A request's `n` new tokens this step (drafts after the real ones): after the K/V
    its cache holds, at their true positions when KV compression dropped some; a draft
    tree with its positions and attention mask."""
    start = state.num_computed_tokens
    ids = state.token_ids[start:start + n]
    if draft is not None:
        ids = ids + draft.token_ids
    chunk = SeqChunk(ids, state.num_kv_tokens)
    if state.num_evicted_tokens:
        chunk.positions = list(range(start, start + len(ids)))
    if draft is not None and draft.tree is not None:
        nodes = range(draft.tree.size + 1)  # the root (the last real token, at `start`) and the tree
        chunk.positions, chunk.tree_mask = draft.tree.positions(start, nodes), draft.tree.mask(start, nodes)
    return chunk


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, attention: AttentionBackend, cache: CacheEngine,
                 proposer: Proposer | None, block_size: int, dtype: torch.dtype,
                 compression: CompressionConfig | None, device: torch.device = torch.device("cpu")) -> None:
        self.model, self.attention, self.cache, self.proposer = model, attention, cache, proposer
        self.block_size, self.dtype, self.compression = block_size, dtype, compression
        self.device = device
        self.states = RequestStates(device)
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA), set by the worker
        self._grammar: dict[str, int] = {}  # this step's structured requests -> bitmask row
        self._bitmask: torch.Tensor | None = None
        self.draft_grammars = DraftGrammars()  # drafts of structured requests checked here
        # Called each step with (request id, first position, final hidden states [n, hidden])
        # of the request's tokens computed for good (prompt chunks, decodes, accepted drafts),
        # in position order: Medusa and EAGLE draft from them; `train-draft` records them.
        self.hidden_observers: list[Callable[[str, int, torch.Tensor], None]] = []
        if hasattr(proposer, "observe"):
            self.hidden_observers.append(proposer.observe)

    @torch.inference_mode()
    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        if step.verified_drafts and not self.model.parallel.is_last_stage:
            self._apply_verified(step)
        stale = self.states.update(step)
        self.draft_grammars.admit(step, self.states)
        if self.proposer is not None:
            for req_id in stale:
                self.proposer.reset(req_id)
        if step.moves_kv:  # before any block is written again
            self.cache.move_kv(step)
        scheduled = step.scheduled
        out = ModelRunnerOutput(req_ids=[s.req_id for s in scheduled])
        if not scheduled:
            return out
        states = [self.states[s.req_id] for s in scheduled]
        drafts = self._propose(scheduled, states)
        # Real tokens this step (a proposer may return fewer drafts than were granted).
        num_real = [s.num_new_tokens - s.num_draft_tokens for s in scheduled]
        chunks = [_chunk(st, n, d) for st, n, d in zip(states, num_real, drafts)]
        pieces, owner = self._pieces(chunks, drafts)
        batch = build_step_batch(pieces, [states[i].block_table for i in owner], self.block_size,
                                 self.dtype, self.attention.pads_decodes, self.attention.pages_prefills,
                                 self.device)
        if self.cache.kv.scores is not None:
            self._mark_scored(batch, states, chunks)
        parallel = self.model.parallel
        hidden = self.graphs.run(batch) if self.graphs is not None else None
        if hidden is None:
            with attention_context(batch.attn):
                residual = None if parallel.is_first_stage else parallel.recv_prev(
                    (len(batch.input_ids), self.model.arch.hidden_size), self.dtype)
                hidden = self.model(batch.input_ids, batch.positions, residual=residual)
        if parallel.is_last_stage:
            self._grammar = {req_id: row for row, req_id in enumerate(step.grammar_req_ids)}
            self._bitmask = (None if step.grammar_bitmask is None
                             else torch.from_numpy(step.grammar_bitmask).to(self.device))
            self._sample_and_verify(hidden, _rows_per_request(batch, pieces, owner, len(states)),
                                    states, num_real, drafts, out)
        else:
            parallel.send_next(hidden)
        out.num_evicted_tokens = ([self._compress(st, len(c.token_ids)) for st, c in zip(states, chunks)]
                                  if self.compression is not None else [0] * len(states))
        stats = parallel.take_stats()
        out.allreduce = (stats.calls, stats.bytes, stats.seconds)
        return out

    def _apply_verified(self, step: SchedulerOutput) -> None:
        """A stage before the last does now what verification did on the last one: moves
        accepted tree nodes' K/V to their positions' slots (its copy of the request still
        has the verified step's block table and root) and tells the proposer."""
        finished = set(step.finished_req_ids)
        for req_id, path in step.verified_drafts:
            st = self.states.get(req_id)
            if st is None or req_id in finished:
                continue
            self.cache.compact_tree(st.block_table, st.num_computed_tokens, path)
            self.proposer.accepted(req_id, path)

    def _propose(self, scheduled: list[ScheduledRequest],
                 states: list[CachedRequestState]) -> list[Draft | None]:
        asks = [(i, DraftRequest(s.req_id, st.token_ids, st.num_computed_tokens, st.params,
                                 st.draft_generator(), st.block_table, s.num_draft_tokens))
                for i, (s, st) in enumerate(zip(scheduled, states)) if s.num_draft_tokens]
        drafts: list[Draft | None] = [None] * len(scheduled)
        if asks:
            for (i, _), draft in zip(asks, self.proposer.propose([a for _, a in asks])):
                drafts[i] = draft if draft.token_ids else None
        return drafts

    def _pieces(self, chunks: list[SeqChunk], drafts: list[Draft | None]) -> tuple[list[SeqChunk], list[int]]:
        """The step's chunks as the batch gets them, and the request each belongs to. A chain
        of drafts after one real token goes as 1 + k single-token decodes of its request
        (same block table, each attending to the ones before it: every row's K/V is written
        before any row attends), so verification takes the decode path, on a CPU the fused
        C decoder: batch-1 ngram drafting (k=3) on MT-Bench with the default Q4_1 model went
        from 59 to 92 tok/s this way (plain decoding: 108)."""
        if self.compression is not None:  # its scores are kept per chunk
            return chunks, list(range(len(chunks)))
        pieces: list[SeqChunk] = []
        owner: list[int] = []
        for i, (c, d) in enumerate(zip(chunks, drafts)):
            if (d is not None and d.tree is None and c.positions is None
                    and len(c.token_ids) == len(d.token_ids) + 1):
                pieces.extend(SeqChunk([t], c.start + j) for j, t in enumerate(c.token_ids))
                owner.extend([i] * len(c.token_ids))
            else:
                pieces.append(c)
                owner.append(i)
        return pieces, owner

    def _sample_and_verify(self, hidden: torch.Tensor, rows_of: list[Sequence[int]],
                           states: list[CachedRequestState], num_real: list[int],
                           drafts: list[Draft | None], out: ModelRunnerOutput) -> None:
        """Logits only for the rows that need them: the last token of every request that
        samples, every row of a verified draft, and prompt positions whose logprobs are
        wanted. `rows_of[i]`: request i's rows of `hidden`, in token order. Fills `out` in
        the scheduled order."""
        n = len(states)
        sample_rows: list[int] = []
        samplers: list[int] = []
        spec_spans: list[tuple[int, Sequence[int]]] = []  # (request index, rows: root's, drafts')
        plp_spans: list[tuple[int, Sequence[int], int]] = []  # (.., rows, first position)
        for i, st in enumerate(states):
            mine, real = rows_of[i], num_real[i]
            if st.num_computed_tokens + real == st.num_tokens:
                if drafts[i] is not None:  # verify: the root's row and every draft's
                    spec_spans.append((i, mine[real - 1 : real + len(drafts[i].token_ids)]))
                else:
                    samplers.append(i)
                    sample_rows.append(mine[real - 1])
            if st.params.prompt_logprobs is not None:
                # Positions first..last of this chunk not sent yet (a recompute repeats some).
                first = max(st.num_computed_tokens, st.num_prompt_logprobs) + 1
                last = min(st.num_computed_tokens + real, st.num_prompt_tokens - 1)
                if last >= first:
                    skip = first - 1 - st.num_computed_tokens
                    plp_spans.append((i, mine[skip : skip + last - first + 1], first))
        rows = (sample_rows + [r for _, rs in spec_spans for r in rs]
                + [r for _, rs, _ in plp_spans for r in rs])
        logits = self.model.compute_logits(hidden[rows]) if rows else None

        out.sampled_token_ids = [[] for _ in range(n)]
        out.logprobs, out.prompt_logprobs = [None] * n, [None] * n
        out.num_draft_tokens, out.num_accepted_tokens = [0] * n, [0] * n
        out.accepted_paths = [[] for _ in range(n)]
        if samplers:
            self._sample(logits[: len(samplers)], [states[i] for i in samplers], samplers, out)
        offset = len(samplers)
        for i, span in spec_spans:
            count = len(span)
            st, draft, rows_i = states[i], drafts[i], logits[offset : offset + count]
            if st.grammar is not None:  # only tokens the grammar allows, at every node
                apply_token_bitmask(rows_i, self.draft_grammars.masks(st, draft))
            tokens, path = verify(rows_i, draft.token_ids, st.params, st.generator, draft.tree, draft.probs)
            out.sampled_token_ids[i] = tokens
            out.num_draft_tokens[i], out.num_accepted_tokens[i] = len(draft.token_ids), len(path)
            out.accepted_paths[i] = path
            self.proposer.accepted(st.req_id, path)
            if draft.tree is not None:
                self.cache.compact_tree(st.block_table, st.num_computed_tokens, path)
            if st.params.logprobs is not None:  # token j is scored by the row of its parent
                out.logprobs[i] = [logprobs_for(rows_i[r : r + 1], [t], st.params.logprobs)[0]
                                   for r, t in zip([0, *path], tokens)]
            offset += count
        if self.hidden_observers:
            self._observe(hidden, rows_of, states, num_real, out.accepted_paths)
        for i, span, first in plp_spans:
            st, count = states[i], len(span)
            out.prompt_logprobs[i] = logprobs_for(logits[offset : offset + count],
                                                  st.token_ids[first : first + count],
                                                  st.params.prompt_logprobs)
            st.num_prompt_logprobs = first + count - 1
            offset += count

    def _observe(self, hidden: torch.Tensor, rows_of: list[Sequence[int]], states: list[CachedRequestState],
                 num_real: list[int], paths: list[list[int]]) -> None:
        """Hand each request's rows of real tokens to the observers: its chunk's, then the
        accepted drafts' (node n's row is n after the root's; an accepted tree path lands on
        the positions after the root, as its K/V does)."""
        for i, st in enumerate(states):
            mine, real = rows_of[i], num_real[i]
            rows = [*mine[:real], *(mine[real - 1 + node] for node in paths[i])]
            if rows:
                feats = hidden[rows]
                for observe in self.hidden_observers:
                    observe(st.req_id, st.num_computed_tokens, feats)

    def _sample(self, logits: torch.Tensor, states: list[CachedRequestState], idx: list[int],
                out: ModelRunnerOutput) -> None:
        masked = [(row, self._grammar[st.req_id]) for row, st in enumerate(states)
                  if st.req_id in self._grammar] if self._grammar else []  # (most steps: none)
        if masked:  # structured outputs: only the tokens the request's grammar allows
            rows, mask_rows = zip(*masked)
            sub = logits[list(rows)]
            apply_token_bitmask(sub, self._bitmask[list(mask_rows)])
            logits[list(rows)] = sub
        meta = SamplingMetadata.build(
            [st.params for st in states],
            [st.prompt_token_ids for st in states],
            [st.output_token_ids for st in states],
            [st.generator for st in states],
            [st.stop_token_ids for st in states],
            logits.device,
        )
        tokens = self.sampler(logits, meta).tolist()
        for row, (i, st) in enumerate(zip(idx, states)):
            out.sampled_token_ids[i] = [tokens[row]]
            if st.params.logprobs is not None:
                out.logprobs[i] = logprobs_for(logits[row : row + 1], [tokens[row]], st.params.logprobs)

    def _mark_scored(self, batch: StepBatch, states: list[CachedRequestState], chunks: list[SeqChunk]) -> None:
        """Reset the scores of the slots written this step, and name the rows whose
        attention the compression policy accumulates."""
        self.cache.kv.scores.index_fill_(2, batch.attn.slot_mapping, 0.0)
        for b, i in enumerate(batch.order):
            st = states[i]
            rows = self.compression.scored_rows(st.num_computed_tokens, len(chunks[i].token_ids),
                                                st.num_prompt_tokens)
            if rows:
                offset, count = rows
                batch.attn.scored.append(ScoredRows(batch.row_start[b] + offset, count,
                                                    st.num_kv_tokens + offset,
                                                    torch.tensor(st.block_table, device=self.device)))

    def _compress(self, st: CachedRequestState, n: int) -> int:
        """Bring a request that passed its KV budget this step back to it; returns the
        tokens it dropped (the scheduler frees the blocks past the budget)."""
        comp = self.compression
        kv_len = st.num_kv_tokens + n
        if not comp.due(kv_len, st.num_computed_tokens, st.num_computed_tokens + n,
                                        st.num_prompt_tokens):
            return 0
        self.cache.compress(st.block_table, kv_len)
        return kv_len - comp.budget


def _rows_per_request(batch: StepBatch, pieces: list[SeqChunk], owner: list[int],
                      n: int) -> list[Sequence[int]]:
    """Each request's rows of the step's hidden states, in token order: a range for a request
    in one piece, a list for one split into decodes (decodes are sorted by start, so its
    pieces come in order)."""
    rows: list[Sequence[int]] = [[] for _ in range(n)]
    for b, c in enumerate(batch.order):
        start, i = batch.row_start[b], owner[c]
        mine = range(start, start + len(pieces[c].token_ids))
        rows[i] = mine if not rows[i] else [*rows[i], *mine]
    return rows
