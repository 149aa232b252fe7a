"""``tessera mesh ...``: the service mesh's configuration, stored by the server.

    tessera mesh apply -f mesh.yaml [-f more.yaml ...] [--dry-run]
    tessera mesh get virtualservice [reviews] [--output yaml|json]
    tessera mesh delete virtualservice reviews
    tessera mesh services [--service users-service] [--output json]

Admin commands: they reach the server through its admin socket as ``tessera server``
commands do (``--admin-socket``, ``TESSERA_ADMIN_SOCKET``, ``--data-dir``,
``--config``). The root group (:mod:`tessera.cli`) mounts :data:`mesh_group` when its
name is used.

``apply`` reads every file and checks it here first, so each problem is named with its
file and document; then it sends the resources of all the files as one apply, which the
server checks again against the stored configuration, all or nothing. Kinds are named as
kubectl names Istio's: in any case, singular or plural, or short (``vs``, ``dr``, ``gw``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final, NoReturn
from urllib.parse import quote

import click

from ca.admin_client import AdminApiError
from ca.commandline import admin_client, admin_options
from mesh import (
    KINDS,
    MAX_INPUT_BYTES,
    ConfigError,
    FieldError,
    Resource,
    ResourceKey,
    parse_documents,
)
from mesh.catalog import MAX_HEALTH_DETAIL, one_line
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.commandline import emit, option, output_option, progress
from sdk.errors import InvalidArgument, TesseraError

__all__ = ["CLOCK", "kind_for", "mesh_group"]

CLOCK: Clock = SYSTEM_CLOCK
"""What ``get``'s AGE and UPDATED count from (tests set a ManualClock)."""

STDIN: Final = "-"

_PLURALS: Final = {"AuthorizationPolicy": "AuthorizationPolicies"}
_SHORT: Final = {"Gateway": ("gw",), "VirtualService": ("vs",), "DestinationRule": ("dr",),
                 "Service": ("svc",)}


def plural(kind: str) -> str:
    """``VirtualServices``, ``AuthorizationPolicies``."""
    return _PLURALS.get(kind, f"{kind}s")


def _kind_names() -> dict[str, str]:
    names: dict[str, str] = {}
    for kind in KINDS:
        for name in (kind, plural(kind), *_SHORT.get(kind, ())):
            names[name.lower()] = kind
    return names


_KIND_NAMES: Final = _kind_names()


def kind_for(text: str) -> str | None:
    """The kind ``text`` names, as kubectl reads it (``vs``, ``VirtualServices``), or None."""
    return _KIND_NAMES.get(text.lower())


