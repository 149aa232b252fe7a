"""The server's Prometheus metrics, served on ``/metrics`` of the node API."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SVIDS_ISSUED = Counter(
    "tessera_server_svids_issued_total", "SVIDs issued by this server", ["kind"]
)
ISSUANCE_SECONDS = Histogram(
    "tessera_server_issuance_seconds",
    "Time to check and sign one batch of CSRs",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
ISSUANCE_GROUP_BATCHES = Histogram(
    "tessera_server_issuance_group_batches",
    "Batches of X509-SVIDs recorded together in one transaction (one group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
NODE_API_REQUESTS = Counter(
    "tessera_server_node_api_requests_total", "Node API requests", ["endpoint", "status"]
)
ATTESTATIONS = Counter(
    "tessera_server_node_attestations_total", "Node attestations", ["type", "result"]
)
AUTHORITY_EXPIRY = Gauge(
    "tessera_server_authority_expiry_timestamp_seconds",
    "When this server's active authority expires",
    ["kind"],
)
ENTRIES = Gauge("tessera_server_entries", "Registration entries in the datastore")
AGENTS = Gauge("tessera_server_agents", "Attested agents in the datastore")
ENTRY_REVISION = Gauge("tessera_server_entry_revision", "The datastore's entry revision")
TOMBSTONES_PURGED = Counter(
    "tessera_server_tombstones_purged",
    "Tombstones of deleted entries this server purged once older than the retention",
)
LONG_POLLS = Gauge(
    "tessera_server_agent_long_polls",
    "Agents' entry syncs this server holds open, waiting for a change to answer with",
)
MESH_REVISION = Gauge(
    "tessera_server_mesh_revision", "The datastore's mesh configuration revision"
)
MESH_TOMBSTONES_PURGED = Counter(
    "tessera_server_mesh_tombstones_purged",
    "Tombstones of deleted mesh resources this server purged once older than the retention",
)
