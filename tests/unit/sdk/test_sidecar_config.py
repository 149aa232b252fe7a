"""proxy.toml: a valid file, and every mistake refused with a sentence naming the key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from spiffe import SpiffeId

from sdk.errors import AuthorizationError
from sdk.sidecar.config import (
    HostPort,
    ListenerProtocol,
    load_proxy_config,
    parse_health_bind,
    parse_host_port,
)
from sdk.sidecar.errors import SidecarConfigError

POLICY = """
[[allow]]
name = "web"
ids = ["spiffe://example.org/web"]
"""

HTTP_POLICY = POLICY + """
[[allow]]
name = "web-to-api"
ids = ["spiffe://example.org/web"]
methods = ["GET"]
paths = ["/api"]
"""

VALID = """
health_bind = "127.0.0.1:9101"
spiffe_id = "spiffe://example.org/api"
socket = "unix:///run/tessera/agent.sock"

[[inbound]]
listen = "0.0.0.0:8443"
forward = "127.0.0.1:8080"
policy = "policy.toml"
protocol = "http"

[[inbound]]
name = "db"
listen = "[::]:5433"
forward = "127.0.0.1:5432"
[inbound.policy]
[[inbound.policy.allow]]
ids = ["spiffe://example.org/api"]

[[outbound]]
listen = "127.0.0.1:9000"
upstream = "api.internal:8443"
spiffe_id = "spiffe://example.org/api"

[[outbound]]
listen = "127.0.0.1:9001"
upstream = "10.0.0.7:8443"
trust_domain = "partner.org"

