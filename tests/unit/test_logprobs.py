"""logprobs_for: values, ranks and top-k come from the raw distribution."""

import torch

from servelm.worker.logprobs import logprobs_for


def test_logprobs_match_log_softmax_with_ranks_and_top_k() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    raw = logits.log_softmax(-1)
    targets = [int(raw[0].argmax()), int(raw[1].argsort()[-3]), int(raw[2].argmin())]
    out = logprobs_for(logits, targets, k=4)
    for row, (entry, t) in enumerate(zip(out, targets)):
        assert abs(entry[t].logprob - raw[row, t].item()) < 1e-6
        top = raw[row].topk(4)
        for rank, (tid, val) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert entry[tid].rank == rank and abs(entry[tid].logprob - val) < 1e-6
    assert out[0][targets[0]].rank == 1
    assert out[1][targets[1]].rank == 3
    assert out[2][targets[2]].rank == 30 and len(out[2]) == 5


def test_zero_top_k_returns_only_the_target() -> None:
    out = logprobs_for(torch.randn(2, 10), [1, 2], k=0)
    assert [list(e) for e in out] == [[1], [2]]
