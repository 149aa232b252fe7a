"""A plain HTTP app that knows nothing of TLS or SPIFFE; the sidecar in front tells it who called.

    python app.py          # http://127.0.0.1:8080
"""

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        # Set by the sidecar, which removes any copy the caller sent: safe to trust here.
        caller = self.headers.get("X-Forwarded-Client-Spiffe-Id", "nobody")
        body = f"hello {caller}, from the api app\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_DELETE = do_GET


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    print(f"api app on http://127.0.0.1:{port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Hello).serve_forever()
