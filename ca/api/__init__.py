"""The server's HTTP APIs: the node API (agents, over mTLS) and the admin API (Unix socket)."""
