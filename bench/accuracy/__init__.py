"""Accuracy checks: the kit's figures against an established tool, same machine, same run."""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Comparison:
    metric: str
    ours: float
    reference: float
    reference_tool: str
    tolerance: float

    @property
    def deviation(self) -> float:
        return abs(self.ours - self.reference) / self.reference

    @property
    def within(self) -> bool:
        return self.deviation <= self.tolerance


def report(title: str, rows: list[Comparison], out: Console | None = None) -> int:
    out = out or Console()
    table = Table(title=title)
    for col in ("metric", "dgxready", "reference", "tool", "deviation", "bound", ""):
        table.add_column(col)
    for r in rows:
        table.add_row(r.metric, f"{r.ours:.4g}", f"{r.reference:.4g}", r.reference_tool,
                      f"{r.deviation:.1%}", f"{r.tolerance:.0%}",
                      "[green]ok" if r.within else "[red]OUT OF BOUNDS")
    out.print(table)
    return 0 if all(r.within for r in rows) else 1
