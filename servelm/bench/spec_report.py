"""Figures, cross-system ratios and the printed table of `servelm bench spec`.

Rows are named `<system>` for the n-gram proposer (prompt lookup: the names of the first
version of this benchmark, so old result files stay comparable) and `<system>-<proposer>`
for the others (`servelm-layer_skip`, `transformers-draft_model`, ...). Each peer row is
compared with the servelm row of the same proposer kind.
"""

from __future__ import annotations

from typing import Any

from servelm.bench.harness import SYSTEMS, Table, describe, print_report, ratio
from servelm.bench.spec_runners import Trace

PROPOSERS = ("ngram", "layer_skip", "draft_model", "distilled", "medusa", "eagle")


def system_name(system: str, proposer: str) -> str:
    """The row of `system` speculating with `proposer`: 'servelm', 'servelm-layer_skip', ..."""
    return system if proposer == "ngram" else f"{system}-{proposer}"


def split_system(name: str) -> tuple[str, str]:
    """`system_name` inverted: 'transformers-draft_model' -> ('transformers', 'draft_model')."""
    system, _, proposer = name.partition("-")
    return system, proposer or "ngram"


def figures(traces: list[Trace]) -> dict[str, Any]:
    """Totals and rates of one variant on one dataset."""
    dec_tok, dec_s = sum(t.decode_tokens for t in traces), sum(t.decode_s for t in traces)
    steps = (None if any(t.decode_steps is None for t in traces)
             else sum(t.decode_steps or 0 for t in traces))
    out: dict[str, Any] = {
        "num_requests": len(traces), "output_tokens": sum(len(t.token_ids) for t in traces),
        "decode_tokens": dec_tok, "decode_s": dec_s,
        "decode_tok_s": dec_tok / dec_s if dec_s > 0 else None,
        "ttft_s": describe([t.ttft_s for t in traces]),
        "decode_steps": steps, "tokens_per_step": dec_tok / steps if steps else None,
    }
    if all(t.proposed is not None for t in traces):
        proposed, accepted = sum(t.proposed or 0 for t in traces), sum(t.accepted or 0 for t in traces)
        out.update(spec_proposed_tokens=proposed, spec_accepted_tokens=accepted,
                   acceptance_rate=accepted / proposed if proposed else None)
    return out


def compare(plain: list[Trace], spec: list[Trace]) -> dict[str, Any]:
    """Both variants' figures, the speedup and how often their outputs are identical."""
    a, b = figures(plain), figures(spec)
    differ = [i for i, (x, y) in enumerate(zip(plain, spec, strict=True))
              if x.token_ids != y.token_ids]
    return {"baseline": a, "speculative": b,
            "speedup": ratio(b["decode_tok_s"] or None, a["decode_tok_s"]),
            "identical_fraction": 1 - len(differ) / max(1, len(plain)),
            "differing_requests": differ}


def num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def vs_servelm(result: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """servelm decode tok/s / each peer's, per dataset, peer row and variant (above 1: servelm
    faster), each peer row against the servelm row of the same proposer."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, per_system in result["results"].items():
        for peer, r in per_system.items():
            system, proposer = split_system(peer)
            sv = per_system.get(system_name("servelm", proposer))
            if system == "servelm" or sv is None:
                continue
            out.setdefault(name, {})[peer] = {
                v: ratio(sv[v]["decode_tok_s"] or None, r[v]["decode_tok_s"])
                for v in ("baseline", "speculative")}
    return out


def _order(name: str) -> tuple[int, int]:
    system, proposer = split_system(name)
    return (PROPOSERS.index(proposer) if proposer in PROPOSERS else len(PROPOSERS),
            SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS))


def describe_proposer(proposer: str, sc: dict[str, Any]) -> str:
    """One proposer's settings in a few words, for the table title."""
    k = sc["num_speculative_tokens"]
    if proposer == "ngram":
        return f"ngram k={k}, n-grams {sc['prompt_lookup_min']}-{sc['prompt_lookup_max']}"
    what = {"layer_skip": f"L={sc.get('num_layers')}", "medusa": f"heads {sc.get('model')}",
            "eagle": f"draft layer {sc.get('model')}"}.get(proposer, f"draft {sc.get('model')}")
    tree = f", tree {sc['tree']}" if sc.get("tree") else ""
    return f"{proposer} {what}, k={k}{tree}"


def print_table(result: dict[str, Any]) -> None:
    """One row per dataset and system, grouped by proposer, then cross-system ratios and notes."""
    cfg = result["config"]
    cols = ["dataset", "system", "req", "out tok", "TTFT med ms", "decode tok/s",
            "spec TTFT med ms", "spec decode tok/s", "speedup", "accept", "tok/step",
            "identical"]

    def ms(stats: dict[str, float] | None) -> str:
        return "-" if stats is None else f"{stats['median'] * 1e3:.1f}"

    rows = []
    for name, per_system in result["results"].items():
        for system in sorted(per_system, key=_order):
            r = per_system[system]
            a, b = r["baseline"], r["speculative"]
            rows.append([name, system, str(a["num_requests"]),
                         f"{a['output_tokens']}/{b['output_tokens']}", ms(a["ttft_s"]),
                         num(a["decode_tok_s"]), ms(b["ttft_s"]), num(b["decode_tok_s"]),
                         "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                         num(b.get("acceptance_rate"), ".0%"), num(b["tokens_per_step"], ".2f"),
                         f"{r['identical_fraction']:.0%}"])
    notes = ["speedup: speculative decode tok/s / the same system's without speculation; "
             "decode = tokens after the first / time after the first token; out tok: "
             "plain/speculative; identical: requests whose speculative output ids equal the "
             "plain ones; rows named <system>-<proposer> draft with that proposer, the others "
             "by prompt lookup (ngram)"]
    for name, peers in result.get("vs_servelm", {}).items():
        parts = [f"{peer} {num(r['baseline'], '.2f')}x plain, {num(r['speculative'], '.2f')}x "
                 f"speculative" for peer, r in peers.items()]
        notes.append(f"{name}: servelm / peer decode tok/s, same proposer (>1 = servelm "
                     "faster): " + "; ".join(parts))
    for name, per_system in result["results"].items():
        for system, r in per_system.items():
            if split_system(system)[0] == "servelm" and r["differing_requests"]:
                notes.append(f"WARNING {name}: {system}'s speculative output differs from its "
                             f"plain one for requests {r['differing_requests']} (verification "
                             "should be lossless)")
    notes += [d["skipped"] for d in result["datasets"].values() if "skipped" in d]
    notes += [s["skipped"] for s in result["systems"].values() if "skipped" in s]
    notes += [f"{s}: {i['token_tree']}" for s, i in result["systems"].items() if "token_tree" in i]
    notes.append(f"results: {result['result_file']}")
    title = (f"spec: batch 1, up to {cfg['max_tokens']} output tokens; "
             + "; ".join(describe_proposer(p, sc) for p, sc in cfg["speculative_config"].items()))
    print_report([Table(title, cols, rows)], notes)
