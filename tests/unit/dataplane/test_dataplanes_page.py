"""docs/dataplanes.md's table of scenarios says what the scenario suite's marks say.

Each scenario test is marked with the data planes that do it (``supported_by``); the
others are expected to fail, strictly. The table between the page's ``<!-- scenarios``
markers must be the one :func:`scenario_table` makes from those marks, so the page is
only as right as the suite that runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tests.integration.mesh_fixtures import PLANES, SCENARIO, ScenarioCase

ROOT = Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "dataplanes.md"
HEADINGS = {"envoy": "Envoy", "builtin": "built-in"}


def scenario_cases() -> list[ScenarioCase]:
    cases = []
    for path in sorted((ROOT / "tests" / "integration").glob("test_mesh_scenarios_*.py")):
        module = importlib.import_module(f"tests.integration.{path.stem}")
        cases += [getattr(test, SCENARIO) for name, test in vars(module).items()
                  if name.startswith("test_") and hasattr(test, SCENARIO)]  # fmt: skip
    return cases


def scenario_table(cases: list[ScenarioCase]) -> str:
    rows = [
        "| scenario | " + " | ".join(HEADINGS[plane] for plane in PLANES) + " |",
        "| --- |" + " --- |" * len(PLANES),
    ]
    for case in cases:
        marks = ["yes" if plane in case.planes else "not yet" for plane in PLANES]
        rows.append(f"| {case.case} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def test_the_pages_scenario_table_is_the_suites() -> None:
    cases = scenario_cases()
    assert cases, "no scenario test found"
    text = PAGE.read_text()
    start = text.index("<!-- scenarios")
    start = text.index("-->\n", start) + len("-->\n")
    end = text.index("<!-- /scenarios -->")
    expected = scenario_table(cases)
    assert text[start:end].strip() == expected, (
        f"docs/dataplanes.md's scenario table is not the suite's; put this there:\n{expected}"
    )
