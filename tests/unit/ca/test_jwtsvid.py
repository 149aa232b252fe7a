from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain
from spiffe.errors import ArgumentError
from spiffe.svid.errors import JwtSvidError as SpiffeJwtSvidError

from ca.jwtsvid import mint_jwt_svid
from ca.keymanager import LocalSigner
from sdk.clock import ManualClock
from sdk.errors import InvalidArgument
from sdk.jwtsvid import (
    MAX_AUDIENCE_CLAIM_BYTES,
    MAX_TOKEN_BYTES,
    JwtSvidError,
    parse_and_validate_jwt_svid,
)
from sdk.keys import KeyType
from tests.unit.ca.conftest import START

WEB = SpiffeId("spiffe://example.org/web")
TRUST_DOMAIN = TrustDomain("example.org")
SPIFFE_REFUSALS = (SpiffeJwtSvidError, ArgumentError)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _part(value) -> str:
    return _b64(json.dumps(value).encode())


def _signer(key_pool, key_type=KeyType.EC_P256):
    return LocalSigner("jwt-a", key_pool(key_type))


def _mint(signer, *, now=START, audience=("db",), ttl=timedelta(minutes=5), spiffe_id=WEB):
    return mint_jwt_svid(
        spiffe_id=spiffe_id, audience=list(audience), signer=signer, kid="k1", now=now, ttl=ttl
    )


def _validate(token, signer, *, audience="db", now=START + timedelta(minutes=1)):
    bundle = JwtBundle(TRUST_DOMAIN, {"k1": signer.public_key()})
    return parse_and_validate_jwt_svid(token, bundle, audience, clock=ManualClock(now))


def _refusal(token, signer, **kwargs) -> str:
    with pytest.raises(JwtSvidError) as err:
        _validate(token, signer, **kwargs)
    return err.value.message


@pytest.mark.parametrize("key_type", list(KeyType))
@pytest.mark.parametrize("audience", [("db",), ("db", "cache")])
def test_minted_token_validates_here_and_with_the_spiffe_package(key_type, audience, key_pool):
    signer = _signer(key_pool, key_type)
    now = datetime.now(UTC).replace(microsecond=0)
    token = _mint(signer, now=now, audience=audience)

    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    expected_alg = {"ec-p256": "ES256", "ec-p384": "ES384"}.get(key_type.value, "RS256")
    assert header == {"alg": expected_alg, "kid": "k1", "typ": "JWT"}

    validated = _validate(token, signer, now=now)
    assert validated.spiffe_id == WEB
    assert validated.expiry == now + timedelta(minutes=5)
    assert validated.audience == audience
    assert validated.claims["iat"] == int(now.timestamp())
    assert validated.claims["aud"] == (audience[0] if len(audience) == 1 else list(audience))

    bundle = JwtBundle(TRUST_DOMAIN, {"k1": signer.public_key()})
    svid = JwtSvid.parse_and_validate(token, bundle, {"db"})
    assert svid.spiffe_id == WEB
    assert svid.audience == set(audience)


def test_another_audience_is_refused_by_both(key_pool):
    signer = _signer(key_pool)
    token = _mint(signer, now=datetime.now(UTC))
    assert _refusal(token, signer, audience="web", now=datetime.now(UTC)) == (
        "JWT-SVID audience ['db'] does not include 'web'"
    )
    bundle = JwtBundle(TRUST_DOMAIN, {"k1": signer.public_key()})
    with pytest.raises(SPIFFE_REFUSALS):
        JwtSvid.parse_and_validate(token, bundle, {"web"})


