"""The one JWT-SVID validator, against tokens PyJWT signs (the server's own are in
tests/unit/ca/test_jwtsvid.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import JwtBundle, SpiffeId, TrustDomain

from sdk.clock import ManualClock
from sdk.errors import AuthenticationError
from sdk.jwtsvid import (
    MAX_TOKEN_BYTES,
    JwtSvidAudienceMismatch,
    JwtSvidError,
    JwtSvidExpired,
    parse_and_validate_jwt_svid,
    validate_jwt_svid,
)

WEB = "spiffe://example.org/web"
EXAMPLE = TrustDomain("example.org")
PARTNER = TrustDomain("partner.test")
START = datetime(2030, 1, 1, tzinfo=UTC)  # far from the system clock: only the injected one counts
KEY = ec.generate_private_key(ec.SECP256R1())
PARTNER_KEY = ec.generate_private_key(ec.SECP256R1())


class Bundles:
    def __init__(self, *bundles: JwtBundle) -> None:
        self.bundles = {bundle.trust_domain: bundle for bundle in bundles}

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None:
        return self.bundles.get(trust_domain)


OWN = JwtBundle(EXAMPLE, {"k1": KEY.public_key()})
BOTH = Bundles(OWN, JwtBundle(PARTNER, {"p1": PARTNER_KEY.public_key()}))


def token(
    *,
    sub: str = WEB,
    aud: Any = "db",
    ttl: timedelta = timedelta(minutes=5),
    key: Any = KEY,
    algorithm: str = "ES256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    payload = {"sub": sub, "aud": aud, "exp": int((START + ttl).timestamp()), **claims}
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": "k1", **(headers or {})})


def refusal(value: str, *, bundle: JwtBundle = OWN, audience: str = "db") -> JwtSvidError:
    with pytest.raises(JwtSvidError) as caught:
        parse_and_validate_jwt_svid(value, bundle, audience, clock=ManualClock(START))
    return caught.value


def test_a_valid_token_is_checked_against_the_injected_clock() -> None:
    clock = ManualClock(START)
    value = token(aud=["db", "cache"])

    svid = validate_jwt_svid(value, BOTH, "db", clock=clock)

    assert (svid.spiffe_id, svid.audience, svid.token) == (SpiffeId(WEB), {"db", "cache"}, value)
    assert svid.expiry == int((START + timedelta(minutes=5)).timestamp())
    clock.advance(timedelta(minutes=5, seconds=4))  # within the leeway
    assert validate_jwt_svid(value, BOTH, "db", clock=clock).spiffe_id == SpiffeId(WEB)

    clock.advance(timedelta(seconds=1))
    with pytest.raises(AuthenticationError) as caught:
        validate_jwt_svid(value, BOTH, "db", clock=clock)
    assert (caught.value.message, caught.value.peer_id) == (
        "the JWT-SVID has expired",
        SpiffeId(WEB),
    )
    assert isinstance(caught.value.__cause__, JwtSvidExpired)
    assert caught.value.__cause__.message == "JWT-SVID expired at 2030-01-01T00:05:00+00:00"


def test_a_service_is_told_why_in_its_words() -> None:
    def reason(value: str, audience: str = "db") -> str:
        with pytest.raises(AuthenticationError) as caught:
            validate_jwt_svid(value, BOTH, audience, clock=ManualClock(START))
        return caught.value.message

    assert reason(token(aud=["cache", "queue"])) == (
        "the JWT-SVID is for audience 'cache', 'queue', not 'db'"
    )
    assert reason(token(sub="spiffe://stranger.test/x")) == (
        "the JWT-SVID of spiffe://stranger.test/x is from trust domain stranger.test, which "
        "this service has no JWT bundle for"
    )
    assert reason(token(key=PARTNER_KEY)) == "the JWT-SVID signature is not valid"
    assert reason("a.b") == (
        "the JWT-SVID is malformed: expected three base64url parts joined by '.'"
    )


def test_a_trust_domain_signs_only_for_its_own_ids() -> None:
    """A partner's key, a token claiming one of ours: the bundle of its sub (ours) lacks the
    partner's kid, and the partner's bundle does not cover our IDs."""
    forged = token(key=PARTNER_KEY, headers={"kid": "p1"})
    assert refusal(forged).message == "JWT-SVID key id 'p1' is not in the trust bundle"
    partner = JwtBundle(PARTNER, {"p1": PARTNER_KEY.public_key()})
    assert refusal(forged, bundle=partner).message == (
        "JWT-SVID subject spiffe://example.org/web is not in trust domain partner.test, whose "
        "key signed it"
    )


def test_the_algorithm_must_be_allowed_and_fit_the_key() -> None:
    hmac = token(key="a-shared-secret-of-at-least-32-bytes", algorithm="HS256")
    assert refusal(hmac).message == (
        "JWT-SVID algorithm 'HS256' is not allowed; use RS256-512, PS256-512 or ES256-512"
    )
    p384 = JwtBundle(EXAMPLE, {"k1": ec.generate_private_key(ec.SECP384R1()).public_key()})
    assert refusal(token(), bundle=p384).message == (
        "JWT-SVID algorithm ES256 does not match the type of key it names"
    )


def test_claims_are_checked_as_the_standard_says() -> None:
    other_audience = refusal(token(aud="cache"))
    assert isinstance(other_audience, JwtSvidAudienceMismatch)
    assert other_audience.message == "JWT-SVID audience ['cache'] does not include 'db'"
    assert refusal(token(aud=[])).message == "JWT-SVID has no audience (aud) claim"
    assert refusal(token(nbf=int((START + timedelta(seconds=6)).timestamp()))).message == (
        "JWT-SVID is not valid before 2030-01-01T00:00:06+00:00"
    )
    within_leeway = token(nbf=int((START + timedelta(seconds=5)).timestamp()))
    assert parse_and_validate_jwt_svid(within_leeway, OWN, "db", clock=ManualClock(START))
    assert refusal(token(sub="https://example.org/web")).message.startswith(
        "JWT-SVID subject 'https://example.org/web' is not valid"
    )
    assert refusal("a" * (MAX_TOKEN_BYTES + 1)).message == "JWT-SVID is longer than 16384 bytes"


def test_an_unknown_critical_header_is_refused() -> None:
    value = token(headers={"crit": ["exp-policy"], "exp-policy": 1})
    assert refusal(value).message.startswith("JWT-SVID is not valid: ")
