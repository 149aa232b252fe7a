"""``tessera agent ...``: run an agent, and talk to one through the Workload API.

    tessera agent run --trust-domain example.org --server 127.0.0.1:8081 \\
        --data-dir /var/lib/tessera/agent --join-token <token> --trust-bundle bundle.pem
    tessera agent healthcheck
    tessera agent api fetch x509 --write ./svid
    tessera agent api fetch jwt --audience db
    tessera agent api validate jwt --audience db --svid <token>
    tessera agent api watch

The ``api`` commands are Workload API *clients* built on the ``spiffe``
package's ``WorkloadApiClient``, exactly what a workload would use. They find
the agent through ``--socket``, else ``$SPIFFE_ENDPOINT_SOCKET``, else
``<data-dir>/agent.sock``. Their errors from the Workload API are translated
here, at one boundary, into sentences.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import grpc  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, WorkloadApiClient
from spiffe.errors import PySpiffeError
from spiffe.workloadapi.x509_context import X509Context as SpiffeX509Context

from sdk import eventloop
from sdk.backoff import Backoff
from sdk.commandline import config_file_values, config_option, emit, option, output_option, progress
from sdk.errors import InvalidArgument, PermissionDenied, TesseraError, Unavailable
from sdk.privatefiles import write_file_atomically
from sdk.spiffeid import parse_spiffe_id
from workload_api.config import (
    DEFAULT_HEALTH_BIND,
    LOG_LEVELS,
    agent_config,
    default_socket_path,
    parse_socket,
)

__all__ = ["agent"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
CALL_TIMEOUT = 10.0


@click.group("agent", context_settings=CONTEXT)
def agent() -> None:
    """Run a Tessera agent, and use its Workload API."""


# -- tessera agent run -------------------------------------------------------------------


@agent.command("run")
@config_option
@option("--trust-domain", help="The trust domain, e.g. example.org.")
@option("--server", multiple=True,
        help="HOST:PORT of a server's node API (repeat it for several servers).")
@option("--data-dir", type=click.Path(file_okay=False),
        help="Where the agent keeps its SVID, key and the trust bundle (made 0700).")
@option("--socket", help="The Workload API socket "
        "[default: $SPIFFE_ENDPOINT_SOCKET, else <data-dir>/agent.sock].")
@option("--join-token", help="Attest with this join token (first start only).")
@option("--x509pop-cert", type=click.Path(dir_okay=False),
        help="Attest with x509pop: the node's certificate.")
@option("--x509pop-key", type=click.Path(dir_okay=False),
        help="Attest with x509pop: the node's private key.")
@option("--trust-bundle", type=click.Path(dir_okay=False),
        help="PEM bundle to verify the server with on first contact.")
@option("--insecure-bootstrap", is_flag=True, default=None,
        help="Trust the server on first contact without verifying it (then pin its bundle).")
@option("--health-bind", default=DEFAULT_HEALTH_BIND, show_default=True,
        help="HOST:PORT for /live, /ready and /metrics; 0 turns them off.")
@option("--otlp-endpoint",
        help="HOST:PORT of an OTLP/gRPC collector the node's Envoy proxies send spans to.")
@option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def agent_run(**flags: Any) -> None:
    """Run the agent: attest the node, sync SVIDs, serve the Workload API."""
    values = {k: v for k, v in config_file_values().items() if k not in flags}
    values.update({k: v for k, v in flags.items() if v is not None and v != ()})
    config = agent_config(values)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.log_level != "debug":  # one line per node API request is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from workload_api.agent import Agent

    started = time.monotonic()
    progress(f"Starting the Tessera agent for trust domain {config.trust_domain.name}")
    progress(f"  data dir: {config.data_dir}")
    progress(f"  servers:  {', '.join(str(s) for s in config.servers)}")

    def ready(_: Agent) -> None:
        progress(f"Agent is ready ({time.monotonic() - started:.1f}s). Ctrl-C stops it.")

    eventloop.run(Agent(config, progress=progress).run(on_ready=ready))
    progress("Agent stopped.")


# -- Workload API clients ----------------------------------------------------------------


def socket_options(f: Any) -> Any:
    f = option("--data-dir", type=click.Path(file_okay=False, readable=False),
               help="The agent's data directory, to find its socket there.")(f)
    f = option("--socket", help="The agent's Workload API socket "
               "[default: $SPIFFE_ENDPOINT_SOCKET, else <data-dir>/agent.sock].")(f)
    return config_option(f)  # e.g. the agent's own agent.toml: its socket and data_dir


def socket_path(socket: str | None, data_dir: str | None) -> Path:
    if socket:
        return parse_socket(socket, what="--socket")
    return default_socket_path(Path(data_dir) if data_dir else None)


@contextlib.contextmanager
def workload_api(path: Path) -> Iterator[WorkloadApiClient]:
    """A py-spiffe client on ``path``; its errors become TesseraErrors with a sentence."""
    try:
        path.lstat()
    except PermissionError as err:
        raise PermissionDenied(
            f"permission denied on the Workload API socket {path}: a directory on the way is "
            f"closed to uid {os.getuid()}; serve the socket where every workload can reach it "
            "('socket' in agent.toml), or pass --socket"
        ) from err
    except OSError as err:
        raise Unavailable(
            f"no Tessera agent is listening on {path}; start one with 'tessera agent run' "
            "or pass the socket with --socket"
        ) from err
    try:
        client = WorkloadApiClient(socket_path=f"unix://{path}", default_timeout=CALL_TIMEOUT)
    except PySpiffeError as err:
        raise InvalidArgument(f"cannot use the Workload API socket {path}: {err}") from err
    try:
        with client:
            yield client
    except PySpiffeError as err:
        raise translate_error(err, path) from err


def rpc_status(err: BaseException) -> tuple[Any, str] | None:
    """The gRPC status code and details behind a py-spiffe error, if there is one."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, grpc.RpcError) and hasattr(cause, "code"):
            return cause.code(), str(cause.details() or "")
        cause = cause.__cause__
    return None