[[outbound]]
listen = "127.0.0.1:9002"
upstream = "db.internal:5433"
one_of = ["spiffe://example.org/db", "spiffe://example.org/db-replica"]
"""


def write(tmp_path: Path, text: str, *, policy: str | None = POLICY) -> Path:
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy)
    path = tmp_path / "proxy.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problem(tmp_path: Path, text: str, *, policy: str | None = POLICY) -> str:
    path = write(tmp_path, text, policy=policy)
    with pytest.raises(SidecarConfigError) as caught:
        load_proxy_config(path)
    prefix = f"{path}: "
    message = caught.value.message
    return message[len(prefix):] if message.startswith(prefix) else message


INBOUND = """
[[inbound]]
listen = "0.0.0.0:8443"
forward = "127.0.0.1:8080"
policy = "policy.toml"
"""


def test_a_valid_config(tmp_path: Path) -> None:
    config = load_proxy_config(write(tmp_path, VALID, policy=HTTP_POLICY))

    assert config.health_bind == HostPort("127.0.0.1", 9101)
    assert config.spiffe_id == SpiffeId("spiffe://example.org/api")
    assert config.socket == "unix:///run/tessera/agent.sock"
    web, db = config.inbound
    assert (web.name, web.listen, web.forward, web.protocol) == (
        "inbound[0]", HostPort("0.0.0.0", 8443), HostPort("127.0.0.1", 8080),
        ListenerProtocol.HTTP)
    assert web.policy.source == str(tmp_path / "policy.toml")
    assert [rule.name for rule in web.policy.allow] == ["web", "web-to-api"]
    assert (db.name, db.listen, db.protocol) == ("db", HostPort("::", 5433), ListenerProtocol.TCP)
    assert db.policy.source == "[inbound[1].policy]"
    assert str(db.listen) == "[::]:5433"
    api, partner, databases = config.outbound
    assert (api.upstream, api.expected) == (
        HostPort("api.internal", 8443), "spiffe_id spiffe://example.org/api")
    assert partner.expected == "trust_domain partner.org"
    assert databases.expected == (
        "one_of spiffe://example.org/db, spiffe://example.org/db-replica")
    api.authorizer()(SpiffeId("spiffe://example.org/api"))
    with pytest.raises(AuthorizationError):
        api.authorizer()(SpiffeId("spiffe://example.org/web"))
    partner.authorizer()(SpiffeId("spiffe://partner.org/x"))
    databases.authorizer()(SpiffeId("spiffe://example.org/db-replica"))


def test_defaults(tmp_path: Path) -> None:
    config = load_proxy_config(write(tmp_path, INBOUND))
    assert config.health_bind == HostPort("127.0.0.1", 8090)
    assert config.spiffe_id is None and config.socket is None
    assert config.inbound[0].protocol is ListenerProtocol.TCP
    assert load_proxy_config(write(tmp_path, 'health_bind = "0"\n' + INBOUND)).health_bind is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen = 'x'\n" + INBOUND,
         "unknown key 'listen' at the top level; expected one of health_bind, inbound, outbound, "
         "socket, spiffe_id"),
        ("", "nothing to do: add an [[inbound]] or an [[outbound]] table"),
        ("inbound = 'x'", "inbound must be an array of tables, written [[inbound]]"),
        (INBOUND + "foward = '127.0.0.1:1'\n",
         "unknown key 'foward' in inbound[0]; expected one of forward, listen, name, policy, "
         "protocol"),
        ("[[inbound]]\nforward = '127.0.0.1:1'\npolicy = 'policy.toml'\n",
         'inbound[0]: listen is missing; give the HOST:PORT to accept mTLS connections on, '
         'e.g. listen = "0.0.0.0:8443"'),
        ("[[inbound]]\nlisten = '8443'\nforward = '127.0.0.1:1'\npolicy = 'policy.toml'\n",
         "inbound[0].listen '8443' is not HOST:PORT, e.g. 0.0.0.0:8443"),
        ("[[inbound]]\nlisten = ':8443'\nforward = '127.0.0.1:1'\npolicy = 'policy.toml'\n",
         "inbound[0].listen ':8443' is not HOST:PORT, e.g. 0.0.0.0:8443"),
        ("[[inbound]]\nlisten = 'a:70000'\nforward = '127.0.0.1:1'\npolicy = 'policy.toml'\n",
         "inbound[0].listen 'a:70000' is not HOST:PORT, e.g. 0.0.0.0:8443"),
        ("[[inbound]]\nlisten = '0.0.0.0:1'\npolicy = 'policy.toml'\n",
         'inbound[0]: forward is missing; give the HOST:PORT of the local app, '
         'e.g. forward = "127.0.0.1:8080"'),
        ("[[inbound]]\nlisten = '0.0.0.0:1'\nforward = 8080\npolicy = 'policy.toml'\n",
         "inbound[0].forward 8080 is not HOST:PORT, e.g. 127.0.0.1:8080"),
        (INBOUND + "protocol = 'udp'\n",
         "inbound[0].protocol must be \"tcp\" or \"http\", not 'udp'"),
        ("[[inbound]]\nlisten = '0.0.0.0:1'\nforward = '127.0.0.1:2'\n",
         'inbound[0]: policy is missing; give policy = "policy.toml" (a policy file) or an '
         "inline [inbound.policy] table (an empty table allows every SPIFFE ID the trust "
         "bundles vouch for)"),
        ("[[inbound]]\nlisten = '0.0.0.0:1'\nforward = '127.0.0.1:2'\npolicy = 3\n",
         "inbound[0].policy must be a file name or a table, not an integer"),
        ("[[inbound]]\nlisten = '0.0.0.0:1'\nforward = '127.0.0.1:2'\n"
         "[inbound.policy]\nmode = 'loud'\n",
         "inbound[0].policy: [inbound[0].policy]: mode must be \"enforce\" or \"audit\", "
         "not 'loud'"),
        (INBOUND + INBOUND.replace("8080", "8081"),
         "inbound[1].listen 0.0.0.0:8443 is already used by inbound[0]"),
        (INBOUND + "name = 'x'\n" + INBOUND.replace("8443", "8444") + "name = 'x'\n",
         "the listener name 'x' is used twice; names must be unique"),
        (INBOUND + "name = ''\n", "inbound[0].name must be a non-empty string"),
        ("spiffe_id = 'web'\n" + INBOUND,
         "spiffe_id 'web' is not valid: does not start with 'spiffe://'; expected "
         "spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web"),
        ("spiffe_id = 'spiffe://example.org'\n" + INBOUND,
         "spiffe_id 'spiffe://example.org' names a trust domain, not a workload; give the SPIFFE "
         "ID of a workload, e.g. spiffe://example.org/api"),
        ("socket = ''\n" + INBOUND,
         'socket must be the Workload API socket, e.g. "unix:///run/tessera/agent.sock"'),
        ("health_bind = 'nowhere'\n" + INBOUND,
         "health_bind 'nowhere' is not HOST:PORT, e.g. 127.0.0.1:8090; use 0 to turn the health "
         "endpoints off"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    assert problem(tmp_path, text) == message


OUTBOUND = """
[[outbound]]
listen = "127.0.0.1:9000"
upstream = "api.internal:8443"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("", "outbound[0]: say which upstream SPIFFE IDs to accept: give one of spiffe_id, "
         "trust_domain, one_of"),
        ("spiffe_id = 'spiffe://example.org/a'\ntrust_domain = 'example.org'\n",
         "outbound[0]: give only one of spiffe_id, trust_domain, one_of, not spiffe_id and "
         "trust_domain"),
        ("spiffe_id = 'spiffe://EXAMPLE.org/a'\n",
         "outbound[0].spiffe_id 'spiffe://EXAMPLE.org/a' is not valid: trust domain must be lower "
         "case; expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web"),
        ("trust_domain = 'Bad!'\n",
         "outbound[0].trust_domain: trust domain 'Bad!' is not valid: contains disallowed "
         "characters; use lower-case letters, digits, '.', '-' and '_', e.g. example.org"),
        ("one_of = []\n", "outbound[0].one_of must be a non-empty array of SPIFFE IDs"),
        ("one_of = [1]\n",
         'outbound[0].one_of entry must be a SPIFFE ID string, e.g. "spiffe://example.org/api"'),
        ("spiffe_id = 'spiffe://example.org/a'\nserver_name = 'x'\n",
         "unknown key 'server_name' in outbound[0]; expected one of listen, name, one_of, "
         "spiffe_id, trust_domain, upstream"),
    ],
)
def test_outbound_mistakes_are_named(tmp_path: Path, extra: str, message: str) -> None:
    assert problem(tmp_path, OUTBOUND + extra) == message


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    assert problem(tmp_path, INBOUND, policy=None) == (
        f"inbound[0].policy: {path}: cannot read the policy file: No such file or directory"
    )


