"""From sequences back to what the caller asked for: the n samples of one request grouped
into one `RequestOutput`, streamed text deltas, and a failure of one sample failing its
whole request."""

from __future__ import annotations

from dataclasses import dataclass

from servelm.engine.request import Request
from servelm.outputs import CompletionOutput, RequestMetrics, RequestOutput


@dataclass
class RequestGroup:
    """The n sequences of one user request, reported together."""

    request_id: str
    prompt: str | None
    seqs: list[Request]
    stream: bool
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class OutputProcessor:
    def __init__(self) -> None:
        self.groups: dict[str, RequestGroup] = {}
        self._group_of: dict[str, RequestGroup] = {}  # sequence id -> its group
        self.num_finished = 0

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group
        for seq in group.seqs:
            self._group_of[seq.request_id] = group

    def pop(self, request_id: str) -> RequestGroup | None:
        group = self.groups.pop(request_id, None)
        for seq in group.seqs if group else ():
            self._group_of.pop(seq.request_id, None)
        return group

    def failed_siblings(self, progressed: list[Request]) -> list[Request]:
        """The unfinished samples of requests one of whose samples failed this step: the
        caller finishes them, as the whole request fails."""
        siblings = []
        for seq in progressed:
            group = self._group_of.get(seq.request_id)
            if seq.error is not None and group is not None and group.error is None:
                group.error = seq.error
                siblings += [s for s in group.seqs if not s.is_finished]
        return siblings

    def process(self, progressed: list[Request]) -> list[RequestOutput]:
        """Outputs for the groups that made progress: finished ones (then forgotten), and
        streaming ones that got tokens."""
        touched = {g.request_id: g for s in progressed if (g := self._group_of.get(s.request_id))}
        outputs = []
        for group in touched.values():
            if group.finished:
                outputs.append(self.make_output(group))
                self.pop(group.request_id)
                self.num_finished += 1
            elif group.stream:
                outputs.append(self.make_output(group))
        return outputs

    @staticmethod
    def make_output(group: RequestGroup) -> RequestOutput:
        first = group.seqs[0]
        completions = []
        for i, req in enumerate(group.seqs):
            if group.error is not None:
                delta = ""  # the failure may be in the detokenizer itself
            else:  # flush() releases held-back text and any bytes of an unfinished character
                delta = req.detokenizer.flush() if req.is_finished else req.detokenizer.get_delta()
            completions.append(CompletionOutput(
                index=i,
                text=req.detokenizer.output_text,
                token_ids=list(req.output_token_ids),
                finish_reason=req.status.value if req.is_finished else None,
                stop_reason=req.stop_reason,
                logprobs=req.logprobs,
                cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
                delta_text=delta if group.stream else "",
            ))
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=group.finished,
            prompt_logprobs=first.prompt_logprobs,
            metrics=RequestMetrics(first.arrival_time, first.first_scheduled_time,
                                   first.first_token_time, first.finished_time),
            error=group.error,
            num_cached_tokens=first.num_cached_tokens,
            spec_proposed_tokens=sum(r.spec_proposed for r in group.seqs),
            spec_accepted_tokens=sum(r.spec_accepted for r in group.seqs),
            spec_num_drafts=sum(r.spec_drafts for r in group.seqs),
        )
