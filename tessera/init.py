"""``tessera init``: starter configuration files for a new trust domain.

    files = write_trust_domain_files("example.org", Path("conf"))

The files lay the trust domain out under ``conf/data/``::

    server/    the server's data dir (0700): datastore, keys, admin.sock
    agent/     the agent's data dir (0700): its SVID and pinned bundle
    public/    the Workload API socket, agent.sock (0755, as the agent makes it)
    bundle.pem the trust bundle the agent starts with

The socket sits apart from the agent's private data dir so that workloads of
every user can connect to it (as SPIRE's ``/tmp/spire-agent/public/api.sock``);
what each one gets depends only on its attested selectors. Each file is written
whole (a temporary file renamed into place) and never over an existing one.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sdk.errors import AlreadyExists, ConfigError
from sdk.privatefiles import os_error_sentence, write_file_atomically
from sdk.spiffeid import parse_trust_domain

SERVER_TOML = """\
# Tessera server for {td}. Every key is a `tessera server run` flag
# (with _ for -); flags and TESSERA_* environment variables override it.
trust_domain = "{td}"
data_dir = "{data_dir}/server"
bind = "127.0.0.1:8081"
# db = "postgresql+psycopg://tessera@db.internal/tessera"   # several servers: PostgreSQL
ca_ttl = "24h"
default_x509_svid_ttl = "1h"
default_jwt_svid_ttl = "5m"
ca_key_type = "ec-p256"

[key_manager.disk]
# kek_file = "/etc/tessera/kek"   # key-encryption key for the CA keys at rest
"""

AGENT_TOML = """\
# Tessera agent for {td}. Every key is a `tessera agent run` flag.
trust_domain = "{td}"
server = ["127.0.0.1:8081"]
data_dir = "{data_dir}/agent"
# Outside the 0700 data_dir, so workloads of every user can reach it.
socket = "{data_dir}/public/agent.sock"
trust_bundle = "{data_dir}/bundle.pem"

[workload_attestors.unix]
hash_binary = true
"""

README = """\
# Trust domain {td}

1. Start the server:

       tessera server run --config server.toml

2. Save the trust bundle the agents will trust, and make a join token:

       tessera server bundle show --data-dir {data_dir}/server > {data_dir}/bundle.pem
       tessera server token generate --data-dir {data_dir}/server \\
           --spiffe-id spiffe://{td}/node/$(hostname)

3. Start an agent with that token:

       tessera agent run --config agent.toml --join-token <token>

4. Register a workload:

       tessera server entry create --data-dir {data_dir}/server \\
           --parent-id spiffe://{td}/node/$(hostname) \\
           --spiffe-id spiffe://{td}/web --selector unix:uid:$(id -u)

5. As that user, fetch its SVID from the agent's socket, {data_dir}/public/agent.sock:

       tessera agent api fetch x509 --config agent.toml
"""


def write_trust_domain_files(trust_domain: str, directory: Path) -> list[Path]:
    td = parse_trust_domain(trust_domain).name
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        doing = f"create the directory {directory}"
        raise ConfigError(os_error_sentence(err, doing, flag="--dir")) from err
    data_dir = str(directory.resolve() / "data")
    files = {
        directory / "server.toml": SERVER_TOML,
        directory / "agent.toml": AGENT_TOML,
        directory / "README.md": README,
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise AlreadyExists(
            f"{', '.join(existing)} already exist; choose an empty --dir or remove them"
        )
    for path, template in files.items():
        content = template.format(td=td, data_dir=data_dir).encode()
        try:
            write_file_atomically(path, content, mode=0o644, replace=False)
        except FileExistsError:
            raise AlreadyExists(
                f"{path} already exists; choose an empty --dir or remove it"
            ) from None
        except OSError as err:
            raise ConfigError(os_error_sentence(err, f"write {path}", flag="--dir")) from err
    # Made here with a mode that does not depend on the umask: every user passes through
    # data/ to the socket; server/ and agent/ below it are made 0700 by their processes.
    for shared in (directory / "data", directory / "data" / "public"):
        shared.mkdir(exist_ok=True)
        os.chmod(shared, 0o755)  # noqa: S103  (traversable by all: the socket is for all)
    return list(files)


def agent_socket(directory: Path) -> Path:
    """Where the agent.toml written into ``directory`` puts the Workload API socket."""
    return directory.resolve() / "data" / "public" / "agent.sock"


def closed_to_others(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that other users cannot pass, if any."""
    for directory in reversed(path.parents):
        try:
            mode = directory.stat().st_mode
        except OSError:
            return directory
        if not mode & stat.S_IXOTH:
            return directory
    return None
