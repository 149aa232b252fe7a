"""What a benchmark reports: figures, each next to the ceiling measured in the same run.

    figure = Figure("issuance", "X509-SVIDs/s per server core (SQLite)", 2800.0, "/s",
                    ceiling="8,900/s (openssl sign+verify)", target=">= 3,000/s",
                    met=False)
    print(render_table([figure]))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


class Skipped(Exception):
    """Raised by a scenario that cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Figure:
    """One measured number. ``met`` is None when the figure has no target."""

    scenario: str
    measure: str
    value: float | None
    unit: str
    ceiling: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    data: dict[str, float] = field(default_factory=dict)
    """The numbers behind the figure, by name, for the JSON (not printed)."""

    @property
    def shown(self) -> str:
        if self.value is None:
            return self.note or "-"
        return f"{format_number(self.value)}{self.unit}"


@dataclass
class Outcome:
    """Everything one scenario reported, or why it did not run."""

    scenario: str
    figures: list[Figure] = field(default_factory=list)
    skipped: str = ""
    failed: str = ""
    seconds: float = 0.0


def format_number(value: float) -> str:
    """Three significant figures, thousands separated: 2,840 · 0.412 · 12.5."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def verdict(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: ""}[met]


def render_table(outcomes: Sequence[Outcome]) -> str:
    header = ("scenario", "measure", "Tessera", "ceiling (same machine, same run)", "target",
              "met")
    rows: list[tuple[str, ...]] = []
    for outcome in outcomes:
        if outcome.failed:
            rows.append((outcome.scenario, "FAILED", outcome.failed, "", "", "NO"))
        elif outcome.skipped:
            rows.append((outcome.scenario, "skipped", outcome.skipped, "", "", ""))
        for figure in outcome.figures:
            rows.append((figure.scenario, figure.measure, figure.shown, figure.ceiling,
                         figure.target, verdict(figure.met)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    notes = [f"- {figure.scenario}, {figure.measure}: {figure.note}"
             for outcome in outcomes for figure in outcome.figures
             if figure.value is not None and figure.note]
    return "\n".join([line(header), rule, *(line(row) for row in rows),
                      *(["", "Notes:", *notes] if notes else [])])


def write_json(outcomes: Sequence[Outcome], path: Path, machine: dict[str, object]) -> None:
    document = {"machine": machine, "scenarios": [asdict(o) for o in outcomes]}
    path.write_text(json.dumps(document, indent=2) + "\n")