def _kind_argument(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """KIND in any of the spellings :func:`kind_for` reads, as the kind's own name."""
    kind = kind_for(value)
    if kind is None:
        raise click.BadParameter(
            f"{value!r} is not a mesh kind; use one of {', '.join(k.lower() for k in KINDS)}",
            ctx=ctx, param=param)
    return kind


class NotApplied(TesseraError):
    """The configuration was refused; its problems (``errors``) were printed above this
    sentence."""

    status = 400

    def __init__(self, message: str, errors: Iterable[FieldError] = ()) -> None:
        super().__init__(message)
        self.errors = tuple(errors)


@click.group("mesh")
def mesh_group() -> None:
    """The service mesh's configuration: Istio's resources, Tessera's Service and RateLimit."""


# -- apply ------------------------------------------------------------------------------


@mesh_group.command("apply")
@admin_options
@option("-f", "--filename", "files", multiple=True, required=True,
        help="A YAML file of resources ('-' for stdin); repeat for several, applied as one.")
@option("--dry-run", is_flag=True, default=False,
        help="Check everything and say what would change, but store nothing.")
@output_option
def mesh_apply(admin_socket: str | None, data_dir: str, files: tuple[str, ...], dry_run: bool,
               output: str) -> None:
    """Create or replace resources, all or none: nothing is stored on any error."""
    try:
        result = _apply(admin_socket, data_dir, files, dry_run)
    except TesseraError as err:
        if output == "json":  # a script reads why on stdout; the person, on stderr
            errors = err.errors if isinstance(err, NotApplied) else [
                FieldError("", "", "", err.message)]
            emit(output, {"applied": False, "dry_run": dry_run,
                          "errors": [dataclasses.asdict(error) for error in errors]}, "")
        raise
    marker = " (dry run)" if result["dry_run"] else ""
    emit(output, result, lambda: "\n".join(
        f"{c['kind']} {c['name']} {c['action']}{marker}" for c in result["changes"]))


def _apply(admin_socket: str | None, data_dir: str, files: tuple[str, ...], dry_run: bool
           ) -> dict[str, Any]:
    """The server's answer to the apply; NotApplied with every problem found."""
    texts = [(_source_name(name), _read_input(name)) for name in _once_each(files)]
    resources: list[Resource] = []
    problems: list[FieldError] = []
    defined_in: dict[ResourceKey, str] = {}
    for source, data in texts:
        try:
            parsed = parse_documents(data, source=source)
        except ConfigError as err:
            problems.extend(err.errors)
            continue
        for resource in parsed:
            earlier = defined_in.setdefault(resource.key, source)
            if earlier != source:
                problems.append(FieldError(
                    resource.KIND, resource.name, "",
                    f"is defined in both {earlier} and {source}: one of the two would be lost"))
        resources.extend(parsed)
    if problems:
        _refuse(problems)
    # Sent as the documents read, one JSON document (which is YAML) each: files are not
    # pasted together, where a directive or a document marker of one could upset the next.
    body = "\n---\n".join(
        json.dumps(resource.to_document(), separators=(",", ":")) for resource in resources
    ).encode()
    if len(body) > MAX_INPUT_BYTES:
        raise InvalidArgument(
            f"the resources of these files take {len(body):,} bytes; at most "
            f"{MAX_INPUT_BYTES:,} bytes (4 MiB) may be applied at once: apply them in "
            "several steps"
        )
    params = {"dry_run": "true" if dry_run else "false",
              "source": _source_label([source for source, _ in texts])}
    try:
        result: dict[str, Any] = admin_client(admin_socket, data_dir).post(
            "/v1/mesh/apply", params=params, content=body,
            headers={"content-type": "application/yaml"})
    except AdminApiError as err:
        if not err.field_errors:
            raise
        _refuse(_field_errors(err.field_errors))
    return result


def _once_each(files: Iterable[str]) -> list[str]:
    names = list(files)
    if names.count(STDIN) > 1:
        raise InvalidArgument("'-f -' may be given once: standard input can be read only once")
    for name in names:
        if names.count(name) > 1:
            raise InvalidArgument(f"{name} is given twice with -f; give each file once")
    return names


def _source_name(name: str) -> str:
    return "<stdin>" if name == STDIN else name


def _source_label(sources: list[str], limit: int = 200) -> str:
    """What the server calls the input in its errors: the files, or the first and a count."""
    joined = ", ".join(sources)
    if len(joined) <= limit:
        return joined
    return f"{sources[0][:limit]} and {len(sources) - 1} more files"


def _read_input(name: str) -> bytes:
    """The file's bytes (stdin for ``-``), read no further than one byte past the limit."""
    if name == STDIN:
        return _read_bounded(sys.stdin.buffer, "standard input")
    path = Path(name)
    try:
        with path.open("rb") as stream:
            return _read_bounded(stream, name)
    except FileNotFoundError:
        raise InvalidArgument(f"cannot read {name}: no such file; check the path given "
                              "with -f") from None
    except IsADirectoryError:
        raise InvalidArgument(f"cannot read {name}: it is a directory; give each file with "
                              "its own -f") from None
    except OSError as err:
        raise InvalidArgument(f"cannot read {name}: {err.strerror or err}") from err


def _read_bounded(stream: BinaryIO, name: str) -> bytes:
    data = stream.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidArgument(
            f"{name} is larger than {MAX_INPUT_BYTES:,} bytes (4 MiB), the most that may be "
            "applied at once: split it into several files and apply each"
        )
    return data


def _field_errors(errors: Iterable[Mapping[str, Any]]) -> list[FieldError]:
    """The server's field errors (a malformed one: its text as the message)."""
    found = []
    for error in errors:
        try:
            found.append(FieldError(
                str(error["kind"]), str(error["name"]), str(error["path"]),
                str(error["message"]), str(error.get("source", "")),
                int(error.get("document", 0))))
        except (KeyError, TypeError, ValueError):
            found.append(FieldError("", "", "", str(error)))
    return found


def _refuse(problems: list[FieldError]) -> NoReturn:
    for problem in problems:
        progress(str(problem))
    count = "the problem" if len(problems) == 1 else f"the {len(problems)} problems"
    raise NotApplied(f"nothing was applied: correct {count} above and apply again", problems)


# -- get --------------------------------------------------------------------------------


@mesh_group.command("get")
@admin_options
@click.argument("kind", callback=_kind_argument)
@click.argument("name", required=False)
@option("--output", type=click.Choice(["text", "yaml", "json"]), default="text",
        show_default=True,
        help="'yaml' prints the resources as applied (multi-document); 'json' one JSON "
             "document.")
def mesh_get(admin_socket: str | None, data_dir: str, kind: str, name: str | None, output: str
             ) -> None:
    """Show the resources of KIND (gateway, virtualservice, destinationrule,
    authorizationpolicy, requestauthentication, service, ratelimit), or the one named."""
    client = admin_client(admin_socket, data_dir)
    if name is not None:
        resource = client.get(f"/v1/mesh/{kind}/{quote(name, safe='')}")
        if output == "yaml":
            click.echo(_yaml([resource["document"]]), nl=False)
        else:
            emit(output, resource, lambda: _table([resource]))
        return
    answer = client.get(f"/v1/mesh/{kind}")
    resources = answer["resources"]
    if output == "yaml":
        click.echo(_yaml([r["document"] for r in resources]), nl=False)
        return

    def text() -> str:
        return _table(resources) if resources else f"No {plural(kind)} found."

    emit(output, answer, text)


def _yaml(documents: list[Any]) -> str:
    """The documents as applied: their keys in the order written, block style, a long
    value on one line."""
    import yaml

    return "".join(
        ("---\n" if index else "")
        + yaml.safe_dump(document, sort_keys=False, default_flow_style=False,
                         width=float("inf"))
        for index, document in enumerate(documents)
    )


def _table(resources: list[Mapping[str, Any]]) -> str:
    now = CLOCK.now()
    rows = [("NAME", "KIND", "REVISION", "AGE", "UPDATED")] + [
        (str(r["name"]), str(r["kind"]), str(r["revision"]),
         age(now, int(r["created_at"])), age(now, int(r["updated_at"])))
        for r in resources
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def age(now: datetime, unix: int) -> str:
    """How long ago ``unix`` was, as kubectl's AGE: ``45s``, ``12m``, ``5h``, ``3d``."""
    seconds = max(0, int((now - datetime.fromtimestamp(unix, UTC)).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


# -- delete -----------------------------------------------------------------------------


@mesh_group.command("delete")
@admin_options
@click.argument("kind", callback=_kind_argument)
@click.argument("name")
@output_option
def mesh_delete(admin_socket: str | None, data_dir: str, kind: str, name: str, output: str
                ) -> None:
    """Delete the resource KIND NAME; refused while another resource refers to it."""
    try:
        result = admin_client(admin_socket, data_dir).delete(
            f"/v1/mesh/{kind}/{quote(name, safe='')}")
    except AdminApiError as err:
        if not err.field_errors:
            raise
        referrers = _referrers(f"{kind} {name}", _field_errors(err.field_errors))
        for sentence in referrers:
            progress(sentence)
        those = ("the resource above still refers" if len(referrers) == 1
                 else f"the {len(referrers)} resources above still refer")
        raise NotApplied(f"{kind} {name} was not deleted: {those} to it") from None
    emit(output, result, f"{result['kind']} {result['name']} deleted")


def _referrers(target: str, problems: Iterable[FieldError]) -> list[str]:
    """One sentence per resource that refers to ``target``: by which fields, and what to
    do. (The server names each field that would refer to nothing once ``target`` is
    gone; one it could not name a resource for is shown as it came.)"""
    fields: dict[str, list[str]] = {}
    unnamed: list[str] = []
    for problem in problems:
        if problem.kind and problem.name:
            fields.setdefault(f"{problem.kind} {problem.name}", []).append(problem.path)
        else:
            unnamed.append(str(problem))
    sentences = []
    for referrer, paths in fields.items():
        named = [path for path in paths if path]
        if not named:
            sentences.append(f"{referrer} refers to {target}: change or delete {referrer} first")
            continue
        listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
        those = "that field" if len(named) == 1 else "those fields"
        sentences.append(f"{referrer} refers to {target} in {listed}: change {those} or "
                         f"delete {referrer} first")
    return sentences + unnamed


# -- describe and explain ---------------------------------------------------------------


@mesh_group.command("describe")
@admin_options
@click.argument("service")
@output_option
def mesh_describe(admin_socket: str | None, data_dir: str, service: str, output: str) -> None:
    """What each proxy of SERVICE will do: inbound policy, routes, clusters and endpoints,
    each line naming the resource and field it came from; then each configuration an
    Envoy of SERVICE (a sidecar, or a gateway routing to it) refused, with Envoy's reason
    (``rejections`` in ``--output json``)."""
    result = admin_client(admin_socket, data_dir).get(
        f"/v1/mesh/describe/{quote(service, safe='')}")
    emit(output, result, lambda: "\n".join(
        [*result["lines"], *map(rejected, result.get("rejections", ()))]))


def rejected(rejection: Mapping[str, Any]) -> str:
    """``Envoy N on node A rejected listeners (version V): <Envoy's reason>``, from one
    of describe's ``rejections``."""
    proxy = "gateway " if rejection.get("proxy") == "gateway" else ""
    return (f"{proxy}Envoy {rejection['node_id']} on node {rejection['agent']} rejected "
            f"{rejection['type']} (version {rejection['version']}): {rejection['reason']}")


def _pair(text: str, flag: str, *, lower: bool = True) -> tuple[str, str]:
    """NAME=VALUE of a --header (its name in lower case) or a --gateway label."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        example = "x-user=alice" if flag == "--header" else "istio=ingressgateway"
        raise InvalidArgument(f"{flag} {text!r} is not NAME=VALUE, e.g. {flag} {example}")
    return (name.strip().lower() if lower else name.strip()), value


@mesh_group.command("explain")
@admin_options
@option("--from", "caller", metavar="SPIFFE_ID",
        help="The SPIFFE ID of the calling workload (its sidecar routes the request); with "
             "--gateway, the gateway's own (what the destination's sidecar judges).")
@option("--to", "service", metavar="SERVICE", help="The Service called.")
@option("--gateway", "gateway", multiple=True, metavar="NAME=VALUE",
        help="Instead of --from/--to: a request entering the gateway with these labels "
             "(repeatable), e.g. --gateway istio=ingressgateway.")
@option("--port", type=click.IntRange(1, 65535), default=None,
        help="With --gateway: the Gateway server's port the request enters on [80]; "
             "otherwise the Service's port.")
@option("--host", default="", help="With --gateway: the request's Host.")
@option("--method", default="GET", show_default=True, help="The request's method.")
@option("--path", default="/", show_default=True, help="The request's path (and query).")
@option("--header", "headers", multiple=True, metavar="NAME=VALUE",
        help="A request header (repeatable).")
@output_option
def mesh_explain(admin_socket: str | None, data_dir: str, caller: str | None,
                 service: str | None, gateway: tuple[str, ...], port: int | None, host: str,
                 method: str, path: str, headers: tuple[str, ...], output: str) -> None:
    """How a request from --from to --to (or entering a --gateway) is routed, to which
    destination and subset and why, and the rule that allows or refuses it. Exit status
    0 when allowed, 1 when refused by a rule, not routed (a gateway's 404), not served
    (no healthy instance: a 503), or undecided (no instance registered yet, and the labels
    its sidecars run with decide)."""
    body: dict[str, Any] = {"method": method.upper(), "path": path,
                            "headers": dict(_pair(h, "--header") for h in headers)}
    if gateway:
        if service:
            raise InvalidArgument("give --gateway (and --from: the gateway's SPIFFE ID) for a "
                                  "request entering a gateway, or --from and --to for a call "
                                  "between services, not both")  # fmt: skip
        body.update(gateway=dict(_pair(g, "--gateway", lower=False) for g in gateway),
                    host=host)
        if caller:
            body["from"] = caller
    else:
        if not caller or not service:
            raise InvalidArgument("explain needs --from SPIFFE_ID and --to SERVICE, or "
                                  "--gateway NAME=VALUE; e.g. tessera mesh explain --from "
                                  "spiffe://example.org/orders --to users-service")
        body.update({"from": caller, "to": service})
    if port is not None:
        body["port"] = port
    result = admin_client(admin_socket, data_dir).post("/v1/mesh/explain", json=body)
    emit(output, result, lambda: "\n".join(result["lines"]))
    if not result["allowed"]:
        sys.exit(1)


# -- services -----------------------------------------------------------------------------


@mesh_group.command("services")
@admin_options
@option("--service", default=None, metavar="NAME", help="Only the instances of this Service.")
@output_option
def mesh_services(admin_socket: str | None, data_dir: str, service: str | None, output: str
                  ) -> None:
    """Every instance in the catalog: its Service, address, node (the agent that registered
    it), labels, health and since when, and (in a DETAIL column, when any is unhealthy) why
    its health check failed. ``--output json`` prints a list of objects with ``service``,
    ``address``, ``node``, ``labels``, ``health``, ``since``, ``spiffeId`` and ``detail``
    (null unless unhealthy)."""
    params = {"service": service} if service else None
    instances = admin_client(admin_socket, data_dir).get("/v1/mesh/services",
                                                         params=params)["instances"]

    def text() -> str:
        if not instances:
            where = f"of {service} " if service else ""
            return (f"No instances {where}registered. Instances join the catalog when "
                    "'tessera sidecar run --service NAME' starts on a node with an agent.")
        now = CLOCK.now()
        details = any(i.get("detail") for i in instances)
        rows = [("SERVICE", "ADDRESS", "NODE", "LABELS", "HEALTH", "SINCE")
                + (("DETAIL",) if details else ())] + [
            (i["service"], i["address"], i["node"],
             ",".join(f"{k}={v}" for k, v in i["labels"].items()) or "-", i["health"],
             age(now, int(datetime.fromisoformat(i["since"]).timestamp())))
            + ((one_line(i.get("detail") or "-", MAX_HEALTH_DETAIL),) if details else ())
            for i in instances
        ]  # fmt: skip
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        return "\n".join(
            "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        )

    emit(output, instances, text)
