"""An mTLS API with the Tessera SDK: the caller's SPIFFE ID, and a policy per request.

    SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock python server.py
"""

import os
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI

from sdk import Policy, SpiffeId, WorkloadApiX509Source, authorize_member_of, mtls_server_context
from sdk.integrations.asgi import TLSIdentityProtocol
from sdk.integrations.fastapi import enforce_policy, spiffe_peer

policy = Policy.load(Path(__file__).with_name("policy.toml"))
app = FastAPI(dependencies=[Depends(enforce_policy(policy))])  # 403 with the reason


@app.get("/hello")
def hello(peer: Annotated[SpiffeId, Depends(spiffe_peer)]) -> dict[str, str]:
    return {"message": f"hello {peer}"}


@app.get("/admin")
def admin() -> dict[str, str]:
    return {"message": "the policy lets nobody here"}


def main() -> None:
    source = WorkloadApiX509Source()  # finds the agent through $SPIFFE_ENDPOINT_SOCKET
    me = source.x509_svid().spiffe_id
    port = int(os.environ.get("PORT", "8443"))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=TLSIdentityProtocol)
    config.load()
    # Only SVIDs of our own trust domain get through the handshake; the SVID we present
    # follows every rotation without a restart.
    config.ssl = mtls_server_context(source, authorize_member_of(me.trust_domain))
    print(f"serving as {me} on https://127.0.0.1:{port}", flush=True)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
