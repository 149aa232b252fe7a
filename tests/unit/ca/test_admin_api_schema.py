"""The admin API answers what its OpenAPI schema says, checked by schemathesis.

The app is the server's real admin app (a real :class:`ca.server.Server` on
SQLite in a temporary data dir), served in-process. Schemathesis generates
requests for every operation from ``/openapi.json`` and checks each answer:
its status is documented, its content type is documented, its body matches the
documented schema, and it is never a 5xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ca.api.admin import create_admin_app
from ca.config import server_config
from ca.server import Server

EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir: Path = tmp_path_factory.mktemp("schema") / "server"
    # Never listens: port 0, so a server running on 8081 meanwhile does not matter.
    server = Server(server_config({"trust_domain": "example.org", "data_dir": str(data_dir),
                                   "bind": "127.0.0.1:0"}))
    yield server
    server.store.close()


@pytest.fixture(scope="module")
def admin_schema(admin_server: Server) -> Any:
    app = create_admin_app(
        store=admin_server.store,
        authorities=admin_server.authorities,
        issuer=admin_server.issuer,
        clock=admin_server.clock,
        changed=lambda: None,
        health=admin_server.health,
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_answer_matches_the_schema(admin_schema: Any) -> None:
    failures = []
    operations = [result.ok() for result in admin_schema.get_all_operations()]
    assert len(operations) > 30

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def conforms(case: Any) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            conforms()
        except BaseExceptionGroup as err:  # every operation is tried; all failures reported
            failures.append(f"{operation.label}: {err}")
    assert not failures, "\n\n".join(failures)


def test_the_schema_documents_the_error_model_not_422(admin_schema: Any) -> None:
    document = admin_schema.raw_schema
    operations = [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]
    assert operations
    for path, method, operation in operations:
        assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    error = document["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    entry = document["paths"]["/v1/entries/{entry_id}"]["get"]["responses"]
    assert sorted(entry) == ["200", "400", "404"]
    assert entry["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    create = document["paths"]["/v1/entries"]["post"]["responses"]
    assert sorted(create) == ["201", "400", "409", "413"]
    bundle = document["paths"]["/v1/bundle"]["get"]["responses"]["200"]["content"]
    assert bundle["application/x-pem-file"]["schema"] == {"type": "string"}
    assert "application/json" in bundle
