"""docs/mesh.md, "How a request is routed": what it shows is what the compiler does."""

from __future__ import annotations

import re
from pathlib import Path

from mesh import Catalog, defaults, explain, explain_gateway
from mesh.view import format_duration
from tests.unit.mesh.documents import MISSION, USERS_SERVICE
from tests.unit.mesh.meshes import BILLING, GATEWAY, INGRESS, USERS_INSTANCES, configured

PAGE = (Path(__file__).resolve().parents[3] / "docs" / "mesh.md").read_text()
SECTION = PAGE.split("## How a request is routed", 1)[1].split("\n## ", 1)[0]
SHOWN = re.findall(r"^```text\n(.*?)^```$", SECTION, re.DOTALL | re.MULTILINE)


EXAMPLES = re.findall(r"^```yaml\n(.*?)^```$", PAGE, re.DOTALL | re.MULTILINE)


def test_the_explanations_shown_are_the_ones_tessera_gives() -> None:
    config = configured(MISSION, USERS_SERVICE)
    outputs = [
        "\n".join(
            explain_gateway(
                config, Catalog(USERS_INSTANCES), labels=INGRESS, port=80,
                host="shop.example.com", path=path, spiffe_id=GATEWAY,
            ).lines()
        ) + "\n"
        for path in ("/api/v1/users", "/api/v1/orders")
    ]  # fmt: skip
    # The page's AuthorizationPolicies, before any instance of users-service registers.
    [policies] = [example for example in EXAMPLES if "name: users-readers" in example]
    before_instances = explain(
        configured(USERS_SERVICE, policies), Catalog(), caller=BILLING, service="users-service",
        path="/api/v1/users",
    )  # fmt: skip
    outputs.append("\n".join(before_instances.lines()) + "\n")
    assert outputs == SHOWN


def test_the_defaults_table_says_what_the_compiler_does() -> None:
    retry_on = ",".join(defaults.RETRY_ON)
    for text in (
        f"{defaults.RETRY_ATTEMPTS} attempts on `{retry_on}`",
        f"status {defaults.RETRY_STATUS_CODES[0]} retriable",
        f"| `loadBalancer` | `{defaults.LOAD_BALANCING}` |",
        f"`connectTimeout` {format_duration(defaults.CONNECT_TIMEOUT)}",
        "`idleTimeout` 1h",
        f"`consecutive5xxErrors` {defaults.OUTLIER_CONSECUTIVE_5XX_ERRORS}",
        f"`interval` {format_duration(defaults.OUTLIER_INTERVAL)}",
        f"`baseEjectionTime` {format_duration(defaults.OUTLIER_BASE_EJECTION_TIME)}",
        f"`maxEjectionPercent` {defaults.OUTLIER_MAX_EJECTION_PERCENT}",
        f"without `redirectCode` | {defaults.REDIRECT_CODE}",
        f"the `{defaults.JWT_PARAM}` query parameter",
    ):
        assert text in SECTION, text
    assert defaults.IDLE_TIMEOUT.total_seconds() == 3600
    assert defaults.MIRROR_PERCENTAGE == 100
