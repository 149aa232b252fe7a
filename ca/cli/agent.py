"""``tessera server agent ...``: attested agents (list, show, evict, ban)."""

from __future__ import annotations

from typing import Any

import click

from ca.cli.common import emit_found, timestamp
from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option


@click.group("agent")
def agent_group() -> None:
    """Attested agents."""


def agent_text(agent: dict[str, Any]) -> str:
    lines = [
        f"SPIFFE ID         : {agent['spiffe_id']}",
        f"Attestation type  : {agent['attestation_type']}",
        f"Expiration time   : {timestamp(agent['expires_at'])}",
        f"Serial number     : {agent['serial']}",
        f"Banned            : {str(agent['banned']).lower()}",
    ]
    lines += [f"Selector          : {s['type']}:{s['value']}" for s in agent["selectors"]]
    lines += [f"Alias             : {a}" for a in agent.get("aliases", [])]
    return "\n".join(lines)


@agent_group.command("list")
@admin_options
@output_option
def agent_list(admin_socket: str | None, data_dir: str, output: str) -> None:
    """List attested agents."""
    agents = admin_client(admin_socket, data_dir).get("/v1/agents")["agents"]
    emit_found(output, "agents", agents, ("attested agent", "attested agents"), agent_text)


@agent_group.command("count")
@admin_options
@output_option
def agent_count(admin_socket: str | None, data_dir: str, output: str) -> None:
    """Count attested agents."""
    result = admin_client(admin_socket, data_dir).get("/v1/agents/count")
    emit(output, result, f"{result['count']} attested agents")


@agent_group.command("show")
@admin_options
@option("--spiffe-id", required=True, help="The agent's SPIFFE ID.")
@output_option
def agent_show(admin_socket: str | None, data_dir: str, spiffe_id: str, output: str) -> None:
    """Show one attested agent."""
    agent = admin_client(admin_socket, data_dir).get(
        "/v1/agents/show", params={"spiffe_id": spiffe_id}
    )
    emit(output, agent, lambda: agent_text(agent))


def _agent_action(action: str, verb: str, doc: str) -> None:
    @agent_group.command(action, help=doc)
    @admin_options
    @option("--spiffe-id", required=True, help="The agent's SPIFFE ID.")
    @output_option
    def command(admin_socket: str | None, data_dir: str, spiffe_id: str, output: str) -> None:
        result = admin_client(admin_socket, data_dir).post(
            f"/v1/agents/{action}", json={"spiffe_id": spiffe_id}
        )
        emit(output, result, f"Agent {spiffe_id} {verb}.")


_agent_action("evict", "evicted; it must attest again",
              "Forget an agent: it must attest again (a join-token agent needs a new token). "
              "Evicting a banned agent lifts the ban.")
_agent_action("ban", "banned", "Refuse an agent everything, including attesting again.")
_agent_action("unban", "unbanned", "Lift a ban: the agent may attest again.")