def test_expired_token_is_refused_by_both(key_pool, clock):
    signer = _signer(key_pool)
    token = _mint(signer, now=clock.now(), ttl=timedelta(minutes=5))
    clock.advance(timedelta(minutes=5))
    assert _validate(token, signer, now=clock.now()).spiffe_id == WEB  # within the leeway
    clock.advance(timedelta(seconds=5))
    assert _refusal(token, signer, now=clock.now()) == (
        "JWT-SVID expired at 2030-01-01T00:05:00+00:00"
    )

    # The spiffe package checks against the real clock: an hour-old token.
    stale = _mint(signer, now=datetime.now(UTC) - timedelta(hours=1))
    bundle = JwtBundle(TRUST_DOMAIN, {"k1": signer.public_key()})
    with pytest.raises(SPIFFE_REFUSALS):
        JwtSvid.parse_and_validate(stale, bundle, {"db"})


def test_alg_none_is_refused_by_both(key_pool):
    signer = _signer(key_pool)
    claims = {"sub": str(WEB), "aud": "db", "exp": int(datetime.now(UTC).timestamp()) + 300}
    token = f"{_part({'alg': 'none', 'kid': 'k1', 'typ': 'JWT'})}.{_part(claims)}."
    assert _refusal(token, signer, now=datetime.now(UTC)) == (
        "JWT-SVID signature is not unpadded base64url"
    )
    with_signature = token + "AAAA"
    assert _refusal(with_signature, signer, now=datetime.now(UTC)) == (
        "JWT-SVID algorithm 'none' is not allowed; use RS256-512, PS256-512 or ES256-512"
    )
    bundle = JwtBundle(TRUST_DOMAIN, {"k1": signer.public_key()})
    for candidate in (token, with_signature):
        with pytest.raises(SPIFFE_REFUSALS):
            JwtSvid.parse_and_validate(candidate, bundle, {"db"})


