"""Tessera's trust-domain server: the certificate authority, its datastore and APIs.

The server issues X509-SVIDs and JWT-SVIDs to attested agents, keeps the trust
bundle, and is driven by operators through ``tessera server ...``::

    tessera server run --trust-domain example.org --data-dir /var/lib/tessera
    tessera server entry create --parent-id spiffe://example.org/node \\
        --spiffe-id spiffe://example.org/web --selector unix:uid:1000
"""
