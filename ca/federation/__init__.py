"""SPIFFE federation: trusting other trust domains through their bundle endpoints.

    [federation.bundle_endpoint]                 # server.toml: serve our bundle to others
    address = "0.0.0.0:8443"
    profile = "https_spiffe"

    tessera server federation create --trust-domain partner.org \\
        --bundle-endpoint-url https://partner.example:8443 \\
        --bundle-endpoint-profile https_spiffe \\
        --endpoint-spiffe-id spiffe://partner.org/tessera/server \\
        --trust-domain-bundle-path partner.bundle.json

Modules: ``relationship`` (validating what an operator asks for), ``client``
(fetching and authenticating a bundle endpoint), ``refresher`` (the background
task that keeps federated bundles fresh), ``endpoint`` (serving our own
bundle), ``api`` (the admin endpoints) and ``cli`` (the commands).
See docs/federation.md. Nothing is imported here, so that the CLI (which
mounts ``ca.federation.cli``) does not load the datastore to print a help text.
"""
