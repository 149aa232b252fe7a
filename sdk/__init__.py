"""What a service imports to do mTLS and authorization with SPIFFE IDs.

::

    from sdk import WorkloadApiX509Source, authorize_id, mtls_client_context

    source = WorkloadApiX509Source()                     # $SPIFFE_ENDPOINT_SOCKET
    context = mtls_client_context(source, authorize_id("spiffe://example.org/api"))

The pieces, one module each:

- :mod:`sdk.sources` — where SVIDs and bundles come from (Workload API, files, memory);
- :mod:`sdk.authorize` — authorizers that allow a SPIFFE ID or raise saying why not;
- :mod:`sdk.policy` — the allow/deny policy file shared with the sidecar;
- :mod:`sdk.tls` — ``SSLContext`` builders that authorize in the handshake and rotate;
- :mod:`sdk.jwtsvid` — validating JWT-SVIDs a caller sent;
- :mod:`sdk.peer` — a peer certificate's SPIFFE ID;
- :mod:`sdk.errors` — the exceptions;
- :mod:`sdk.integrations` — httpx, ASGI/FastAPI and grpcio (imported on their own).

The value types are the ``spiffe`` package's and are re-exported here for
convenience. Names load on first use (PEP 562): ``import sdk.errors`` does not
pull in the Workload API client (grpc), so a command line that needs only the
ground floor (errors, IDs, the clock) starts fast.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# The spiffe package names cryptography's DSA key class in a type alias when it is
# imported; cryptography 51 deprecates DSA and warns at that line, so every command and
# service would print a warning about a key type Tessera never accepts or makes.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"spiffe\.")

if TYPE_CHECKING:
    from spiffe import (
        JwtBundle,
        JwtSvid,
        SpiffeId,
        TrustDomain,
        X509Bundle,
        X509Svid,
    )

    from sdk.authorize import (
        Authorizer,
        authorize_all,
        authorize_any,
        authorize_id,
        authorize_member_of,
        authorize_one_of,
        authorize_policy,
    )
    from sdk.errors import (
        AuthenticationError,
        AuthorizationError,
        PolicyError,
        SdkError,
        SourceError,
    )
    from sdk.jwtsvid import (
        validate_jwt_svid,
    )
    from sdk.peer import (
        spiffe_id_from_certificate,
    )
    from sdk.policy import (
        Decision,
        Mode,
        Policy,
        Rule,
    )
    from sdk.sources import (
        FileX509Source,
        JwtBundleSource,
        JwtSource,
        StaticX509Source,
        WorkloadApiJwtSource,
        WorkloadApiX509Source,
        X509BundleSource,
        X509Source,
    )
    from sdk.tls import (
        mtls_client_context,
        mtls_server_context,
        peer_spiffe_id,
        tls_client_context,
    )

_MODULE_OF = {
    "JwtBundle": "spiffe",
    "JwtSvid": "spiffe",
    "SpiffeId": "sdk.spiffeid",
    "TrustDomain": "sdk.spiffeid",
    "X509Bundle": "spiffe",
    "X509Svid": "spiffe",
    "Authorizer": "sdk.authorize",
    "authorize_all": "sdk.authorize",
    "authorize_any": "sdk.authorize",
    "authorize_id": "sdk.authorize",
    "authorize_member_of": "sdk.authorize",
    "authorize_one_of": "sdk.authorize",
    "authorize_policy": "sdk.authorize",
    "AuthenticationError": "sdk.errors",
    "AuthorizationError": "sdk.errors",
    "PolicyError": "sdk.errors",
    "SdkError": "sdk.errors",
    "SourceError": "sdk.errors",
    "validate_jwt_svid": "sdk.jwtsvid",
    "spiffe_id_from_certificate": "sdk.peer",
    "Decision": "sdk.policy",
    "Mode": "sdk.policy",
    "Policy": "sdk.policy",
    "Rule": "sdk.policy",
    "FileX509Source": "sdk.sources",
    "JwtBundleSource": "sdk.sources",
    "JwtSource": "sdk.sources",
    "StaticX509Source": "sdk.sources",
    "WorkloadApiJwtSource": "sdk.sources",
    "WorkloadApiX509Source": "sdk.sources",
    "X509BundleSource": "sdk.sources",
    "X509Source": "sdk.sources",
    "mtls_client_context": "sdk.tls",
    "mtls_server_context": "sdk.tls",
    "peer_spiffe_id": "sdk.tls",
    "tls_client_context": "sdk.tls",
}

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "Authorizer",
    "Decision",
    "FileX509Source",
    "JwtBundle",
    "JwtBundleSource",
    "JwtSource",
    "JwtSvid",
    "Mode",
    "Policy",
    "PolicyError",
    "Rule",
    "SdkError",
    "SourceError",
    "SpiffeId",
    "StaticX509Source",
    "TrustDomain",
    "WorkloadApiJwtSource",
    "WorkloadApiX509Source",
    "X509Bundle",
    "X509BundleSource",
    "X509Source",
    "X509Svid",
    "authorize_all",
    "authorize_any",
    "authorize_id",
    "authorize_member_of",
    "authorize_one_of",
    "authorize_policy",
    "mtls_client_context",
    "mtls_server_context",
    "peer_spiffe_id",
    "spiffe_id_from_certificate",
    "tls_client_context",
    "validate_jwt_svid",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
