"""JWT-SVIDs: minted and validated by hand as JWS compact tokens.

Minting goes through a :class:`~ca.keymanager.Signer`, so a key kept in a
remote key manager signs tokens too; no JWT library is involved::

    token = mint_jwt_svid(
        spiffe_id=SpiffeId("spiffe://example.org/web"), audience=["db"],
        signer=signer, kid="k1", now=clock.now(), ttl=timedelta(minutes=5),
    )
    validated = validate_jwt_svid(token, audience="db", keys={"k1": public_key}, now=clock.now())
    validated.spiffe_id   # SpiffeId('spiffe://example.org/web')

Validation accepts only RS256-512, PS256-512 and ES256-512 (never ``none``
or HMAC), requires ``kid``, ``sub``, ``aud`` and ``exp``, and allows
:data:`CLOCK_SKEW_LEEWAY` (5 seconds) of clock difference on ``exp`` and
``nbf`` and no more.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from spiffe import SpiffeId

from ca.keymanager import Signer
from sdk.errors import InvalidArgument
from sdk.jwtsvid import (  # noqa: F401  (moved; re-exported for the old path)
    MAX_AUDIENCE_BYTES,
    MAX_AUDIENCE_CLAIM_BYTES,
    MAX_AUDIENCES,
    check_audience,
    check_audiences,
)
from sdk.keys import PublicKey, jwt_algorithm
from sdk.spiffeid import parse_spiffe_id

CLOCK_SKEW_LEEWAY = timedelta(seconds=5)
"""How far past ``exp`` (or before ``nbf``) a token is still accepted."""

MAX_TOKEN_BYTES = 16384

_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
ALLOWED_ALGORITHMS = frozenset(
    f"{family}{size}" for family in ("RS", "PS", "ES") for size in _HASHES
)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


class JwtSvidError(InvalidArgument):
    """A JWT-SVID that is malformed, badly signed, expired or not for this audience."""


@dataclass(frozen=True)
class ValidatedJwt:
    spiffe_id: SpiffeId
    claims: dict[str, Any]
    expiry: datetime


def mint_jwt_svid(
    *,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    signer: Signer,
    kid: str,
    now: datetime,
    ttl: timedelta,
) -> str:
    """A signed JWT-SVID for ``spiffe_id``; ``aud`` is a string when there is one audience."""
    audiences = list(audience)
    if isinstance(audience, str) or not audiences or not all(audiences):
        raise InvalidArgument("a JWT-SVID needs a list of one or more non-empty audiences")
    check_audiences(audiences)
    if ttl <= timedelta(0):
        raise InvalidArgument("JWT-SVID TTL must be greater than zero")
    if not kid:
        raise InvalidArgument("a JWT-SVID needs a key id (kid)")
    algorithm = jwt_algorithm(signer.key_type)
    header = {"alg": algorithm, "kid": kid, "typ": "JWT"}
    issued_at = int(now.timestamp())
    claims: dict[str, Any] = {
        "sub": str(spiffe_id),
        "aud": audiences[0] if len(audiences) == 1 else audiences,
        "exp": int((now + ttl).timestamp()),
        "iat": issued_at,
    }
    signing_input = f"{_b64_json(header)}.{_b64_json(claims)}".encode("ascii")
    signature = signer.sign(signing_input)
    if algorithm.startswith("ES"):
        signature = _der_to_raw(signature, _coordinate_size(signer.public_key()))
    return f"{signing_input.decode('ascii')}.{_b64(signature)}"


def validate_jwt_svid(
    token: str, *, audience: str, keys: Mapping[str, PublicKey], now: datetime
) -> ValidatedJwt:
    """Check ``token``'s signature (key chosen by ``kid``), expiry, audience and subject."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"JWT-SVID is longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtSvidError("JWT-SVID is malformed: expected three base64url parts joined by '.'")
    header = _json_part(parts[0], "header")
    claims = _json_part(parts[1], "claims")
    signature = _b64_decode(parts[2], "signature")

    algorithm = header.get("alg")
    if algorithm not in ALLOWED_ALGORITHMS:
        raise JwtSvidError(
            f"JWT-SVID algorithm {algorithm!r} is not allowed; "
            "use RS256-512, PS256-512 or ES256-512"
        )
    assert isinstance(algorithm, str)
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtSvidError(f"JWT-SVID type (typ) {typ!r} is not JWT or JOSE")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("JWT-SVID header has no key id (kid)")
    public_key = keys.get(kid)
    if public_key is None:
        raise JwtSvidError(f"JWT-SVID key id {kid!r} is not in the trust bundle")
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    _verify(algorithm, public_key, signing_input, signature)

    expiry = _time_claim(claims, "exp")
    if expiry is None:
        raise JwtSvidError("JWT-SVID has no expiry (exp) claim")
    if now >= expiry + CLOCK_SKEW_LEEWAY:
        raise JwtSvidError(f"JWT-SVID expired at {expiry.isoformat()}")
    not_before = _time_claim(claims, "nbf")
    if not_before is not None and now < not_before - CLOCK_SKEW_LEEWAY:
        raise JwtSvidError(f"JWT-SVID is not valid before {not_before.isoformat()}")

    audiences = claims.get("aud")
    if isinstance(audiences, str):
        audiences = [audiences]
    if (
        not isinstance(audiences, list)
        or not audiences
        or not all(isinstance(item, str) and item for item in audiences)
    ):
        raise JwtSvidError("JWT-SVID has no audience (aud) claim")
    if audience not in audiences:
        raise JwtSvidError(f"JWT-SVID audience {audiences} does not include {audience!r}")

    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise JwtSvidError("JWT-SVID has no subject (sub) claim")
    try:
        spiffe_id = parse_spiffe_id(subject, what="JWT-SVID subject")
    except InvalidArgument as err:
        raise JwtSvidError(err.message) from None
    return ValidatedJwt(spiffe_id=spiffe_id, claims=claims, expiry=expiry)


