"""The SDK wired into the libraries a service already uses.

- :mod:`sdk.integrations.httpx` — ``httpx`` clients that dial with the
  workload's SVID and authorize the server; ``bearer_auth`` for JWT-SVIDs.
- :mod:`sdk.integrations.asgi` — the caller's SPIFFE ID from the ASGI TLS
  extension (and the uvicorn protocol that fills it), a policy middleware.
- :mod:`sdk.integrations.fastapi` — dependencies: ``spiffe_peer``,
  ``enforce_policy``, ``jwt_svid_caller``.
- :mod:`sdk.integrations.grpc` — grpcio credentials from a source, an
  authorizing server interceptor.

Each module imports its library; import only the ones you use.
"""
