"""The mesh's data plane as Tessera runs it: ``tessera sidecar run`` and ``tessera gateway
run``, in front of Envoy or the built-in proxy.

It stands on :mod:`mesh` (the configuration and the compiler) and :mod:`sdk` (SVIDs,
TLS), and talks to the node's agent only over its Unix socket, as any workload does.
"""
