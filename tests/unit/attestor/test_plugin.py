"""One mechanism for every plugin's settings, and one registry shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Self

import pytest
from pydantic import Field, ValidationError, model_validator

from attestor.plugin import Plugin, PluginConfig, Registry, parse_settings
from attestor.settings import FilePath, NoSettings, Settings
from sdk.errors import ConfigError

WHERE = "[key_manager.example]"


class ExampleSettings(Settings):
    path: FilePath
    enabled: bool = True
    size: int = Field(default=8, ge=1)
    label: str = "a"

    @model_validator(mode="after")
    def _label_needs_enabled(self) -> Self:
        if self.label != "a" and not self.enabled:
            raise ValueError("label needs enabled = true")
        return self


def refused(raw: dict[str, object], model: type[Settings] = ExampleSettings) -> str:
    with pytest.raises(ConfigError) as excinfo:
        parse_settings(model, raw, WHERE)
    return excinfo.value.message


def test_settings_are_parsed_with_their_defaults() -> None:
    settings = parse_settings(ExampleSettings, {"path": "/etc/key"}, WHERE)

    assert settings == ExampleSettings(path=Path("/etc/key"), enabled=True, size=8, label="a")


def test_settings_are_frozen() -> None:
    settings = parse_settings(ExampleSettings, {"path": "/etc/key"}, WHERE)

    with pytest.raises(ValidationError):
        settings.size = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"path": "/k", "enabled": "true"}, f"{WHERE} enabled: must be true or false, got 'true'"),
        ({"path": "/k", "enabled": 1}, f"{WHERE} enabled: must be true or false, got 1"),
        ({"path": "/k", "size": "8"}, f"{WHERE} size: must be a whole number, got '8'"),
        ({"path": "/k", "size": True}, f"{WHERE} size: must be a whole number, got True"),
        ({"path": "/k", "size": 2.0}, f"{WHERE} size: must be a whole number, got 2.0"),
        ({"path": "/k", "label": 7}, f"{WHERE} label: must be a string, got 7"),
        ({"path": 7}, f"{WHERE} path: must be a file path (a string), got 7"),
        ({"path": ""}, f"{WHERE} path: must be a file path, not an empty string"),
        ({}, f"{WHERE} path: is required"),
    ],
)
def test_toml_values_are_not_coerced(raw: dict[str, object], message: str) -> None:
    assert refused(raw) == message


def test_every_error_is_listed_with_its_field_path() -> None:
    message = refused({"enabled": "no", "size": 0, "colour": "blue", "shape": 1})

    assert message == (
        f"{WHERE} path: is required; enabled: must be true or false, got 'no'; "
        "size: must be at least 1, got 0; colour: unknown setting; shape: unknown setting; "
        "known settings: enabled, label, path, size"
    )


def test_a_rule_across_settings_is_a_sentence_of_its_own() -> None:
    assert refused({"path": "/k", "enabled": False, "label": "b"}) == (
        f"{WHERE} label needs enabled = true"
    )


def test_a_plugin_without_settings_says_so() -> None:
    assert refused({"socket": "/x"}, NoSettings) == (
        f"{WHERE} socket: unknown setting; it takes no settings"
    )


def _build(settings: NoSettings, context: str) -> str:
    return f"built with {context}"


PLUGIN = Plugin("example", NoSettings, _build)

REGISTRY: Registry[str, str] = Registry(
    "example plugin", "examples", {"example": __name__, "other": __name__}
)


def test_the_registry_loads_a_plugin_from_its_module() -> None:
    assert REGISTRY.load(PluginConfig("example"), "a context") == "built with a context"
    assert REGISTRY.names() == ("example", "other")


def test_the_registry_refuses_an_unknown_name() -> None:
    with pytest.raises(ConfigError) as excinfo:
        REGISTRY.load(PluginConfig("nope"), "a context")

    assert excinfo.value.message == (
        "unknown example plugin 'nope'; known example plugins: example, other"
    )


def test_the_registry_names_the_table_in_settings_errors() -> None:
    with pytest.raises(ConfigError) as excinfo:
        REGISTRY.load(PluginConfig("example", {"x": 1}), "a context")

    assert excinfo.value.message == "[examples.example] x: unknown setting; it takes no settings"


def test_a_registry_imports_a_plugin_module_only_when_it_loads_it() -> None:
    code = (
        "import sys\n"
        "from attestor.workload import WORKLOAD_ATTESTORS, DEFAULT_PROC_ROOT\n"
        "from attestor.plugin import PluginConfig\n"
        "assert 'pydantic' not in sys.modules, 'pydantic'\n"
        "WORKLOAD_ATTESTORS.load(PluginConfig('docker'), DEFAULT_PROC_ROOT)\n"
        "print(sorted(m for m in sys.modules if m.startswith('attestor.workload.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "['attestor.workload.cgroup', 'attestor.workload.docker']"
