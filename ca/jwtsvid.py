"""JWT-SVIDs: minted as JWS compact tokens.

Minting goes through a :class:`~ca.keymanager.Signer`, so a key kept in a
remote key manager signs tokens too; no JWT library is involved (one would
want the private key)::

    token = mint_jwt_svid(
        spiffe_id=SpiffeId("spiffe://example.org/web"), audience=["db"],
        signer=signer, kid="k1", now=clock.now(), ttl=timedelta(minutes=5),
    )

Validating one is the SDK's (:func:`sdk.jwtsvid.parse_and_validate_jwt_svid`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

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
from sdk.spiffeid import SpiffeId


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
