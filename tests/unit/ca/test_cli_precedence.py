"""Where a flag's value comes from: command line > TESSERA_* environment > --config file.

``server healthcheck`` against an admin socket that does not exist fails with a
sentence naming the socket it tried, which shows which source won.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sdk.errors import TesseraError
from tessera.cli import cli, main


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TESSERA_"):
            monkeypatch.delenv(name)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def no_socket_message(path: Path | str) -> str:
    return (
        f"no admin socket at {path} (not found): is the server running? "
        "'tessera server run' listens on <data-dir>/admin.sock; pass --data-dir DIR or "
        "--admin-socket PATH"
    )


def refused_socket(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, TesseraError), result.exception
    return result.exception.message


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(
        f'admin_socket = "{tmp_path / "from-file.sock"}"\n'
        'trust_domain = "example.org"\n'
        "\n"
        "[key_manager.memory]\n"
    )
    return path


def test_the_admin_socket_comes_from_the_config_file(config_file, tmp_path):
    result = invoke("server", "healthcheck", "--config", str(config_file))

    assert refused_socket(result) == no_socket_message(tmp_path / "from-file.sock")


def test_the_environment_overrides_the_config_file(config_file, tmp_path):
    result = invoke(
        "server", "healthcheck", "--config", str(config_file),
        env={"TESSERA_ADMIN_SOCKET": str(tmp_path / "from-env.sock")},
    )

    assert refused_socket(result) == no_socket_message(tmp_path / "from-env.sock")


def test_the_flag_overrides_the_environment_and_the_config_file(config_file, tmp_path):
    result = invoke(
        "server", "healthcheck", "--config", str(config_file),
        "--admin-socket", str(tmp_path / "from-flag.sock"),
        env={"TESSERA_ADMIN_SOCKET": str(tmp_path / "from-env.sock")},
    )

    assert refused_socket(result) == no_socket_message(tmp_path / "from-flag.sock")


def test_the_config_file_may_itself_come_from_the_environment(config_file, tmp_path):
    result = invoke("server", "healthcheck", env={"TESSERA_CONFIG": str(config_file)})

    assert refused_socket(result) == no_socket_message(tmp_path / "from-file.sock")


def test_without_a_socket_setting_it_is_in_the_data_dir(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(f'data_dir = "{tmp_path / "file-data"}"\n')

    from_file = invoke("server", "healthcheck", "--config", str(config))
    from_env = invoke(
        "server", "healthcheck", "--config", str(config),
        env={"TESSERA_DATA_DIR": str(tmp_path / "env-data")},
    )
    from_flag = invoke(
        "server", "healthcheck", "--config", str(config), "--data-dir", str(tmp_path / "flag-data")
    )

    assert refused_socket(from_file) == no_socket_message(tmp_path / "file-data" / "admin.sock")
    assert refused_socket(from_env) == no_socket_message(tmp_path / "env-data" / "admin.sock")
    assert refused_socket(from_flag) == no_socket_message(tmp_path / "flag-data" / "admin.sock")


def test_the_user_sees_one_sentence_on_stderr_and_status_1(
    tmp_path, monkeypatch, capsys
):
    socket = tmp_path / "absent.sock"
    monkeypatch.setattr(
        sys, "argv", ["tessera", "server", "healthcheck", "--admin-socket", str(socket)]
    )

    with pytest.raises(SystemExit) as exited:
        main()

    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"Error: {no_socket_message(socket)}\n"


def test_a_config_file_that_is_missing_is_a_usage_error(tmp_path):
    missing = tmp_path / "missing.toml"

    result = invoke("server", "healthcheck", "--config", str(missing))

    assert result.exit_code == 2
    assert f"cannot read config file {missing}: No such file or directory" in result.output


# -- tessera init -----------------------------------------------------------------------


def test_init_writes_the_three_files_and_refuses_to_overwrite(tmp_path):
    directory = tmp_path / "td"

    result = invoke("init", "--trust-domain", "example.org", "--dir", str(directory))

    assert result.exit_code == 0, result.output
    files = [directory / "server.toml", directory / "agent.toml", directory / "README.md"]
    assert result.stdout == "".join(f"Wrote {f}\n" for f in files)
    assert all(f.is_file() for f in files)
    assert 'trust_domain = "example.org"' in files[0].read_text()
    before = [f.read_text() for f in files]

    again = invoke("init", "--trust-domain", "example.org", "--dir", str(directory))

    assert again.exit_code == 1
    assert isinstance(again.exception, TesseraError)
    assert again.exception.message == (
        f"{files[0]}, {files[1]}, {files[2]} already exist; "
        "choose an empty --dir or remove them"
    )
    assert [f.read_text() for f in files] == before


def test_init_refuses_when_only_one_file_exists(tmp_path):
    (tmp_path / "agent.toml").write_text("# mine\n")

    result = invoke("init", "--trust-domain", "example.org", "--dir", str(tmp_path))

    assert isinstance(result.exception, TesseraError)
    assert result.exception.message == (
        f"{tmp_path / 'agent.toml'} already exist; choose an empty --dir or remove them"
    )
    assert not (tmp_path / "server.toml").exists()
    assert (tmp_path / "agent.toml").read_text() == "# mine\n"


def test_init_server_toml_is_a_valid_server_config(tmp_path):
    from ca.config import server_config
    from sdk.commandline import load_config_file

    invoke("init", "--trust-domain", "example.org", "--dir", str(tmp_path))

    config = server_config(load_config_file(tmp_path / "server.toml"))
    assert config.trust_domain.name == "example.org"


def test_init_json_output_is_one_json_document(tmp_path):
    result = invoke(
        "init", "--trust-domain", "example.org", "--dir", str(tmp_path), "--output", "json"
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "files": [str(tmp_path / name) for name in ("server.toml", "agent.toml", "README.md")]
    }


def test_a_config_key_is_the_flag_name_even_where_the_parameter_is_named_otherwise(tmp_path):
    config = tmp_path / "init.toml"
    config.write_text(f'trust_domain = "example.org"\ndir = "{tmp_path / "td"}"\n')

    result = invoke("init", "--config", str(config))

    assert result.exit_code == 0, result.output
    assert (tmp_path / "td" / "server.toml").is_file()


# -- the agent's client commands read the agent's own config file -----------------------


@pytest.mark.parametrize("command", [
    ("agent", "healthcheck"),
    ("agent", "api", "fetch", "x509"),
    ("agent", "api", "fetch", "jwt", "--audience", "db"),
    ("agent", "api", "validate", "jwt", "--audience", "db", "--svid", "x.y.z"),
    ("agent", "api", "watch"),
])  # fmt: skip
def test_agent_client_commands_find_the_socket_in_agent_toml(command, tmp_path):
    socket = tmp_path / "agent" / "agent.sock"
    config = tmp_path / "agent.toml"
    config.write_text(f'trust_domain = "example.org"\nserver = ["127.0.0.1:8081"]\n'
                      f'socket = "{socket}"\n')  # fmt: skip

    result = invoke(*command, "--config", str(config))

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, TesseraError), result.exception
    assert f"no Tessera agent is listening on {socket}; start one" in result.exception.message
