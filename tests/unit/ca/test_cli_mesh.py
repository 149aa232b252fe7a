"""``tessera mesh apply | get | delete`` as a user runs them, with exact output.

The server's real admin app (a fresh :class:`ca.server.Server` on SQLite whose clock
stands still) is served on a Unix socket by uvicorn in a thread; the commands run
through ``tessera.cli.main`` as the console script runs them, so what is checked is
what a user reads on stdout and stderr, and the exit status.
"""

from __future__ import annotations

import io
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import uvicorn

import ca.cli.mesh
from ca.api.admin import create_admin_app
from ca.config import server_config
from ca.datastore.records import ReportedInstance
from ca.proxy_rejections import ProxyRejection, ProxyRejections
from ca.server import Server
from sdk.address import HostPort
from sdk.clock import ManualClock
from tessera.cli import main
from tests.unit.ca.conftest import START
from tests.unit.mesh.documents import MISSION

USERS = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, name: http, protocol: HTTP}]
"""
REVIEWS = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  spiffeIds: [spiffe://example.org/reviews]
  ports: [{number: 9080, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
"""
NOTHING_APPLIED = "Error: nothing was applied: correct the problem above and apply again\n"


@dataclass
class Ran:
    status: int
    out: str
    err: str


class Mesh:
    """A server's admin socket, and ``tessera mesh ...`` against it."""

    def __init__(self, server: Server, socket: Path, files: Path,
                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        self.server = server
        self.store = server.store
        self.socket = socket
        self.files = files
        self._monkeypatch = monkeypatch
        self._capsys = capsys
        self.rejections = ProxyRejections(ManualClock(START))
        """What agents reported their Envoys refused (the admin app shows these)."""

    def file(self, name: str, text: str | bytes) -> str:
        path = self.files / name
        if isinstance(text, str):
            path.write_text(text)
        else:
            path.write_bytes(text)
        return str(path)

    def run(self, *args: str, stdin: bytes = b"", socket_flag: bool = True) -> Ran:
        self._capsys.readouterr()
        flag = ["--admin-socket", str(self.socket)] if socket_flag else []
        self._monkeypatch.setattr(sys, "argv", ["tessera", "mesh", *args, *flag])
        self._monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        status = 0
        try:
            main()
        except SystemExit as exited:
            status = int(exited.code or 0)
        captured = self._capsys.readouterr()
        return Ran(status, captured.out, captured.err)

    def refused(self, *args: str, stdin: bytes = b"") -> str:
        """stderr of a command that must exit 1 and print nothing on stdout."""
        ran = self.run(*args, stdin=stdin)
        assert (ran.status, ran.out) == (1, ""), ran
        return ran.err

    def nothing_stored(self) -> None:
        assert self.store.list_mesh_resources() == []
        assert self.store.mesh_revision() == 0
        assert [e.action for e in self.store.list_audit()] == []


@pytest.fixture
def mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> Iterator[Mesh]:
    clock = ManualClock(START)
    server = Server(server_config({"trust_domain": "example.org",
                                   "data_dir": str(tmp_path / "server"),
                                   "bind": "127.0.0.1:0", "key_manager": {"memory": {}}}),
                    clock=clock)
    rejections = ProxyRejections(clock)
    app = create_admin_app(store=server.store, authorities=server.authorities,
                           issuer=server.issuer, clock=clock, changed=lambda: None,
                           health=server.health, rejections=rejections)
    socket = tmp_path / "admin.sock"
    listener = uvicorn.Server(uvicorn.Config(app, uds=str(socket), log_config=None,
                                             access_log=False, lifespan="off"))
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    for _ in range(1000):  # poll the server's own flag, with a deadline of 1000 short joins
        if listener.started:
            break
        thread.join(0.01)
    assert listener.started
    monkeypatch.setattr(ca.cli.mesh, "CLOCK", ManualClock(START + timedelta(seconds=90)))
    files = tmp_path / "files"
    files.mkdir()
    try:
        mesh = Mesh(server, socket, files, monkeypatch, capsys)
        mesh.rejections = rejections
        yield mesh
    finally:
        listener.should_exit = True
        thread.join(10)
        server.store.close()


# -- apply --------------------------------------------------------------------------------


def test_apply_prints_each_resource_and_what_it_did(mesh: Mesh) -> None:
    services = mesh.file("services.yaml", USERS + "---\n" + REVIEWS)
    route = mesh.file("route.yaml", ROUTE)

    first = mesh.run("apply", "-f", services, "-f", route)
    assert (first.status, first.err) == (0, "")
    assert first.out == (
        "Service users created\n"
        "Service reviews created\n"
        "DestinationRule reviews created\n"
        "VirtualService reviews created\n"
    )

    changed = mesh.run("apply", "-f", route,
                       "-f", mesh.file("users.yaml", USERS.replace("80,", "8080,")))
    assert changed.out == "VirtualService reviews unchanged\nService users configured\n"
    assert mesh.store.mesh_revision() == 2


def test_a_dry_run_is_marked_and_stores_nothing(mesh: Mesh) -> None:
    ran = mesh.run("apply", "-f", mesh.file("users.yaml", USERS), "--dry-run")
    assert (ran.status, ran.out, ran.err) == (0, "Service users created (dry run)\n", "")
    mesh.nothing_stored()


def test_apply_reads_standard_input_and_answers_json(mesh: Mesh) -> None:
    ran = mesh.run("apply", "-f", "-", "--output", "json", stdin=USERS.encode())
    assert ran.status == 0
    assert json.loads(ran.out) == {"revision": 1, "dry_run": False, "changes": [
        {"kind": "Service", "name": "users", "action": "created"}]}


# -- every bad input a new user might try: a sentence, exit 1, nothing stored ------------


def test_yaml_that_does_not_parse(mesh: Mesh) -> None:
    path = mesh.file("mesh.yaml", "kind: Service\nmetadata: {name: users\n")
    assert mesh.refused("apply", "-f", path) == (
        f"{path}: line 3, column 1: invalid YAML: did not find expected ',' or '}}' (while "
        "parsing a flow mapping)\n" + NOTHING_APPLIED)
    mesh.nothing_stored()


def test_an_unknown_kind(mesh: Mesh) -> None:
    path = mesh.file("pod.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {}\n")
    assert mesh.refused("apply", "-f", path) == (
        f"{path} document 1: kind must be one of Gateway, VirtualService, DestinationRule, "
        "AuthorizationPolicy, RequestAuthentication, Service, RateLimit, not 'Pod'\n"
        + NOTHING_APPLIED)
    mesh.nothing_stored()


def test_a_value_of_the_wrong_type(mesh: Mesh) -> None:
    path = mesh.file("users.yaml", USERS.replace("number: 80", "number: '80'"))
    assert mesh.refused("apply", "-f", path) == (
        "Service users: spec.ports[0].number must be an integer, not a string ('80')\n"
        + NOTHING_APPLIED)
    mesh.nothing_stored()


def test_a_regex_re2_does_not_take(mesh: Mesh) -> None:
    route = ROUTE.replace("  - route:", "  - match: [{uri: {regex: '^/(?!admin)'}}]\n    route:")
    path = mesh.file("route.yaml", REVIEWS + "---\n" + route)
    assert mesh.refused("apply", "-f", path) == (
        "VirtualService reviews: spec.http[0].match[0].uri.regex must be an RE2 regular "
        "expression: invalid perl operator: (?! (RE2 has no lookahead)\n" + NOTHING_APPLIED)
    mesh.nothing_stored()


def test_weights_that_do_not_add_up_to_100(mesh: Mesh) -> None:
    path = mesh.file("route.yaml", REVIEWS + "---\n" + ROUTE.replace("weight: 10", "weight: 5"))
    assert mesh.refused("apply", "-f", path) == (
        "VirtualService reviews: spec.http[0].route must have weights that add up to 100, not "
        "95 (with several destinations, one without a weight counts as 0)\n" + NOTHING_APPLIED)
    mesh.nothing_stored()


def test_every_problem_of_every_file_at_once(mesh: Mesh) -> None:
    first = mesh.file("a.yaml", USERS.replace("number: 80", "number: '80'"))
    second = mesh.file("b.yaml", REVIEWS + "---\n" + ROUTE.replace("weight: 10", "weight: 5"))
    assert mesh.refused("apply", "-f", first, "-f", second) == (
        "Service users: spec.ports[0].number must be an integer, not a string ('80')\n"
        "VirtualService reviews: spec.http[0].route must have weights that add up to 100, not "
        "95 (with several destinations, one without a weight counts as 0)\n"
        "Error: nothing was applied: correct the 2 problems above and apply again\n")
    mesh.nothing_stored()


def test_a_good_resource_next_to_a_reference_to_nothing(mesh: Mesh) -> None:
    path = mesh.file("mesh.yaml", USERS + "---\n" + ROUTE)  # no Service reviews, no subsets
    assert mesh.refused("apply", "-f", path) == (
        "VirtualService reviews: spec.hosts[0]: host reviews names no Service; a "
        "VirtualService for the mesh routes the calls made to a Service (to route a gateway's "
        "requests, name the gateway in spec.gateways)\n"
        "VirtualService reviews: spec.http[0].route[0].destination.host: host reviews names no "
        "Service\n"
        "VirtualService reviews: spec.http[0].route[1].destination.host: host reviews names no "
        "Service\n"
        "Error: nothing was applied: correct the 3 problems above and apply again\n")
    mesh.nothing_stored()


def test_a_refused_apply_answers_json_on_stdout_too(mesh: Mesh) -> None:
    first = mesh.file("a.yaml", USERS.replace("number: 80", "number: '80'"))
    second = mesh.file("b.yaml", REVIEWS + "---\n" + ROUTE.replace("weight: 10", "weight: 5"))
    ran = mesh.run("apply", "-f", first, "-f", second, "--output", "json")
    assert ran.status == 1
    assert json.loads(ran.out) == {"applied": False, "dry_run": False, "errors": [
        {"kind": "Service", "name": "users", "path": "spec.ports[0].number",
         "message": "must be an integer, not a string ('80')", "source": first, "document": 1},
        {"kind": "VirtualService", "name": "reviews", "path": "spec.http[0].route",
         "message": "must have weights that add up to 100, not 95 (with several destinations, "
                    "one without a weight counts as 0)", "source": second, "document": 3},
    ]}
    assert ran.err == (
        "Service users: spec.ports[0].number must be an integer, not a string ('80')\n"
        "VirtualService reviews: spec.http[0].route must have weights that add up to 100, not "
        "95 (with several destinations, one without a weight counts as 0)\n"
        "Error: nothing was applied: correct the 2 problems above and apply again\n")
    mesh.nothing_stored()


def test_a_refusal_of_the_server_answers_json_too(mesh: Mesh) -> None:
    path = mesh.file("route.yaml", ROUTE)  # no Service reviews: the server finds it
    ran = mesh.run("apply", "-f", path, "--dry-run", "--output", "json")
    assert ran.status == 1
    answer = json.loads(ran.out)
    assert (answer["applied"], answer["dry_run"]) == (False, True)
    assert [(e["kind"], e["name"], e["path"]) for e in answer["errors"]] == [
        ("VirtualService", "reviews", "spec.hosts[0]"),
        ("VirtualService", "reviews", "spec.http[0].route[0].destination.host"),
        ("VirtualService", "reviews", "spec.http[0].route[1].destination.host")]
    assert answer["errors"][1]["message"] == "host reviews names no Service"
    assert ran.err.endswith("Error: nothing was applied: correct the 3 problems above and "
                            "apply again\n")
    mesh.nothing_stored()


def test_yaml_that_does_not_parse_answers_json_too(mesh: Mesh) -> None:
    path = mesh.file("mesh.yaml", "kind: Service\nmetadata: {name: users\n")
    ran = mesh.run("apply", "-f", path, "--output", "json")
    assert ran.status == 1
    assert json.loads(ran.out) == {"applied": False, "dry_run": False, "errors": [
        {"kind": "", "name": "", "path": "", "source": path, "document": 0,
         "message": "line 3, column 1: invalid YAML: did not find expected ',' or '}' (while "
                    "parsing a flow mapping)"}]}
    assert ran.err == (
        f"{path}: line 3, column 1: invalid YAML: did not find expected ',' or '}}' (while "
        "parsing a flow mapping)\n" + NOTHING_APPLIED)
    missing = str(mesh.files / "missing.yaml")
    ran = mesh.run("apply", "-f", missing, "--output", "json")
    assert ran.status == 1
    assert json.loads(ran.out) == {"applied": False, "dry_run": False, "errors": [
        {"kind": "", "name": "", "path": "", "source": "", "document": 0,
         "message": f"cannot read {missing}: no such file; check the path given with -f"}]}
    assert ran.err == (
        f"Error: cannot read {missing}: no such file; check the path given with -f\n")
    mesh.nothing_stored()


def test_a_10_mb_file(mesh: Mesh) -> None:
    path = mesh.file("big.yaml", b"# padding\n" * 1_048_576)
    assert mesh.refused("apply", "-f", path) == (
        f"Error: {path} is larger than 4,194,304 bytes (4 MiB), the most that may be applied "
        "at once: split it into several files and apply each\n")
    mesh.nothing_stored()


def test_files_over_4_mib_together(mesh: Mesh) -> None:
    def services(prefix: str) -> str:  # 12 Services of 200 KiB each (the annotations)
        note = "x" * (200 * 1024)
        return "---\n".join(
            USERS.replace("name: users}", f"name: {prefix}-{n}, annotations: {{note: {note}}}}}")
            for n in range(12))

    first = mesh.file("a.yaml", services("a"))
    second = mesh.file("b.yaml", services("b"))
    assert mesh.run("apply", "-f", first, "--dry-run").status == 0  # each alone is fine
    err = mesh.refused("apply", "-f", first, "-f", second)
    assert err.startswith("Error: the resources of these files take 4,9")
    assert err.endswith(" bytes; at most 4,194,304 bytes (4 MiB) may be applied at once: "
                        "apply them in several steps\n")
    mesh.nothing_stored()


def test_comments_and_document_markers_of_one_file_do_not_upset_the_next(mesh: Mesh) -> None:
    first = mesh.file("a.yaml", "# services\n---\n" + USERS + "...\n")
    second = mesh.file("b.yaml", "%YAML 1.1\n---\n" + REVIEWS + "---\n")
    ran = mesh.run("apply", "-f", first, "-f", second)
    assert (ran.status, ran.err) == (0, "")
    assert ran.out == (
        "Service users created\nService reviews created\nDestinationRule reviews created\n")


def test_the_same_resource_in_two_files(mesh: Mesh) -> None:
    first = mesh.file("a.yaml", USERS)
    second = mesh.file("b.yaml", USERS.replace("80,", "8080,"))
    assert mesh.refused("apply", "-f", first, "-f", second) == (
        f"Service users is defined in both {first} and {second}: one of the two would be "
        "lost\n" + NOTHING_APPLIED)
    assert mesh.refused("apply", "-f", first, "-f", first) == (
        f"Error: {first} is given twice with -f; give each file once\n")
    mesh.nothing_stored()


def test_a_file_that_is_not_there(mesh: Mesh) -> None:
    missing = str(mesh.files / "missing.yaml")
    assert mesh.refused("apply", "-f", missing) == (
        f"Error: cannot read {missing}: no such file; check the path given with -f\n")


def test_a_directory_in_place_of_a_file(mesh: Mesh) -> None:
    assert mesh.refused("apply", "-f", str(mesh.files)) == (
        f"Error: cannot read {mesh.files}: it is a directory; give each file with its own -f\n")


def test_an_empty_file(mesh: Mesh) -> None:
    path = mesh.file("empty.yaml", "# to do\n")
    assert mesh.refused("apply", "-f", path) == (
        f"Error: {path} holds no resources: nothing to apply\n")


def test_standard_input_twice(mesh: Mesh) -> None:
    assert mesh.refused("apply", "-f", "-", "-f", "-") == (
        "Error: '-f -' may be given once: standard input can be read only once\n")


def test_apply_without_a_file(mesh: Mesh) -> None:
    ran = mesh.run("apply")
    assert ran.status == 2
    assert ran.err.endswith(
        "Error: Missing option '-f' / '--filename' (env var: 'TESSERA_FILENAME').\n")


def test_apply_without_a_running_server(mesh: Mesh, tmp_path: Path) -> None:
    path = mesh.file("users.yaml", USERS)
    mesh.socket = tmp_path / "absent.sock"
    assert mesh.refused("apply", "-f", path) == (
        f"Error: no admin socket at {mesh.socket} (not found): is the server running? "
        "'tessera server run' listens on <data-dir>/admin.sock; pass --data-dir DIR or "
        "--admin-socket PATH\n")


def test_the_admin_socket_may_come_from_the_environment_or_a_config_file(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = mesh.file("users.yaml", USERS)
    monkeypatch.setenv("TESSERA_ADMIN_SOCKET", str(mesh.socket))
    assert mesh.run("apply", "-f", path, socket_flag=False).out == "Service users created\n"
    monkeypatch.delenv("TESSERA_ADMIN_SOCKET")
    config = mesh.file("server.toml", f'admin_socket = "{mesh.socket}"\n')
    ran = mesh.run("get", "svc", "users", "--config", config, "--output", "json",
                   socket_flag=False)
    assert json.loads(ran.out)["name"] == "users"


# -- get ----------------------------------------------------------------------------------


def test_get_prints_a_table_of_a_kind_in_any_spelling(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", USERS + "---\n" + REVIEWS))
    table = (
        "NAME      KIND      REVISION   AGE   UPDATED\n"
        "reviews   Service   1          90s   90s\n"
        "users     Service   1          90s   90s\n"
    )
    for spelling in ("service", "Services", "SVC"):
        ran = mesh.run("get", spelling)
        assert (ran.status, ran.out, ran.err) == (0, table, "")
    assert mesh.run("get", "dr", "reviews").out == (
        "NAME      KIND              REVISION   AGE   UPDATED\n"
        "reviews   DestinationRule   1          90s   90s\n")
    assert mesh.run("get", "virtualservices").out == "No VirtualServices found.\n"


def test_get_as_yaml_gives_back_what_apply_takes(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", REVIEWS))
    ran = mesh.run("get", "destinationrule", "reviews", "--output", "yaml")
    assert ran.out == (
        "apiVersion: networking.istio.io/v1\n"
        "kind: DestinationRule\n"
        "metadata:\n"
        "  name: reviews\n"
        "spec:\n"
        "  host: reviews\n"
        "  subsets:\n"
        "  - name: v1\n"
        "    labels:\n"
        "      version: v1\n"
        "  - name: v2\n"
        "    labels:\n"
        "      version: v2\n"
    )
    every = mesh.run("get", "service", "--output", "yaml").out
    assert every.startswith("apiVersion: tessera.io/v1alpha1\nkind: Service\n")
    assert "\n---\n" not in every  # one Service: one document
    mesh.run("apply", "-f", mesh.file("users.yaml", USERS))
    both = mesh.run("get", "service", "--output", "yaml").out
    applied_again = mesh.run("apply", "-f", "-", stdin=both.encode())
    assert applied_again.out == "Service reviews unchanged\nService users unchanged\n"


def test_get_as_yaml_keeps_the_order_the_keys_were_applied_in(mesh: Mesh) -> None:
    applied = (
        "kind: DestinationRule\n"
        "apiVersion: networking.istio.io/v1\n"
        "metadata:\n"
        "  name: reviews\n"
        "  annotations:\n"
        f"    note: {'subsets by the version label of the sidecars, ' * 3}and a host\n"
        "spec:\n"
        "  subsets:\n"
        "  - labels:\n"
        "      version: v1\n"
        "    name: v1\n"
        "  - labels:\n"
        "      version: v2\n"
        "    name: v2\n"
        "  host: reviews\n"
    )
    mesh.run("apply", "-f", mesh.file("services.yaml", REVIEWS.partition("---\n")[0]))
    mesh.run("apply", "-f", mesh.file("reviews.yaml", applied))
    ran = mesh.run("get", "dr", "reviews", "--output", "yaml")
    assert (ran.status, ran.out, ran.err) == (0, applied, "")
    assert mesh.run("get", "dr", "--output", "yaml").out == applied


def test_get_as_json(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("users.yaml", USERS))
    listed = json.loads(mesh.run("get", "service", "--output", "json").out)
    assert listed["revision"] == 1
    assert [(r["kind"], r["name"], r["revision"]) for r in listed["resources"]] == [
        ("Service", "users", 1)]
    one = json.loads(mesh.run("get", "service", "users", "--output", "json").out)
    assert one == listed["resources"][0]


def test_get_of_what_is_not_there(mesh: Mesh) -> None:
    assert mesh.refused("get", "vs", "reviews") == (
        "Error: VirtualService reviews does not exist; 'tessera mesh get virtualservice' "
        "lists the VirtualServices there are\n")
    ran = mesh.run("get", "pods")
    assert ran.status == 2
    assert ran.err.endswith(
        "Error: Invalid value for 'KIND': 'pods' is not a mesh kind; use one of gateway, "
        "virtualservice, destinationrule, authorizationpolicy, requestauthentication, "
        "service, ratelimit\n")


# -- delete -------------------------------------------------------------------------------


def test_delete_names_what_still_refers_to_the_resource(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", REVIEWS + "---\n" + ROUTE))

    assert mesh.refused("delete", "destinationrule", "reviews") == (
        "VirtualService reviews refers to DestinationRule reviews in "
        "spec.http[0].route[0].destination.subset and spec.http[0].route[1].destination.subset: "
        "change those fields or delete VirtualService reviews first\n"
        "Error: DestinationRule reviews was not deleted: the resource above still refers to "
        "it\n")
    assert mesh.store.get_mesh_resource("DestinationRule", "reviews").deleted is False
    assert mesh.refused("delete", "service", "reviews") == (
        "VirtualService reviews refers to Service reviews in spec.hosts[0], "
        "spec.http[0].route[0].destination.host and spec.http[0].route[1].destination.host: "
        "change those fields or delete VirtualService reviews first\n"
        "DestinationRule reviews refers to Service reviews in spec.host: change that field or "
        "delete DestinationRule reviews first\n"
        "Error: Service reviews was not deleted: the 2 resources above still refer to it\n")

    ran = mesh.run("delete", "vs", "reviews")
    assert (ran.status, ran.out, ran.err) == (0, "VirtualService reviews deleted\n", "")
    ran = mesh.run("delete", "DestinationRule", "reviews", "--output", "json")
    assert json.loads(ran.out) == {"kind": "DestinationRule", "name": "reviews",
                                   "revision": 3, "deleted": True}
    assert mesh.refused("delete", "vs", "reviews") == (
        "Error: VirtualService reviews does not exist; 'tessera mesh get virtualservice' "
        "lists the VirtualServices there are\n")


# -- describe and explain -----------------------------------------------------------------

ALLOW_ORDERS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-allow-orders}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [spiffe://example.org/orders]}
"""


def test_describe_names_the_source_of_every_line(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", REVIEWS + "---\n" + ROUTE))

    ran = mesh.run("describe", "reviews")
    assert (ran.status, ran.err) == (0, "")
    lines = ran.out.splitlines()
    assert all(line.endswith("]") and "  [" in line for line in lines), lines
    assert any("90%" in line and "[VirtualService reviews spec.http[0].route[0]]" in line
               for line in lines), lines
    assert any("10%" in line and "[VirtualService reviews spec.http[0].route[1]]" in line
               for line in lines), lines

    as_json = json.loads(mesh.run("describe", "reviews", "--output", "json").out)
    assert as_json["service"] == "reviews"
    assert as_json["lines"] == lines


def register(mesh: Mesh, service: str, *instances: tuple[str, dict[str, str], str]) -> None:
    """Instances of ``service`` as an agent reports them: (address, labels, health)."""
    mesh.store.report_mesh_instances("spiffe://example.org/tessera/agent/join_token/abc", [
        ReportedInstance(service, HostPort.parse(address), f"spiffe://example.org/{service}",
                         labels, health)  # type: ignore[arg-type]
        for address, labels, health in instances
    ], lease=timedelta(seconds=30))


def test_describe_names_each_envoy_that_refused_its_configuration_and_why(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", USERS.replace("name: users}",
                                                                 "name: users-service}")
                                      + "---\n" + MISSION + "---\n" + REVIEWS))
    agent = "spiffe://example.org/tessera/agent/x509pop/node-1"

    def refused(node_id: str, proxy: str, service: str, labels: dict[str, str],
                type_url: str, version: str, reason: str) -> ProxyRejection:
        return ProxyRejection(agent=agent, node_id=node_id, proxy=proxy, service=service,
                              labels=labels, spiffe_id="", type_url=type_url, version=version,
                              reason=reason, at=START)
    mesh.rejections.report(agent, [
        refused("sidecar~node-1~users-service~15006", "sidecar", "users-service", {},
                "type.googleapis.com/envoy.config.listener.v3.Listener", "7",
                "malformed IP address: localhost"),
        refused("gateway~node-1", "gateway", "", {"istio": "ingressgateway"},
                "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "9",
                "RE2 program size of 101 > max program size of 100"),
        refused("sidecar~node-1~reviews~15007", "sidecar", "reviews", {},
                "type.googleapis.com/envoy.config.cluster.v3.Cluster", "3", "not this one"),
    ], lease=timedelta(seconds=30))

    ran = mesh.run("describe", "users-service")
    assert (ran.status, ran.err) == (0, "")
    assert ran.out.splitlines()[-2:] == [  # the oldest first, then by node
        f"gateway Envoy gateway~node-1 on node {agent} rejected routes (version 9): RE2 "
        "program size of 101 > max program size of 100",
        f"Envoy sidecar~node-1~users-service~15006 on node {agent} rejected listeners "
        "(version 7): malformed IP address: localhost",
    ]
    as_json = json.loads(mesh.run("describe", "users-service", "--output", "json").out)
    assert [(r["node_id"], r["type"], r["reason"]) for r in as_json["rejections"]] == [
        ("gateway~node-1", "routes", "RE2 program size of 101 > max program size of 100"),
        ("sidecar~node-1~users-service~15006", "listeners", "malformed IP address: localhost"),
    ]
    assert "not this one" not in ran.out  # another Service's sidecar
    assert mesh.run("describe", "reviews").out.splitlines()[-1] == (
        f"Envoy sidecar~node-1~reviews~15007 on node {agent} rejected clusters (version 3): "
        "not this one")

    mesh.rejections.report(agent, [], lease=timedelta(seconds=30))  # all accepted since
    assert all(line.endswith("]") for line in mesh.run("describe", "users-service").out
               .splitlines())  # fmt: skip


def test_explain_exits_0_when_allowed_and_1_when_refused_naming_the_rule(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", REVIEWS + "---\n" + ROUTE + "---\n"
                                      + ALLOW_ORDERS.replace("selector: {matchLabels: {app: "
                                                             "reviews}}\n  ", "")))
    register(mesh, "reviews", ("10.0.0.5:15006", {"version": "v1"}, "healthy"),
             ("10.0.0.6:15006", {"version": "v2"}, "healthy"))

    allowed = mesh.run("explain", "--from", "spiffe://example.org/orders", "--to", "reviews",
                       "--path", "/reviews/1")
    assert (allowed.status, allowed.err) == (0, "")
    assert ("allowed by reviews: spiffe://example.org/orders is allowed by an ALLOW rule  "
            "[AuthorizationPolicy reviews-allow-orders spec.rules[0]]") in allowed.out

    refused = mesh.run("explain", "--from", "spiffe://example.org/evil", "--to", "reviews")
    assert (refused.status, refused.err) == (1, "")
    assert "refused by reviews: no ALLOW rule matches spiffe://example.org/evil" in refused.out
    assert "[AuthorizationPolicy reviews-allow-orders]" in refused.out

    as_json = json.loads(mesh.run("explain", "--from", "spiffe://example.org/evil", "--to",
                                  "reviews", "--output", "json").out)
    assert as_json["allowed"] is False


def test_explain_exits_1_when_no_healthy_instance_serves_the_request(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", USERS))
    register(mesh, "users", ("10.0.0.5:15006", {}, "unhealthy"),
             ("10.0.0.6:15006", {}, "unhealthy"))

    ran = mesh.run("explain", "--from", "spiffe://example.org/orders", "--to", "users")
    assert (ran.status, ran.err) == (1, "")
    reason = ("503: no healthy instance of users (2 unhealthy: 10.0.0.5:15006, "
              "10.0.0.6:15006)")
    lines = ran.out.splitlines()
    assert f"{reason}  [Service users]" in lines
    assert lines[-1] == f"not served: requests get {reason}  [Service users spec.ports[0]]"

    as_json = json.loads(mesh.run("explain", "--from", "spiffe://example.org/orders", "--to",
                                  "users", "--output", "json").out)
    assert (as_json["allowed"], as_json["outcome"], as_json["status"]) == (
        False, "unavailable", 503)
    assert as_json["destinations"][0]["unavailable"] == reason


def test_explain_and_describe_refuse_what_is_not_there_or_not_an_id(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("users.yaml", USERS))

    assert mesh.refused("describe", "nosuch") == "Error: Service nosuch does not exist\n"
    assert mesh.refused("explain", "--from", "spiffe://example.org/orders", "--to",
                        "nosuch") == "Error: Service nosuch does not exist\n"
    assert mesh.refused("describe", "user") == (
        "Error: Service user does not exist; did you mean users?\n")
    assert mesh.refused("explain", "--from", "spiffe://example.org/orders", "--to",
                        "user") == "Error: Service user does not exist; did you mean users?\n"
    assert mesh.refused("explain", "--from", "orders", "--to", "users") == (
        "Error: SPIFFE ID 'orders' is not valid: does not start with 'spiffe://'; expected "
        "spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web\n")
    assert mesh.refused("explain", "--from", "spiffe://example.org/orders", "--to", "users",
                        "--header", "x-user") == (
        "Error: --header 'x-user' is not NAME=VALUE, e.g. --header x-user=alice\n")


def test_explain_a_request_entering_the_gateway_of_the_mission(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", USERS.replace("name: users}",
                                                                 "name: users-service}")
                                      + "---\n" + MISSION))
    register(mesh, "users-service", ("10.0.0.5:15006", {}, "healthy"))

    routed = mesh.run("explain", "--gateway", "istio=ingressgateway", "--path", "/api/v1/users")
    assert (routed.status, routed.err) == (0, "")
    assert "users-service port 80" in routed.out
    assert "[VirtualService microservice-virtual-service spec.http[0]" in routed.out

    other = mesh.run("explain", "--gateway", "istio=ingressgateway", "--path", "/api/v2/users")
    assert (other.status, other.err) == (1, "")
    assert "404" in other.out

    assert json.loads(mesh.run("explain", "--gateway", "istio=ingressgateway", "--path",
                               "/api/v1/users", "--output", "json").out)["allowed"] is True
    assert mesh.refused("explain", "--gateway", "istio") == (
        "Error: --gateway 'istio' is not NAME=VALUE, e.g. --gateway istio=ingressgateway\n")
    assert mesh.refused("explain", "--gateway", "istio=ingressgateway", "--to", "users") == (
        "Error: give --gateway (and --from: the gateway's SPIFFE ID) for a request entering a "
        "gateway, or --from and --to for a call between services, not both\n")
    assert mesh.refused("explain", "--to", "users") == (
        "Error: explain needs --from SPIFFE_ID and --to SERVICE, or --gateway NAME=VALUE; "
        "e.g. tessera mesh explain --from spiffe://example.org/orders --to users-service\n")


ALLOW_GATEWAY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: users-allow-gateway}
spec:
  selector: {matchLabels: {app: users}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["spiffe://example.org/gateway"]}
"""


def test_explain_a_gateways_request_judged_as_the_gateways_own_spiffe_id(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", USERS.replace("name: users}",
                                                                 "name: users-service}")
                                      + "---\n" + MISSION + "---\n" + ALLOW_GATEWAY))
    register(mesh, "users-service", ("10.0.0.5:15006", {"app": "users"}, "healthy"))
    entering = ("explain", "--gateway", "istio=ingressgateway", "--path", "/api/v1/users")

    anonymous = mesh.run(*entering)
    assert anonymous.status == 1
    assert "no ALLOW rule matches a caller without a SPIFFE ID" in anonymous.out

    as_itself = mesh.run(*entering, "--from", "spiffe://example.org/gateway")
    assert (as_itself.status, as_itself.err) == (0, ""), as_itself.out
    assert "spiffe://example.org/gateway is allowed by an ALLOW rule" in as_itself.out
    assert mesh.refused(*entering, "--from", "gateway").startswith("Error: ")


def test_explain_before_any_instance_says_what_the_labels_decide(mesh: Mesh) -> None:
    mesh.run("apply", "-f", mesh.file("mesh.yaml", REVIEWS + "---\n" + ROUTE + "---\n"
                                      + ALLOW_ORDERS))

    allowed = mesh.run("explain", "--from", "spiffe://example.org/orders", "--to", "reviews")
    # Allowed whatever the labels, and not served yet: no instance is there to serve it.
    assert (allowed.status, allowed.err) == (1, "")
    assert allowed.out.splitlines()[-6:-2] == [
        "no instance of reviews subset v2 is registered yet: AuthorizationPolicy "
        "reviews-allow-orders selects workloads by labels, so whether it applies depends on the "
        "labels its sidecars will run with  [DestinationRule reviews spec.subsets[1]]",
        "with app=reviews: allowed by reviews: spiffe://example.org/orders is allowed by an "
        "ALLOW rule  [AuthorizationPolicy reviews-allow-orders spec.rules[0]]",
        "with labels it does not select: allowed by reviews: no ALLOW policy selects this "
        "workload and no DENY rule matches spiffe://example.org/orders  [default authorization]",
        "allowed by reviews whatever labels its sidecars run with  "
        "[DestinationRule reviews spec.subsets[1]]",
    ]
    assert allowed.out.splitlines()[-2:] == [
        "not served: 90% of requests get 503: no instance of reviews subset v1 is registered  "
        "[VirtualService reviews spec.http[0].route[0]]",
        "not served: 10% of requests get 503: no instance of reviews subset v2 is registered  "
        "[VirtualService reviews spec.http[0].route[1]]",
    ]

    undecided = mesh.run("explain", "--from", "spiffe://example.org/evil", "--to", "reviews")
    assert (undecided.status, undecided.err) == (1, "")
    assert undecided.out.splitlines()[-1] == (
        "undecided: reviews allows it with some of these labels and refuses it with others; "
        "explain again once an instance of reviews is registered  "
        "[DestinationRule reviews spec.subsets[1]]")
    as_json = json.loads(mesh.run("explain", "--from", "spiffe://example.org/evil", "--to",
                                  "reviews", "--output", "json").out)
    assert (as_json["allowed"], as_json["outcome"], as_json["status"]) == (
        False, "undecided", None)


# -- services -----------------------------------------------------------------------------


def test_services_lists_each_instance_with_its_node_and_health(mesh: Mesh) -> None:
    assert mesh.run("services").out == (
        "No instances registered. Instances join the catalog when 'tessera sidecar run "
        "--service NAME' starts on a node with an agent.\n")
    mesh.run("apply", "-f", mesh.file("mesh.yaml", REVIEWS))
    node = "spiffe://example.org/tessera/agent/join_token/abc"
    mesh.store.report_mesh_instances(node, [
        ReportedInstance("reviews", HostPort("10.0.0.6", 15006), "spiffe://example.org/reviews",
                         {"version": "v2"}, "unhealthy", "HTTP 503 from 127.0.0.1:9080/healthz"),
        ReportedInstance("reviews", HostPort("10.0.0.5", 15006), "spiffe://example.org/reviews",
                         {"version": "v1"}, "healthy"),
    ], lease=timedelta(seconds=30))

    assert mesh.run("services").out.splitlines() == [
        f"SERVICE   ADDRESS          {'NODE'.ljust(len(node))}   LABELS       HEALTH      SINCE"
        "   DETAIL",
        f"reviews   10.0.0.5:15006   {node}   version=v1   healthy     90s     -",
        f"reviews   10.0.0.6:15006   {node}   version=v2   unhealthy   90s     "
        "HTTP 503 from 127.0.0.1:9080/healthz",
    ]
    as_json = json.loads(mesh.run("services", "--service", "reviews", "--output", "json").out)
    assert as_json[0] == {
        "service": "reviews", "address": "10.0.0.5:15006", "node": node,
        "labels": {"version": "v1"}, "health": "healthy", "since": START.isoformat(),
        "spiffeId": "spiffe://example.org/reviews", "detail": None}
    assert [(i["health"], i["detail"]) for i in as_json] == [
        ("healthy", None), ("unhealthy", "HTTP 503 from 127.0.0.1:9080/healthz")]
    assert json.loads(mesh.run("services", "--service", "users", "--output", "json").out) == []

    # describe routes to the healthy one only, and says why not to the other.
    described = mesh.run("describe", "reviews").out
    assert ("no requests to 10.0.0.6:15006: unhealthy (HTTP 503 from 127.0.0.1:9080/healthz)"
            "  [catalog reviews 10.0.0.6:15006]") in described
    assert "sidecar of reviews (spiffe://example.org/reviews) {version=v1}: 10.0.0.5:15006" \
        in described
