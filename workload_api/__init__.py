"""The Tessera agent: node attestation, SVID cache and rotation, SPIFFE Workload API."""