def translate_error(err: PySpiffeError, path: Path) -> TesseraError:
    status = rpc_status(err)
    if status is None:
        return Unavailable(f"the Workload API on {path} failed: {err}")
    code, details = status
    if code == grpc.StatusCode.PERMISSION_DENIED:
        uid = os.getuid()
        return PermissionDenied(
            f"the agent has no identity for this process (uid {uid}): {details}; register "
            f"an entry whose selectors match it, e.g. --selector unix:uid:{uid}"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details or str(err))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(
            f"cannot reach the agent on {path} ({details or code.name}); check that "
            "'tessera agent run' is running"
        )
    return Unavailable(f"the agent on {path} answered {code.name}: {details}")


def _time(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _pem(certificates: Any) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)


def _sorted_authorities(authorities: Any) -> list[x509.Certificate]:
    return sorted(authorities, key=lambda c: (c.not_valid_before_utc, c.serial_number))


@agent.command("healthcheck")
@socket_options
@output_option
def healthcheck(socket: str | None, data_dir: str | None, output: str) -> None:
    """Exit 0 when the agent answers on its Workload API socket."""
    path = socket_path(socket, data_dir)
    try:
        with workload_api(path) as client:
            client.fetch_x509_svids()
    except PermissionDenied:
        pass  # it answered: it is up, it just has nothing for this caller
    except TesseraError as err:
        raise Unavailable(f"the agent is not healthy: {err.message}") from err
    emit(output, {"status": "healthy", "socket": str(path)}, "Agent is healthy.")


@agent.group("api")
def api_group() -> None:
    """Workload API client commands (what a workload sees)."""


@api_group.group("fetch")
def fetch_group() -> None:
    """Fetch SVIDs from the agent."""


@fetch_group.command("x509")
@socket_options
@option("--write", type=click.Path(file_okay=False),
        help="Write svid.N.pem, svid.N.key (0600) and bundle.N.pem here, one set per SVID.")
@output_option
def fetch_x509(socket: str | None, data_dir: str | None, write: str | None, output: str) -> None:
    """Fetch this process's X509-SVIDs and bundles."""
    path = socket_path(socket, data_dir)
    began = time.monotonic()
    with workload_api(path) as client:
        context = client.fetch_x509_context()
    elapsed = time.monotonic() - began
    svids = [_svid_summary(context, index) for index in range(len(context.x509_svids))]
    files: list[str] = []
    if write:
        files = [str(p) for p in _write_svids(Path(write), context)]

    def text() -> str:
        count = len(svids)
        lines = [f"Received {count} svid{'' if count == 1 else 's'} after {elapsed:.3f}s"]
        for svid in svids:
            lines += [
                "",
                f"SPIFFE ID:         {svid['spiffe_id']}",
                f"SVID Valid After:  {_time(_from_unix(svid['not_before']))}",
                f"SVID Valid Until:  {_time(_from_unix(svid['expires_at']))}",
            ]
            for number, ca in enumerate(svid["bundle"], start=1):
                lines += [
                    f"CA #{number} Valid After: {_time(_from_unix(ca['not_before']))}",
                    f"CA #{number} Valid Until: {_time(_from_unix(ca['expires_at']))}",
                ]
        lines += [f"Wrote {f}" for f in files]
        return "\n".join(lines)

    emit(output, {"svids": svids, "files": files}, text)


def _svid_summary(context: SpiffeX509Context, index: int) -> dict[str, Any]:
    svid = context.x509_svids[index]
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    authorities = _sorted_authorities(bundle.x509_authorities if bundle else ())
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(svid.leaf.serial_number, "x"),
        "not_before": int(svid.leaf.not_valid_before_utc.timestamp()),
        "expires_at": int(svid.leaf.not_valid_after_utc.timestamp()),
        "cert_chain": _pem(svid.cert_chain),
        "bundle": [
            {
                "not_before": int(ca.not_valid_before_utc.timestamp()),
                "expires_at": int(ca.not_valid_after_utc.timestamp()),
                "pem": _pem([ca]),
            }
            for ca in authorities
        ],
    }


