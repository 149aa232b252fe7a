"""``tessera server ...``: run and operate a trust domain's server (the CA).

CLI.md is the contract for names: every ``spire-server X`` is ``tessera server
X`` with kebab-case flags. Admin commands talk to a running server over its
admin socket (``--admin-socket``, default ``<data-dir>/admin.sock``). The root
group (:mod:`tessera.cli`) mounts :data:`server` when its name is used, and
:data:`server` mounts each noun, one module each, when its name is used: ``tessera
server entry show`` imports :mod:`ca.cli.entry` and no other noun.
"""

from __future__ import annotations

import click

from sdk.commandline import LazyGroup

NOUNS = {
    "run": "ca.cli.run:server_run",
    "healthcheck": "ca.cli.healthcheck:server_healthcheck",
    "token": "ca.cli.token:token_group",
    "entry": "ca.cli.entry:entry_group",
    "agent": "ca.cli.agent:agent_group",
    "bundle": "ca.cli.bundle:bundle_group",
    "x509": "ca.cli.x509:x509_group",
    "jwt": "ca.cli.jwt:jwt_group",
    "localauthority": "ca.cli.localauthority:localauthority_group",
    "audit": "ca.cli.audit:audit_group",
    "federation": "ca.federation.cli:federation_group",
    "console": "ca.cli.console:server_console",
}


@click.group("server", cls=LazyGroup, lazy=NOUNS)
def server() -> None:
    """Run and operate a trust domain's server (the CA)."""
