"""The web console: the trust domain and the mesh at a glance (``tessera server console``).

A separate process beside the server, as SPIRE's Tornjak, Istio's Kiali or Linkerd's
viz dashboard are: it reads everything through the server's admin API on its Unix
socket (:mod:`ca.console.sources`), so it holds exactly the admin socket's authority
and nothing more, and reads the proxies' request metrics from Prometheus when one is
given. Pages are rendered on the server (Jinja2) and refreshed in place when the
server says something changed (:mod:`ca.console.live`, server-sent events).

Who may look (:mod:`ca.console.access`): on loopback, the holder of the one-time
token the command prints (exchanged for a session cookie on first use, as Jupyter
does); over mTLS, a caller whose X509-SVID names a SPIFFE ID registered as admin.
It is read-only unless started with ``--write``, and never listens on a public
address without mTLS.

    console = Console(settings)           # ca.console.app
    app = console.app                      # an ASGI app; run it with uvicorn
"""