def _write_svids(directory: Path, context: SpiffeX509Context) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index, svid in enumerate(context.x509_svids):
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        key_pem = svid.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        files = (
            (directory / f"svid.{index}.pem", _pem(svid.cert_chain).encode(), 0o644),
            (directory / f"svid.{index}.key", key_pem, 0o600),
            (
                directory / f"bundle.{index}.pem",
                _pem(_sorted_authorities(bundle.x509_authorities if bundle else ())).encode(),
                0o644,
            ),
        )
        for file_path, content, mode in files:
            write_file_atomically(file_path, content, mode=mode)
            written.append(file_path)
    return written


def _from_unix(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


@fetch_group.command("jwt")
@option("--audience", required=True, multiple=True, help="An audience (repeatable).")
@option("--spiffe-id", help="Only this identity's JWT-SVID (default: every identity).")
@socket_options
@output_option
def fetch_jwt(
    audience: tuple[str, ...], spiffe_id: str | None, socket: str | None, data_dir: str | None,
    output: str,
) -> None:
    """Fetch JWT-SVIDs for an audience."""
    subject = SpiffeId(str(parse_spiffe_id(spiffe_id, what="--spiffe-id"))) if spiffe_id else None
    with workload_api(socket_path(socket, data_dir)) as client:
        svids = client.fetch_jwt_svids(audience=set(audience), subject=subject)
    documents = [
        {
            "spiffe_id": str(svid.spiffe_id),
            "token": svid.token,
            "audience": sorted(svid.audience),
            "expires_at": int(svid.expiry),
        }
        for svid in svids
    ]

    def text() -> str:
        return "\n".join(f"token({d['spiffe_id']}):\n\t{d['token']}" for d in documents)

    emit(output, {"svids": documents}, text)


@api_group.group("validate")
def validate_group() -> None:
    """Ask the agent to validate an SVID."""


@validate_group.command("jwt")
@option("--audience", required=True, help="The audience the token must be for.")
@option("--svid", required=True, help="The JWT-SVID (JWS compact) to validate.")
@socket_options
@output_option
def validate_jwt(
    audience: str, svid: str, socket: str | None, data_dir: str | None, output: str
) -> None:
    """Validate a JWT-SVID against the agent's JWT bundles."""
    try:
        with workload_api(socket_path(socket, data_dir)) as client:
            validated = client.validate_jwt_svid(svid, audience)
    except InvalidArgument as err:
        raise InvalidArgument(f"the JWT-SVID is not valid: {err.message}") from err
    claims = _claims(svid)
    document = {"spiffe_id": str(validated.spiffe_id), "claims": claims}

    def text() -> str:
        return "\n".join([
            "SVID is valid.",
            f"SPIFFE ID : {validated.spiffe_id}",
            f"Claims    : {json.dumps(claims, sort_keys=True)}",
        ])

    emit(output, document, text)


def _claims(token: str) -> dict[str, Any]:
    """The claims of a token the agent has just validated, for display."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


@api_group.command("watch")
@socket_options
@output_option
def watch(socket: str | None, data_dir: str | None, output: str) -> None:
    """Print every X.509 update the agent pushes (SPIFFE IDs, expiry); Ctrl-C stops.

    With --output json, each update is one JSON document on its own line.
    """
    path = socket_path(socket, data_dir)
    updates: queue.Queue[SpiffeX509Context | Exception] = queue.Queue()
    last_problem = ""
    backoff = Backoff(initial=0.5, maximum=5.0)
    with workload_api(path) as client:
        while True:
            handler = client.stream_x509_contexts(
                on_success=updates.put, on_error=updates.put, retry_connect=False
            )
            try:
                while True:
                    try:
                        item = updates.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if isinstance(item, Exception):
                        problem = _stream_problem(item, path)
                        if problem != last_problem:
                            progress(f"Error: {problem}; retrying")
                            last_problem = problem
                        break
                    last_problem = ""
                    backoff.reset()
                    _print_update(item, output)
            finally:
                handler.cancel()
            time.sleep(backoff.next())


def _stream_problem(err: Exception, path: Path) -> str:
    text = str(err)
    if "PERMISSION_DENIED" in text:
        return (
            f"the agent has no identity for this process (uid {os.getuid()}); waiting for an "
            "entry that matches it"
        )
    if "UNAVAILABLE" in text or "stream ended" in text:
        return f"lost the agent on {path}"
    return f"the Workload API on {path} failed: {text}"


def _print_update(context: SpiffeX509Context, output: str) -> None:
    received = datetime.now(UTC)
    svids: list[dict[str, Any]] = [
        {
            "spiffe_id": str(svid.spiffe_id),
            "serial": format(svid.leaf.serial_number, "x"),
            "expires_at": int(svid.leaf.not_valid_after_utc.timestamp()),
        }
        for svid in context.x509_svids
    ]
    if output == "json":
        document = {"received_at": received.timestamp(), "svids": svids}
        click.echo(json.dumps(document, sort_keys=True))
        return
    count = len(svids)
    lines = [f"{_time(received)}: {count} X509-SVID{'' if count == 1 else 's'}"]
    lines += [
        f"  {s['spiffe_id']}  expires {_time(_from_unix(s['expires_at']))}  serial {s['serial']}"
        for s in svids
    ]
    click.echo("\n".join(lines))
