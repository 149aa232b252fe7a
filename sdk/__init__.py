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
convenience.
"""

from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, X509Bundle, X509Svid

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
from sdk.jwtsvid import validate_jwt_svid
from sdk.peer import spiffe_id_from_certificate
from sdk.policy import Decision, Mode, Policy, Rule
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
from sdk.tls import mtls_client_context, mtls_server_context, peer_spiffe_id, tls_client_context

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