def _signed(signer, header, claims) -> str:
    signing_input = f"{_part(header)}.{_part(claims)}"
    signature = signer.local_private_key().sign(
        signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    return f"{signing_input}.{_b64(signature)}"


def _claims(**changes):
    claims = {"sub": str(WEB), "aud": ["db"], "exp": int(START.timestamp()) + 300}
    claims.update(changes)
    return {key: value for key, value in claims.items() if value is not None}


def test_hmac_and_mismatched_algorithms_are_refused(key_pool):
    rsa_signer = _signer(key_pool, KeyType.RSA_2048)
    token = _signed(rsa_signer, {"alg": "HS256", "kid": "k1"}, _claims())
    assert "algorithm 'HS256' is not allowed" in _refusal(token, rsa_signer)
    token = _signed(rsa_signer, {"alg": "ES256", "kid": "k1"}, _claims())
    assert _refusal(token, rsa_signer) == (
        "JWT-SVID algorithm ES256 does not match the type of key it names"
    )


def test_ps256_is_accepted(key_pool):
    signer = _signer(key_pool, KeyType.RSA_2048)
    signing_input = f"{_part({'alg': 'PS256', 'kid': 'k1'})}.{_part(_claims())}"
    signature = signer.local_private_key().sign(
        signing_input.encode(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    token = f"{signing_input}.{_b64(signature)}"
    assert _validate(token, signer).spiffe_id == WEB


def test_claim_problems_are_named(key_pool):
    signer = _signer(key_pool, KeyType.RSA_2048)
    header = {"alg": "RS256", "kid": "k1", "typ": "JWT"}
    cases = {
        "JWT-SVID has no expiry (exp) claim": _claims(exp=None),
        "JWT-SVID claim 'exp' is not a number of seconds": _claims(exp="soon"),
        "JWT-SVID has no audience (aud) claim": _claims(aud=None),
        "JWT-SVID has no subject (sub) claim": _claims(sub=None),
        "JWT-SVID is not valid before 2030-01-01T00:10:00+00:00": _claims(
            nbf=int(START.timestamp()) + 600
        ),
    }
    for message, claims in cases.items():
        assert _refusal(_signed(signer, header, claims), signer) == message
    bad_sub = _refusal(_signed(signer, header, _claims(sub="https://example.org")), signer)
    assert bad_sub.startswith("JWT-SVID subject 'https://example.org' is not valid")


def test_header_and_signature_problems_are_named(key_pool):
    signer = _signer(key_pool)
    token = _mint(signer)
    head, body, signature = token.split(".")
    assert _refusal("a.b", signer) == (
        "JWT-SVID is malformed: expected three base64url parts joined by '.'"
    )
    assert _refusal(f"!!.{body}.{signature}", signer) == (
        "JWT-SVID header is not unpadded base64url"
    )
    assert _refusal(f"{_b64(b'[1]')}.{body}.{signature}", signer) == (
        "JWT-SVID header is not a JSON object"
    )
    assert _refusal(f"{head}.{_b64(b'{')}.{signature}", signer) == "JWT-SVID claims is not JSON"
    other_kid = f"{_part({'alg': 'ES256', 'kid': 'k9'})}.{body}.{signature}"
    assert _refusal(other_kid, signer) == "JWT-SVID key id 'k9' is not in the trust bundle"
    no_kid = f"{_part({'alg': 'ES256'})}.{body}.{signature}"
    assert _refusal(no_kid, signer) == "JWT-SVID header has no key id (kid)"
    bad_typ = f"{_part({'alg': 'ES256', 'kid': 'k1', 'typ': 'at+jwt'})}.{body}.{signature}"
    assert _refusal(bad_typ, signer) == "JWT-SVID type (typ) 'at+jwt' is not JWT or JOSE"
    tampered_body = _part({**_claims(), "sub": "spiffe://example.org/admin"})
    assert _refusal(f"{head}.{tampered_body}.{signature}", signer) == (
        "JWT-SVID signature is not valid"
    )
    other_signer = LocalSigner("other", key_pool(KeyType.EC_P256, 1))
    with pytest.raises(JwtSvidError, match="signature is not valid"):
        _validate(token, other_signer, now=START)


def test_minting_needs_an_audience(key_pool):
    signer = _signer(key_pool)
    with pytest.raises(InvalidArgument) as err:
        _mint(signer, audience=())
    assert err.value.message == "a JWT-SVID needs a list of one or more non-empty audiences"


def test_a_remote_signer_mints_tokens(key_pool, remote_signer):
    signer = remote_signer("remote", key_pool(KeyType.EC_P384))
    token = _mint(signer)
    assert signer.signed == 1
    assert _validate(token, signer).spiffe_id == WEB


def test_the_most_audiences_a_token_may_carry_still_make_a_valid_token(key_pool):
    """32 audiences filling the aud claim's bound, the longest SPIFFE ID as subject and an
    RSA-4096 signature: the token stays under the length validation accepts."""
    signer = _signer(key_pool, KeyType.RSA_4096)
    audience = [f"{i:02d}" + "a" * 250 for i in range(31)] + ["db"]
    longest = SpiffeId("spiffe://example.org/" + "/".join(["x" * 200] * 9) + "/" + "y" * 200)
    assert len(json.dumps(audience, separators=(",", ":"))) <= MAX_AUDIENCE_CLAIM_BYTES

    token = _mint(signer, audience=audience, spiffe_id=longest)

    assert len(token) <= MAX_TOKEN_BYTES
    assert _validate(token, signer).spiffe_id == longest


@pytest.mark.parametrize(
    ("audience", "message"),
    [
        ([f"a{i}" for i in range(33)], "33 audiences were asked for; ask for at most 32 at a time"),
        (
            ["db", "é" * 1025],
            "audience 2 is 2050 bytes long; an audience may be at most 2048 bytes",
        ),
        (
            [f"{i}" + "a" * 1999 for i in range(5)],
            "the audiences take 10016 bytes in a JWT-SVID; together they may take at most 8192",
        ),
    ],
)
def test_minting_refuses_too_many_or_too_long_audiences(key_pool, audience, message):
    with pytest.raises(InvalidArgument) as err:
        _mint(_signer(key_pool), audience=audience)
    assert err.value.message == message
