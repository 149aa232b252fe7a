"""Registration entries as operators write them, validated before they are stored.

    entry = new_entry(trust_domain, spiffe_id="spiffe://example.org/web",
                      parent_id="spiffe://example.org/node", selectors=["unix:uid:1000"])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from attestor.selector import parse_selectors
from ca.datastore.records import NewEntry, RegistrationEntry
from sdk.errors import InvalidArgument
from sdk.spiffeid import TrustDomain, parse_spiffe_id, parse_trust_domain, require_member

MAX_TTL_SECONDS = 10 * 365 * 86400
MAX_HINT_LENGTH = 1024
MAX_SELECTORS = 64
RESERVED_PATH = "/tessera"  # servers' and agents' own IDs live here
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def new_entry(
    trust_domain: TrustDomain,
    *,
    spiffe_id: str,
    parent_id: str,
    selectors: Sequence[str],
    x509_svid_ttl: int = 0,
    jwt_svid_ttl: int = 0,
    dns_names: Sequence[str] = (),
    federates_with: Sequence[str] = (),
    admin: bool = False,
    downstream: bool = False,
    node: bool = False,
    hint: str = "",
    expires_at: int | None = None,
) -> NewEntry:
    """Validate an entry's fields; InvalidArgument names the first one that is wrong."""
    entry_id = parse_spiffe_id(spiffe_id, what="SPIFFE ID")
    parent = parse_spiffe_id(parent_id, what="parent ID")
    require_member(entry_id, trust_domain, what="SPIFFE ID")
    require_member(parent, trust_domain, what="parent ID")
    if not entry_id.path:
        raise InvalidArgument(
            f"SPIFFE ID {entry_id} is the trust domain's own ID, which only its authorities "
            f"carry; give the entry a path, e.g. spiffe://{trust_domain.name}/web"
        )
    if entry_id.path == RESERVED_PATH or entry_id.path.startswith(RESERVED_PATH + "/"):
        raise InvalidArgument(
            f"SPIFFE ID {entry_id} is in the reserved {RESERVED_PATH}/ namespace of Tessera's "
            "servers and agents; choose another path"
        )
    if not selectors:
        raise InvalidArgument(
            "an entry needs at least one selector; add e.g. --selector unix:uid:1000"
        )
    if len(selectors) > MAX_SELECTORS:
        raise InvalidArgument(f"an entry takes at most {MAX_SELECTORS} selectors")
    parsed = tuple(sorted(parse_selectors(selectors)))
    for name, ttl in (("X509-SVID TTL", x509_svid_ttl), ("JWT-SVID TTL", jwt_svid_ttl)):
        if ttl < 0 or ttl > MAX_TTL_SECONDS:
            raise InvalidArgument(f"{name} must be between 0 (server default) and 10 years")
    for name in dns_names:
        check_dns_name(name)
    federated = tuple(sorted({parse_trust_domain(td).name for td in federates_with}))
    if trust_domain.name in federated:
        raise InvalidArgument("an entry cannot federate with its own trust domain")
    if len(hint) > MAX_HINT_LENGTH:
        raise InvalidArgument(f"hint is longer than {MAX_HINT_LENGTH} characters")
    if expires_at is not None and expires_at <= 0:
        raise InvalidArgument("entry expiry must be a positive UNIX time in seconds")
    return NewEntry(
        spiffe_id=str(entry_id),
        parent_id=str(parent),
        selectors=parsed,
        x509_svid_ttl=x509_svid_ttl,
        jwt_svid_ttl=jwt_svid_ttl,
        dns_names=tuple(dict.fromkeys(dns_names)),
        federates_with=federated,
        admin=admin,
        downstream=downstream,
        node=node,
        hint=hint,
        expires_at=expires_at,
    )


def check_dns_name(name: str) -> None:
    text = name[2:] if name.startswith("*.") else name
    if not text or len(name) > 253 or not all(_DNS_LABEL.match(p) for p in text.split(".")):
        raise InvalidArgument(f"DNS name {name!r} is not a valid host name")


def entry_json(entry: RegistrationEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "selectors": [{"type": s.type, "value": s.value} for s in entry.selectors],
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "dns_names": list(entry.dns_names),
        "federates_with": list(entry.federates_with),
        "admin": entry.admin,
        "downstream": entry.downstream,
        "node": entry.node,
        "hint": entry.hint,
        "expires_at": entry.expires_at,
        "revision_number": entry.revision,
        "created_at": int(entry.created_at.timestamp()),
    }
