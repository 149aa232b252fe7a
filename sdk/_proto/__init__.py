"""Code generated from ``mesh_agent.proto`` (a proxy and its node's agent); see ``make proto``.

Only messages (``mesh_agent_pb2``, and its ``.pyi`` for mypy): the agent serves the
service with grpclib, the proxies call it with grpcio, each naming the methods itself.
"""