def test_a_policy_mistake_is_named_with_its_listener(tmp_path: Path) -> None:
    policy = "[[allow]]\nids = ['spiffe://example.org/web']\nmethods = ['get']\n"
    assert problem(tmp_path, INBOUND + "protocol = 'http'\n", policy=policy) == (
        f"inbound[0].policy: {tmp_path / 'policy.toml'}: allow[0]: 'get' in methods is not an "
        "HTTP method; use one of CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE "
        "(upper case)"
    )


def test_method_and_path_rules_need_the_http_protocol(tmp_path: Path) -> None:
    assert problem(tmp_path, INBOUND, policy=HTTP_POLICY) == (
        "inbound[0]: policy rule 'web-to-api' names methods or paths, which only HTTP requests "
        'have; set protocol = "http" on this listener, or drop them from the rule'
    )


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SidecarConfigError) as caught:
        load_proxy_config(missing)
    assert caught.value.message == (
        f"cannot read the proxy config {missing}: No such file or directory"
    )
    broken = tmp_path / "broken.toml"
    broken.write_text("[[inbound]\n")
    with pytest.raises(SidecarConfigError) as caught:
        load_proxy_config(broken)
    assert caught.value.message.startswith(f"{broken}: not valid TOML: ")


def test_addresses() -> None:
    assert parse_host_port("[::1]:80", what="x", example="e") == HostPort("::1", 80)
    assert parse_host_port(" localhost:1 ", what="x", example="e") == HostPort("localhost", 1)
    assert HostPort("::1", 80).is_ip and not HostPort("localhost", 1).is_ip
    with pytest.raises(SidecarConfigError, match=r"^x '::1:80' is not HOST:PORT, e.g. e$"):
        parse_host_port("::1:80", what="x", example="e")
    assert parse_health_bind("0") is None
    assert parse_health_bind(" ") is None
    assert parse_health_bind("127.0.0.1:1") == HostPort("127.0.0.1", 1)
