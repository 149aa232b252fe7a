"""docs/mesh.md: every YAML example loads, and together they are one configuration."""

from __future__ import annotations

import re
from pathlib import Path

from mesh import Config, parse_documents
from tests.unit.mesh.documents import errors

DOCS = Path(__file__).resolve().parents[3] / "docs" / "mesh.md"


def fenced_blocks(page: str) -> list[tuple[str, str]]:
    """Each fenced block of a Markdown page: (its language, its text)."""
    return [
        (match.group(1), match.group(2))
        for match in re.finditer(r"^```(\w*)\n(.*?)^```$", page, re.DOTALL | re.MULTILINE)
    ]


BLOCKS = fenced_blocks(DOCS.read_text())
EXAMPLES = [text for language, text in BLOCKS if language == "yaml"]
SHOWN = [text for language, text in BLOCKS if language == ""]


def test_every_example_parses_and_applies_together() -> None:
    assert len(EXAMPLES) >= 8
    resources = [resource for example in EXAMPLES for resource in parse_documents(example)]
    kinds = {resource.KIND for resource in resources}
    assert kinds == {
        "Gateway",
        "VirtualService",
        "DestinationRule",
        "AuthorizationPolicy",
        "RequestAuthentication",
        "Service",
        "RateLimit",
    }
    config, changes = Config().apply(resources)
    assert {change.action for change in changes} == {"created"}
    assert config.check() == []


def test_the_errors_the_page_shows_are_the_ones_tessera_prints() -> None:
    mission = EXAMPLES[0]
    assert "kind: Gateway" in mission and "kind: VirtualService" in mission
    missing_host = (
        "VirtualService microservice-virtual-service: spec.http[0].route[0].destination.host: "
        "host users-service names no Service\n"
    )
    assert missing_host in SHOWN
    assert [str(e) for e in Config(parse_documents(mission)).check()] == [missing_host.strip()]

    cors = mission.replace("  - match:\n", "  - corsPolicy: {allowOrigins: []}\n    match:\n")
    [cors_error] = errors(cors)
    assert cors_error + "\n" in SHOWN


def test_the_subset_error_the_page_shows() -> None:
    # Made by tests/unit/mesh/test_references.py::test_a_subset_no_rule_defines.
    assert (
        "VirtualService reviews: spec.http[0].route[1].destination.subset: subset v3 is not "
        "defined by any DestinationRule for host reviews\n"
    ) in SHOWN
