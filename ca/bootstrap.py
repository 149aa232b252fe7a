"""``tessera init``: starter configuration files for a new trust domain, each written
whole (a temporary file renamed into place) and never over an existing one."""

from __future__ import annotations

from pathlib import Path

from ca.errors import AlreadyExists, ConfigError
from ca.privatefiles import os_error_sentence, write_file_atomically
from ca.spiffeid import parse_trust_domain

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
socket = "{data_dir}/agent/agent.sock"
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
    return list(files)
