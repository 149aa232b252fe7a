"""Validating a JWT-SVID a caller sent, with the bundle of the trust domain it claims.

::

    svid = validate_jwt_svid(token, jwt_source, audience="spiffe://example.org/api")
    svid.spiffe_id   # who sent it

The token's ``sub`` names its trust domain; its signature is checked with that
trust domain's JWT bundle from the source (so a federated trust domain can only
sign for its own IDs), then its expiry and audience. Every failure is an
:class:`~sdk.errors.AuthenticationError` saying what is wrong; the ``spiffe``
package's errors are translated here.

Expiry is checked against the system clock (the ``spiffe`` package reads it
itself).

:func:`check_audiences` bounds the audiences one JWT-SVID may name; the agent checks a
workload's request with it before forwarding it, and the server again before it signs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jwt
from spiffe import JwtSvid
from spiffe.errors import PySpiffeError
from spiffe.svid.errors import TokenExpiredError
from spiffe.svid.jwt_svid_validator import AUDIENCE_NOT_MATCH_ERROR

from sdk.errors import AuthenticationError, InvalidArgument
from sdk.sources import JwtBundleSource

__all__ = [
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_BYTES",
    "MAX_AUDIENCE_CLAIM_BYTES",
    "check_audience",
    "check_audiences",
    "validate_jwt_svid",
]

MAX_AUDIENCES = 32
"""Audiences one JWT-SVID may name."""
MAX_AUDIENCE_BYTES = 2048
"""Bytes (UTF-8) of one audience: the longest SPIFFE ID."""
MAX_AUDIENCE_CLAIM_BYTES = 8192
"""Bytes the audiences take together in the token's ``aud`` claim (JSON), so that a token
with the longest subject and an RSA-4096 signature stays under the 16384 bytes a JWT-SVID
may take (``ca.jwtsvid.MAX_TOKEN_BYTES``)."""


def validate_jwt_svid(token: str, bundle_source: JwtBundleSource, audience: str) -> JwtSvid:
    """The JWT-SVID in ``token``, if its trust domain signed it and it is current and for us."""
    try:
        claimed = JwtSvid.parse_insecure(token, {audience})
    except PySpiffeError as err:
        raise AuthenticationError(_reason(err, token, audience)) from err
    trust_domain = claimed.spiffe_id.trust_domain
    bundle = bundle_source.jwt_bundle_for(trust_domain)
    if bundle is None:
        raise AuthenticationError(
            f"the JWT-SVID of {claimed.spiffe_id} is from trust domain {trust_domain.name}, "
            "which this service has no JWT bundle for",
            peer_id=claimed.spiffe_id,
        )
    try:
        return JwtSvid.parse_and_validate(token, bundle, {audience})
    except PySpiffeError as err:
        raise AuthenticationError(_reason(err, token, audience), peer_id=claimed.spiffe_id) from err


def _reason(err: PySpiffeError, token: str, audience: str) -> str:
    if isinstance(err, TokenExpiredError) or "expired" in str(err).lower():
        return "the JWT-SVID has expired"
    if AUDIENCE_NOT_MATCH_ERROR in str(err) or "audience" in str(err).lower():
        return f"the JWT-SVID is for audience {_audience_of(token)}, not {audience!r}"
    return f"the JWT-SVID is not valid: {err}"


def _audience_of(token: str) -> str:
    """The ``aud`` claim, read without verification, only to say what it was."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return "(unreadable)"
    audience = claims.get("aud")
    values = [audience] if isinstance(audience, str) else list(audience or [])
    return ", ".join(repr(str(v)) for v in values) or "(none)"


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
