"""new_entry: every field checked before an entry is stored, each refusal with its message."""

from __future__ import annotations

from typing import Any

import pytest
from spiffe import TrustDomain

from attestor.selector import Selector
from ca.entries import new_entry
from sdk.errors import InvalidArgument
from tests.unit.ca.conftest import TRUST_DOMAIN

ID_HINT = "expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web"


def entry(**changes: Any) -> Any:
    fields: dict[str, Any] = {
        "spiffe_id": "spiffe://example.org/web",
        "parent_id": "spiffe://example.org/node",
        "selectors": ["unix:uid:1000"],
    }
    fields.update(changes)
    return new_entry(TRUST_DOMAIN, **fields)


def refusal(**changes: Any) -> str:
    with pytest.raises(InvalidArgument) as refused:
        entry(**changes)
    return refused.value.message


def test_a_valid_entry_is_normalised():
    made = entry(
        selectors=["unix:uid:1000", "unix:gid:0", "unix:uid:1000"],
        dns_names=["web.example.org", "*.web.example.org", "web.example.org"],
        federates_with=["spiffe://other.org", "other.org", "third.org"],
        x509_svid_ttl=600,
        jwt_svid_ttl=60,
        hint="web",
        expires_at=1_900_000_000,
        admin=True,
    )

    assert made.spiffe_id == "spiffe://example.org/web"
    assert made.parent_id == "spiffe://example.org/node"
    assert made.selectors == (Selector("unix", "gid:0"), Selector("unix", "uid:1000"))
    assert made.dns_names == ("web.example.org", "*.web.example.org")
    assert made.federates_with == ("other.org", "third.org")
    assert (made.x509_svid_ttl, made.jwt_svid_ttl) == (600, 60)
    assert made.admin is True
    assert made.expires_at == 1_900_000_000


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "spiffe_id",
            "web",
            f"SPIFFE ID 'web' is not valid: does not start with 'spiffe://'; {ID_HINT}",
        ),
        (
            "spiffe_id",
            "spiffe://example.org/web/",
            "SPIFFE ID 'spiffe://example.org/web/' is not valid: path cannot contain empty "
            f"segments; {ID_HINT}",
        ),
        (
            "spiffe_id",
            "spiffe://Example.org/web",
            "SPIFFE ID 'spiffe://Example.org/web' is not valid: trust domain must be lower case; "
            f"{ID_HINT}",
        ),
        (
            "parent_id",
            "http://example.org/node",
            "parent ID 'http://example.org/node' is not valid: does not start with 'spiffe://'; "
            f"{ID_HINT}",
        ),
    ],
)
def test_malformed_ids(field, value, message):
    assert refusal(**{field: value}) == message


def test_an_entry_cannot_take_the_trust_domain_id():
    assert refusal(spiffe_id="spiffe://example.org") == (
        "SPIFFE ID spiffe://example.org is the trust domain's own ID, which only its "
        "authorities carry; give the entry a path, e.g. spiffe://example.org/web"
    )


def test_spiffe_id_of_another_trust_domain():
    assert refusal(spiffe_id="spiffe://other.org/web") == (
        "SPIFFE ID spiffe://other.org/web is not in trust domain example.org; "
        "use an ID of the form spiffe://example.org/..."
    )


def test_parent_id_of_another_trust_domain():
    assert refusal(parent_id="spiffe://other.org/node") == (
        "parent ID spiffe://other.org/node is not in trust domain example.org; "
        "use an ID of the form spiffe://example.org/..."
    )


def test_no_selectors():
    assert refusal(selectors=[]) == (
        "an entry needs at least one selector; add e.g. --selector unix:uid:1000"
    )


def test_too_many_selectors():
    assert refusal(selectors=[f"unix:uid:{n}" for n in range(65)]) == (
        "an entry takes at most 64 selectors"
    )


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        (
            "unixuid",
            "selector 'unixuid' is not of the form type:value; "
            "write e.g. unix:uid:1000 or unix:path:/usr/bin/app",
        ),
        (
            "unix:",
            "selector 'unix:' is not of the form type:value; "
            "write e.g. unix:uid:1000 or unix:path:/usr/bin/app",
        ),
        (
            "1x:y",
            "selector type '1x' is not valid; "
            "use letters, digits and '_' such as unix, docker, k8s, systemd",
        ),
    ],
)
def test_bad_selector(selector, message):
    assert refusal(selectors=["unix:uid:1000", selector]) == message


@pytest.mark.parametrize(
    "name", ["-web.example.org", "web..example.org", "*.", "web_1.example.org", "x" * 64, "a b"]
)
def test_bad_dns_name(name):
    assert refusal(dns_names=["ok.example.org", name]) == (
        f"DNS name {name!r} is not a valid host name"
    )


def test_a_dns_name_over_253_characters():
    name = ".".join(["a" * 63] * 4)  # 255 characters of valid labels
    assert refusal(dns_names=[name]) == f"DNS name {name!r} is not a valid host name"


@pytest.mark.parametrize("trust_domain", ["example.org", "spiffe://example.org"])
def test_federating_with_itself(trust_domain):
    assert refusal(federates_with=["other.org", trust_domain]) == (
        "an entry cannot federate with its own trust domain"
    )


def test_federating_with_a_bad_trust_domain():
    assert refusal(federates_with=["Other.org"]) == (
        "trust domain 'Other.org' is not valid: trust domain must be lower case; "
        "use lower-case letters, digits, '.', '-' and '_', e.g. example.org"
    )


@pytest.mark.parametrize(
    ("field", "name"), [("x509_svid_ttl", "X509-SVID TTL"), ("jwt_svid_ttl", "JWT-SVID TTL")]
)
@pytest.mark.parametrize("ttl", [-1, 10 * 365 * 86400 + 1])
def test_ttl_out_of_range(field, name, ttl):
    assert refusal(**{field: ttl}) == f"{name} must be between 0 (server default) and 10 years"


def test_hint_too_long():
    assert refusal(hint="h" * 1025) == "hint is longer than 1024 characters"


@pytest.mark.parametrize("expires_at", [0, -5])
def test_expiry_not_positive(expires_at):
    assert refusal(expires_at=expires_at) == (
        "entry expiry must be a positive UNIX time in seconds"
    )


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "spiffe://example.org/tessera/server",
        "spiffe://example.org/tessera/agent/join_token/abc",
        "spiffe://example.org/tessera",
    ],
)
def test_the_reserved_namespace_is_refused(spiffe_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_entry(
            TrustDomain("example.org"),
            spiffe_id=spiffe_id,
            parent_id="spiffe://example.org/node",
            selectors=["unix:uid:1"],
        )
    assert caught.value.message == (
        f"SPIFFE ID {spiffe_id} is in the reserved /tessera/ namespace of Tessera's "
        "servers and agents; choose another path"
    )


def test_a_path_that_only_starts_like_the_reserved_one_is_fine() -> None:
    entry = new_entry(
        TrustDomain("example.org"),
        spiffe_id="spiffe://example.org/tesserae/web",
        parent_id="spiffe://example.org/tessera/agent/join_token/abc",
        selectors=["unix:uid:1"],
    )
    assert entry.spiffe_id == "spiffe://example.org/tesserae/web"
