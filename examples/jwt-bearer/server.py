"""An API that knows its callers by the JWT-SVID they send as a bearer token.

    SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock python server.py
"""

import os
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI

from sdk import SpiffeId, WorkloadApiJwtSource
from sdk.integrations.fastapi import jwt_svid_caller

AUDIENCE = "reports"  # tokens must name this service in their "aud" claim

jwt_source = WorkloadApiJwtSource()  # the JWT bundles, followed as they rotate
reports_caller = jwt_svid_caller(jwt_source, audience=AUDIENCE)
app = FastAPI()


@app.get("/reports")
def reports(caller: Annotated[SpiffeId, Depends(reports_caller)]) -> dict[str, object]:
    return {"caller": str(caller), "reports": ["q1", "q2"]}


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    print(f"serving /reports for audience {AUDIENCE!r} on http://127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
