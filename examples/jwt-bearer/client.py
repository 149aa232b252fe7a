"""Call the reports API with a JWT-SVID as the bearer token (and twice without a good one).

    SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock python client.py
"""

import os

import httpx

from sdk import WorkloadApiJwtSource
from sdk.integrations.httpx import bearer_auth

url = os.environ.get("REPORTS_URL", "http://127.0.0.1:8000") + "/reports"

with WorkloadApiJwtSource() as jwt_source:
    for label, auth in [
        ("a JWT-SVID for 'reports'", bearer_auth(jwt_source, "reports")),
        ("a JWT-SVID for 'billing'", bearer_auth(jwt_source, "billing")),
        ("no token", None),
    ]:
        response = httpx.get(url, auth=auth)
        answer = response.json()
        print(f"with {label}: {response.status_code} {answer.get('detail') or answer}")
