"""docs/istio.md: the conversion it walks through prints what the page shows at each step."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from mesh import Config, ConfigError, parse_documents
from mesh.catalog import Catalog, Instance
from mesh.explain import explain
from sdk.address import HostPort
from tests.unit.mesh.test_docs import fenced_blocks

PAGE = (Path(__file__).resolve().parents[3] / "docs" / "istio.md").read_text()
BLOCKS = fenced_blocks(PAGE)
EXPORT, SERVICE = [text for language, text in BLOCKS if language == "yaml"]
STEP_1, STEP_2 = [text for language, text in BLOCKS if language == ""]


def problems(text: str) -> str:
    try:
        Config().apply(parse_documents(text, source="reviews.yaml"))
    except ConfigError as err:
        return "".join(f"{error}\n" for error in err.errors)
    return ""


def step_2_input() -> str:
    return (EXPORT.replace('  resourceVersion: "48213"\n', "")
            .replace("cluster.local/ns/bookinfo/sa/bookinfo-productpage",
                     "spiffe://example.org/productpage"))  # fmt: skip


def test_each_step_prints_what_the_page_shows() -> None:
    assert problems(EXPORT) == STEP_1
    assert problems(step_2_input()) == STEP_2
    assert problems(step_2_input() + "---\n" + SERVICE) == ""


def reviews_instance(port: int, version: str) -> Instance:
    return Instance(service="reviews", address=HostPort("10.0.0.7", port),
                    node="spiffe://example.org/node/a", labels={"app": "reviews",
                    "version": version}, health="healthy", since=datetime(2026, 1, 1, tzinfo=UTC),
                    spiffe_id="spiffe://example.org/reviews")  # fmt: skip


def test_the_converted_configuration_splits_90_10_and_allows_the_product_page() -> None:
    config, _ = Config().apply(parse_documents(step_2_input() + "---\n" + SERVICE))
    catalog = Catalog([reviews_instance(9080, "v1"), reviews_instance(9081, "v2")])

    allowed = explain(config, catalog, caller="spiffe://example.org/productpage",
                      service="reviews", path="/reviews/0")
    assert allowed.allowed
    assert [item.destination.weight for item in allowed.destinations] == [90, 10]
    assert allowed.decision is not None
    assert str(allowed.decision.rule) == "AuthorizationPolicy reviews-viewer spec.rules[0]"

    refused = explain(config, catalog, caller="spiffe://example.org/ratings",
                      service="reviews", path="/reviews/0")
    assert not refused.allowed
