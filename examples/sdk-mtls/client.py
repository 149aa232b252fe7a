"""Call server.py over mTLS with the Tessera SDK.

    SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock python client.py
"""

import os

from sdk import WorkloadApiX509Source, authorize_member_of
from sdk.integrations.httpx import httpx_client

url = os.environ.get("API_URL", "https://127.0.0.1:8443")

with WorkloadApiX509Source() as source:
    me = source.x509_svid().spiffe_id
    print(f"calling {url} as {me}")
    # The server must prove an SVID of our trust domain (host names are not checked).
    with httpx_client(source, authorize_member_of(me.trust_domain), base_url=url) as client:
        for path in ("/hello", "/admin"):
            response = client.get(path)
            answer = response.json()
            text = answer.get("message") or answer["detail"]
            print(f"GET {path} -> {response.status_code} {text}")