def _verify(algorithm: str, public_key: PublicKey, data: bytes, signature: bytes) -> None:
    digest = _HASHES[algorithm[2:]]()
    try:
        if algorithm.startswith("ES"):
            curve = _EC_CURVES[algorithm]
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
                public_key.curve, curve
            ):
                raise JwtSvidError(
                    f"JWT-SVID algorithm {algorithm} does not match the type of key it names"
                )
            size = _coordinate_size(public_key)
            if len(signature) != 2 * size:
                raise InvalidSignature
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public_key.verify(der, data, ec.ECDSA(digest))
            return
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise JwtSvidError(
                f"JWT-SVID algorithm {algorithm} does not match the type of key it names"
            )
        if algorithm.startswith("RS"):
            public_key.verify(signature, data, padding.PKCS1v15(), digest)
        else:
            public_key.verify(
                signature,
                data,
                padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size),
                digest,
            )
    except InvalidSignature:
        raise JwtSvidError("JWT-SVID signature is not valid") from None


def _time_claim(claims: Mapping[str, Any], name: str) -> datetime | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtSvidError(f"JWT-SVID claim {name!r} is not a number of seconds")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise JwtSvidError(f"JWT-SVID claim {name!r} is out of range") from None


def _json_part(part: str, what: str) -> dict[str, Any]:
    raw = _b64_decode(part, what)
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise JwtSvidError(f"JWT-SVID {what} is not JSON") from None
    if not isinstance(value, dict):
        raise JwtSvidError(f"JWT-SVID {what} is not a JSON object")
    return value


def _b64_decode(part: str, what: str) -> bytes:
    if not _BASE64URL.fullmatch(part):
        raise JwtSvidError(f"JWT-SVID {what} is not unpadded base64url")
    try:
        return base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise JwtSvidError(f"JWT-SVID {what} is not unpadded base64url") from None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64_json(value: Mapping[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _coordinate_size(public_key: PublicKey) -> int:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidArgument("ECDSA signatures need an EC key")
    return (public_key.curve.key_size + 7) // 8


def _der_to_raw(signature: bytes, size: int) -> bytes:
    r, s = decode_dss_signature(signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")
