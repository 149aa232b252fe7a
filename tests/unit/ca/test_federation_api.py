"""The admin API's federation endpoints, in process, with a fake bundle endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from spiffe import TrustDomain

from ca.api.errors import install_error_handlers
from ca.datastore.store import Datastore
from ca.federation.api import federation_router
from ca.federation.client import BundleFetchError
from sdk.clock import ManualClock
from tests.unit.ca.conftest import START
from tests.unit.ca.federation_helpers import FakeEndpoint, bundle, call

BASE = "/v1/federation/relationships"
URL = "https://partner.example:8443"
CREATE = {
    "trust_domain": "partner.org",
    "bundle_endpoint_url": URL,
    "bundle_endpoint_profile": "https_spiffe",
    "endpoint_spiffe_id": "spiffe://partner.org/tessera/server",
}


class Harness:
    def __init__(self, store: Datastore) -> None:
        self.store = store
        self.endpoint = FakeEndpoint()
        self.woken = 0
        self.audited: list[tuple[str, str, dict[str, Any] | None]] = []
        self.app = FastAPI()
        install_error_handlers(self.app)
        self.app.include_router(federation_router(
            store=store,
            trust_domain=TrustDomain("example.org"),
            changed=self.wake,
            audit=lambda action, target, details: self.audited.append((action, target, details)),
            fetch=self.endpoint,
        ))

    def wake(self) -> None:
        self.woken += 1

    def request(self, method: str, path: str, status: int, **kwargs: Any) -> Any:
        response: Any = call(self.app, method, path, **kwargs)
        assert response.status_code == status, response.text
        return response.json()

    def error(self, method: str, path: str, status: int, **kwargs: Any) -> str:
        return str(self.request(method, path, status, **kwargs)["error"]["message"])


@pytest.fixture
def api(sqlite_url: str) -> Iterator[Harness]:
    with Datastore.open(sqlite_url, clock=ManualClock(START)) as store:
        yield Harness(store)


def test_https_spiffe_needs_the_first_bundle(api: Harness):
    message = api.error("POST", BASE, 400, json=CREATE)

    assert message == (
        "profile https_spiffe needs the current bundle of partner.org to authenticate its "
        "endpoint the first time; give it with --trust-domain-bundle-path FILE (e.g. the "
        "output of 'tessera server bundle show --format spiffe' on a server of partner.org)"
    )
    assert api.store.list_federation_relationships() == []


def test_create_with_a_pem_bundle_then_show_and_list(api: Harness):
    given = bundle("partner.org", 0)
    body = {**CREATE, "trust_domain_bundle": given.to_pem().decode()}

    created = api.request("POST", BASE, 201, json=body)

    assert created == {
        "trust_domain": "partner.org",
        "bundle_endpoint_url": URL,
        "bundle_endpoint_profile": "https_spiffe",
        "endpoint_spiffe_id": "spiffe://partner.org/tessera/server",
        "created_at": int(START.timestamp()),
        "updated_at": int(START.timestamp()),
        "last_refresh_at": None,
        "last_error": None,
        "bundle": {
            "spiffe_sequence": 0, "refresh_hint": 300, "x509_authorities": 1, "jwt_authorities": 0
        },
    }
    assert api.request("GET", f"{BASE}/partner.org", 200) == created
    assert api.request("GET", BASE, 200) == {"relationships": [created]}
    assert api.woken == 1
    assert api.audited == [("federation.create", "spiffe://partner.org", {
        "bundle_endpoint_url": URL,
        "bundle_endpoint_profile": "https_spiffe",
        "endpoint_spiffe_id": "spiffe://partner.org/tessera/server",
        "bundle_given": True,
    })]


def test_an_already_stored_bundle_is_enough(api: Harness):
    api.store.set_federated_bundle("partner.org", bundle("partner.org", 0).to_spiffe_json())

    created = api.request("POST", BASE, 201, json=CREATE)

    assert created["bundle"]["x509_authorities"] == 1
    assert api.woken == 0


def test_a_jwt_only_bundle_cannot_authenticate_an_https_spiffe_endpoint(api: Harness):
    given = bundle("partner.org", jwt_slots=(0,)).to_spiffe_json().decode()

    message = api.error("POST", BASE, 400, json={**CREATE, "trust_domain_bundle": given})

    assert message == (
        "the given bundle holds no X.509 authorities; profile https_spiffe needs them to "
        "authenticate the endpoint of partner.org"
    )


def test_update_replaces_settings_and_may_switch_profile(api: Harness):
    api.request("POST", BASE, 201, json={**CREATE, "trust_domain_bundle":
                                         bundle("partner.org", 0).to_pem().decode()})
    web = {**CREATE, "bundle_endpoint_profile": "https_web", "endpoint_spiffe_id": None,
           "bundle_endpoint_url": "https://bundle.partner.example"}

    updated = api.request("PUT", f"{BASE}/partner.org", 200, json=web)

    assert (updated["bundle_endpoint_profile"], updated["endpoint_spiffe_id"],
            updated["bundle_endpoint_url"]) == ("https_web", None, "https://bundle.partner.example")
    assert api.error("PUT", f"{BASE}/partner.org", 400, json={**web, "trust_domain": "x.org"}) == (
        "the body names trust domain x.org, the path partner.org; a relationship's trust "
        "domain cannot change (delete it and create another)"
    )
    assert api.error("PUT", f"{BASE}/other.org", 404, json={**web, "trust_domain": "other.org"})\
        .startswith("no federation relationship with trust domain other.org")


def test_refresh_reports_the_error_sentence(api: Harness):
    api.store.set_federated_bundle("partner.org", bundle("partner.org", 0).to_spiffe_json())
    api.request("POST", BASE, 201, json=CREATE)
    api.endpoint.answer = BundleFetchError(f"cannot reach the bundle endpoint {URL} (refused)")

    message = api.error("POST", f"{BASE}/partner.org/refresh", 503)

    assert message == f"cannot reach the bundle endpoint {URL} (refused)"
    shown = api.request("GET", f"{BASE}/partner.org", 200)
    assert shown["last_error"] == message
    assert shown["last_refresh_at"] == int(START.timestamp())


def test_refresh_stores_the_new_bundle(api: Harness):
    api.store.set_federated_bundle("partner.org", bundle("partner.org", 0).to_spiffe_json())
    api.request("POST", BASE, 201, json=CREATE)
    api.endpoint.answer = bundle("partner.org", 0, 1, sequence=2, refresh_hint=60)\
        .to_spiffe_json()

    refreshed = api.request("POST", f"{BASE}/partner.org/refresh", 200)

    assert refreshed["changed"] is True
    assert refreshed["bundle"] == {
        "spiffe_sequence": 2, "refresh_hint": 60, "x509_authorities": 2, "jwt_authorities": 0
    }
    assert api.woken == 1
    assert api.audited[-1] == ("federation.refresh", "spiffe://partner.org", {"changed": True})


def test_delete_takes_the_bundle_and_wakes_agents(api: Harness):
    api.request("POST", BASE, 201, json={**CREATE, "trust_domain_bundle":
                                         bundle("partner.org", 0).to_pem().decode()})

    deleted = api.request("DELETE", f"{BASE}/partner.org", 200)

    assert deleted == {"trust_domain": "partner.org", "deleted": True}
    assert api.store.list_federated_bundles() == []
    assert api.woken == 2
    assert api.error("DELETE", f"{BASE}/partner.org", 404) == (
        "no federation relationship with trust domain partner.org; "
        "'tessera server federation list' shows the ones there are"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trust_domain": "example.org"},
         "example.org is this server's own trust domain; federate with another one"),
        ({"bundle_endpoint_url": "http://partner.example"},
         "bundle endpoint URL 'http://partner.example' must start with https:// (both "
         "profiles fetch the bundle over TLS)"),
        ({"trust_domain_bundle": "junk"},
         "bundle is not PEM certificates; expected one or more '-----BEGIN CERTIFICATE-----' "
         "blocks"),
    ],
)
def test_refusals_reach_the_caller(api: Harness, changes: dict[str, Any], message: str):
    assert api.error("POST", BASE, 400, json={**CREATE, **changes}) == message
