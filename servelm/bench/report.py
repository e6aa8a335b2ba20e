"""Terminal output shared by the benchmarks: rich tables and the notes under them."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def make_table(title: str, cols: list[str], rows: list[list[str]] | None = None) -> Table:
    """First column left-aligned (labels), the rest right-aligned (numbers)."""
    table = Table(title=title)
    for i, c in enumerate(cols):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows or []:
        table.add_row(*r)
    return table


def console() -> Console:
    out = Console()
    return out if out.is_terminal else Console(width=220)  # logs and pipes: do not wrap


def print_report(tables: list[Table], notes: list[str]) -> None:
    """Tables, then plain-text notes (no markup: they hold paths and pip extras in brackets)."""
    out = console()
    for t in tables:
        out.print(t)
    for n in notes:
        out.print(n, markup=False, highlight=False)


def energy_note(result: dict[str, Any], systems: tuple[str, ...]) -> str | None:
    """One line with why energy is missing for the systems that ran, if it is."""
    reasons = {r.get("energy_unavailable_reason") for k in systems
               if isinstance(r := result.get(k), dict) and "skipped" not in r
               and r.get("energy_j") is None} - {None}
    return "energy unavailable: " + "; ".join(sorted(reasons)) if reasons else None
