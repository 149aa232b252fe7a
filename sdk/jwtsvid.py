"""JWT-SVIDs: the one validator, for a service checking its callers and for the agent.

::

    svid = validate_jwt_svid(token, jwt_source, audience="spiffe://example.org/api")
    svid.spiffe_id   # who sent it (a spiffe.JwtSvid)

    # with the bundle at hand, as the agent's ValidateJWTSVID does
    validated = parse_and_validate_jwt_svid(token, bundle, "db", clock=clock)
    validated.spiffe_id, validated.claims

As the SPIFFE JWT-SVID standard says: the token is a JWS in compact form
(three unpadded base64url parts), signed with RS256-512, PS256-512 or
ES256-512 (never ``none``, never HMAC) by the key its ``kid`` names in the
JWT bundle of the trust domain its ``sub`` claims (so a federated trust domain
can only sign for its own IDs); ``exp`` is required, and ``exp`` and ``nbf``
are checked against the injected clock with :data:`CLOCK_SKEW_LEEWAY` (5
seconds) and no more; ``aud`` must include the audience; ``sub`` is a SPIFFE
ID. PyJWT checks the signature; the claims are checked here, since PyJWT
reads the system clock.

Errors: :func:`parse_and_validate_jwt_svid` raises :class:`JwtSvidError`, an
``InvalidArgument`` whose message the Workload API answers with, or one of its
kinds (:class:`JwtSvidExpired`, :class:`JwtSvidAudienceMismatch`);
:func:`validate_jwt_svid` turns them into an
:class:`~sdk.errors.AuthenticationError` saying what is wrong in a caller's
words (``the JWT-SVID has expired``), the 401 a service answers with.

:func:`check_audiences` bounds the audiences one JWT-SVID may name; the agent checks a
workload's request with it before forwarding it, and the server again before it signs.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import AuthenticationError, InvalidArgument
from sdk.keys import PublicKey
from sdk.spiffeid import SpiffeId, parse_spiffe_id

if TYPE_CHECKING:  # the server mints and checks audiences without the Workload API client
    from spiffe import JwtBundle, JwtSvid

    from sdk.sources import JwtBundleSource

__all__ = [
    "ALLOWED_ALGORITHMS",
    "CLOCK_SKEW_LEEWAY",
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_BYTES",
    "MAX_AUDIENCE_CLAIM_BYTES",
    "MAX_TOKEN_BYTES",
    "JwtSvidAudienceMismatch",
    "JwtSvidError",
    "JwtSvidExpired",
    "ValidatedJwt",
    "check_audience",
    "check_audiences",
    "claimed_spiffe_id",
    "parse_and_validate_jwt_svid",
    "validate_jwt_svid",
]

MAX_AUDIENCES = 32
"""Audiences one JWT-SVID may name."""
MAX_AUDIENCE_BYTES = 2048
"""Bytes (UTF-8) of one audience: the longest SPIFFE ID."""
MAX_AUDIENCE_CLAIM_BYTES = 8192
"""Bytes the audiences take together in the token's ``aud`` claim (JSON), so that a token
with the longest subject and an RSA-4096 signature stays under the :data:`MAX_TOKEN_BYTES`
a JWT-SVID may take."""
MAX_TOKEN_BYTES: Final = 16384
"""The longest JWT-SVID validated."""
CLOCK_SKEW_LEEWAY: Final = timedelta(seconds=5)
"""How far past ``exp`` (or before ``nbf``) a token is still accepted."""
ALLOWED_ALGORITHMS: Final = frozenset(
    f"{family}{size}" for family in ("RS", "PS", "ES") for size in ("256", "384", "512")
)
"""The signature algorithms a JWT-SVID may use (the JWT-SVID standard's list)."""

_KEY_TYPES: Final[Mapping[str, type]] = {
    "RS": rsa.RSAPublicKey,
    "PS": rsa.RSAPublicKey,
    "ES": ec.EllipticCurvePublicKey,
}
_EC_CURVES: Final[Mapping[str, type]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]+")
_SIGNATURE_ONLY: Final[jwt.types.Options] = {
    # PyJWT checks the signature; the claims are checked against the injected clock below.
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


class JwtSvidError(InvalidArgument):
    """A JWT-SVID that is malformed, badly signed, expired or not for this audience."""


class JwtSvidExpired(JwtSvidError):
    """A JWT-SVID past its ``exp`` (and the leeway)."""


class JwtSvidAudienceMismatch(JwtSvidError):
    """A JWT-SVID for other audiences than the one validating it."""

    def __init__(self, message: str, *, audiences: Sequence[str]) -> None:
        super().__init__(message)
        self.audiences = tuple(audiences)


@dataclass(frozen=True)
class ValidatedJwt:
    """A JWT-SVID that passed every check, with all its claims."""

    spiffe_id: SpiffeId
    claims: dict[str, Any]
    expiry: datetime
    audience: tuple[str, ...] = ()


def validate_jwt_svid(
    token: str, bundle_source: JwtBundleSource, audience: str, *, clock: Clock = SYSTEM_CLOCK
) -> JwtSvid:
    """The JWT-SVID in ``token``, if its trust domain signed it and it is current and for us.

    The bundle is the one ``bundle_source`` has for the trust domain the token's ``sub``
    names. Every refusal is an AuthenticationError saying what is wrong.
    """
    try:
        claimed = claimed_spiffe_id(token)
    except JwtSvidError as err:
        raise AuthenticationError(_in_words(err, audience)) from err
    trust_domain = claimed.trust_domain
    bundle = bundle_source.jwt_bundle_for(trust_domain)
    if bundle is None:
        raise AuthenticationError(
            f"the JWT-SVID of {claimed} is from trust domain {trust_domain.name}, "
            "which this service has no JWT bundle for",
            peer_id=claimed,
        )
    try:
        validated = parse_and_validate_jwt_svid(token, bundle, audience, clock=clock)
    except JwtSvidError as err:
        raise AuthenticationError(_in_words(err, audience), peer_id=claimed) from err
    from spiffe import JwtSvid

    return JwtSvid(
        validated.spiffe_id,
        set(validated.audience),
        int(validated.expiry.timestamp()),
        validated.claims,
        token,
    )


def parse_and_validate_jwt_svid(
    token: str, bundle: JwtBundle, audience: str, *, clock: Clock = SYSTEM_CLOCK
) -> ValidatedJwt:
    """Check ``token``'s signature (with the key of ``bundle`` its ``kid`` names), expiry,
    audience and subject (a SPIFFE ID of ``bundle``'s trust domain); JwtSvidError if any
    check fails."""
    header, claims = _decoded(token)
    algorithm = header.get("alg")
    if algorithm not in ALLOWED_ALGORITHMS:
        raise JwtSvidError(
            f"JWT-SVID algorithm {algorithm!r} is not allowed; "
            "use RS256-512, PS256-512 or ES256-512"
        )
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtSvidError(f"JWT-SVID type (typ) {typ!r} is not JWT or JOSE")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("JWT-SVID header has no key id (kid)")
    public_key = bundle.jwt_authorities.get(kid)
    if public_key is None:
        raise JwtSvidError(f"JWT-SVID key id {kid!r} is not in the trust bundle")
    if not _fits(public_key, algorithm):
        raise JwtSvidError(
            f"JWT-SVID algorithm {algorithm} does not match the type of key it names"
        )
    try:
        jwt.decode(token, public_key, algorithms=[algorithm], options=_SIGNATURE_ONLY)
    except jwt.InvalidSignatureError:
        raise JwtSvidError("JWT-SVID signature is not valid") from None
    except jwt.PyJWTError as err:
        raise JwtSvidError(f"JWT-SVID is not valid: {err}") from err

    now = clock.now()
    expiry = _time_claim(claims, "exp")
    if expiry is None:
        raise JwtSvidError("JWT-SVID has no expiry (exp) claim")
    if now >= expiry + CLOCK_SKEW_LEEWAY:
        raise JwtSvidExpired(f"JWT-SVID expired at {expiry.isoformat()}")
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
        raise JwtSvidAudienceMismatch(
            f"JWT-SVID audience {audiences} does not include {audience!r}", audiences=audiences
        )

    spiffe_id = _subject(claims)
    if spiffe_id.trust_domain != bundle.trust_domain:
        raise JwtSvidError(
            f"JWT-SVID subject {spiffe_id} is not in trust domain "
            f"{bundle.trust_domain.name}, whose key signed it"
        )
    return ValidatedJwt(
        spiffe_id=spiffe_id, claims=claims, expiry=expiry, audience=tuple(audiences)
    )


def claimed_spiffe_id(token: str) -> SpiffeId:
    """The SPIFFE ID ``token``'s ``sub`` claims, read *without any check of the signature*:
    only to pick the bundle to validate it with. JwtSvidError if it cannot be read."""
    _, claims = _decoded(token)
    return _subject(claims)


def _decoded(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a JWS in compact form, read without checking them."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"JWT-SVID is longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtSvidError("JWT-SVID is malformed: expected three base64url parts joined by '.'")
    header = _json_part(parts[0], "header")
    claims = _json_part(parts[1], "claims")
    _base64url(parts[2], "signature")
    return header, claims


def _subject(claims: Mapping[str, Any]) -> SpiffeId:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise JwtSvidError("JWT-SVID has no subject (sub) claim")
    try:
        return parse_spiffe_id(subject, what="JWT-SVID subject")
    except InvalidArgument as err:
        raise JwtSvidError(err.message) from None


def _fits(public_key: object, algorithm: str) -> TypeGuard[PublicKey]:
    """Whether ``public_key`` is the kind ``algorithm`` signs with (an RSA key for RS/PS, an
    EC key on the algorithm's curve for ES)."""
    if not isinstance(public_key, _KEY_TYPES[algorithm[:2]]):
        return False
    curve = _EC_CURVES.get(algorithm)
    return curve is None or (
        isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, curve)
    )


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
    raw = _base64url(part, what)
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise JwtSvidError(f"JWT-SVID {what} is not JSON") from None
    if not isinstance(value, dict):
        raise JwtSvidError(f"JWT-SVID {what} is not a JSON object")
    return value


def _base64url(part: str, what: str) -> bytes:
    """``part`` decoded; JWS compact form is unpadded base64url, and nothing else passes."""
    if not _BASE64URL.fullmatch(part):
        raise JwtSvidError(f"JWT-SVID {what} is not unpadded base64url")
    try:
        return base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise JwtSvidError(f"JWT-SVID {what} is not unpadded base64url") from None


def _in_words(err: JwtSvidError, audience: str) -> str:
    """A refusal as a service tells its caller."""
    if isinstance(err, JwtSvidExpired):
        return "the JWT-SVID has expired"
    if isinstance(err, JwtSvidAudienceMismatch):
        audiences = ", ".join(repr(value) for value in err.audiences) or "(none)"
        return f"the JWT-SVID is for audience {audiences}, not {audience!r}"
    return f"the {err.message}"


def check_audiences(audiences: Sequence[str]) -> None:
    """Refuse more audiences, or longer ones, than a JWT-SVID may carry.

    The agent checks what a workload asks for with it before forwarding the request,
    and the server checks it again before it signs.
    """
    if len(audiences) > MAX_AUDIENCES:
        raise InvalidArgument(
            f"{len(audiences)} audiences were asked for; ask for at most {MAX_AUDIENCES} at a time"
        )
    for number, audience in enumerate(audiences, start=1):
        check_audience(audience, what=f"audience {number}")
    claim_bytes = len(json.dumps(list(audiences), separators=(",", ":")))
    if claim_bytes > MAX_AUDIENCE_CLAIM_BYTES:
        raise InvalidArgument(
            f"the audiences take {claim_bytes} bytes in a JWT-SVID; together they may take "
            f"at most {MAX_AUDIENCE_CLAIM_BYTES}"
        )


def check_audience(audience: str, *, what: str = "the audience") -> None:
    """Refuse an audience longer than :data:`MAX_AUDIENCE_BYTES`."""
    size = len(audience.encode("utf-8", "surrogatepass"))
    if size > MAX_AUDIENCE_BYTES:
        raise InvalidArgument(
            f"{what} is {size} bytes long; an audience may be at most {MAX_AUDIENCE_BYTES} bytes"
        )
