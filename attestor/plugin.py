"""Plugins: one shape for every plugin type Tessera loads by name.

Each plugin type (node attestors, workload attestors, key managers, upstream
authorities) has a ``typing.Protocol``, one module per implementation and one
:class:`Registry` that maps the names of the config file to those modules. An
implementation module exports ``PLUGIN``: its name, the pydantic model of its
settings and a function building it from parsed settings and a context the
caller lends (the ``/proc`` root, the server's datastore, ...)::

    # attestor/workload/systemd.py
    class SystemdSettings(Settings):
        include_scopes: bool = False

    PLUGIN = Plugin("systemd", SystemdSettings, lambda settings, proc_root: ...)

    # attestor/workload/__init__.py
    WORKLOAD_ATTESTORS = Registry(
        "workload attestor", "workload_attestors", {"systemd": "attestor.workload.systemd"}
    )
    attestor = WORKLOAD_ATTESTORS.load(PluginConfig("systemd", {"include_scopes": True}), proc)

Modules are imported when a plugin of theirs is loaded, so a server without a
Vault plugin never imports hvac. Settings are parsed by :func:`parse_settings`:
models are frozen, forbid unknown keys and take TOML values as they are (a
string is not a number, ``1`` is not ``true``); every error is reported at once
with its field path, e.g. ``[workload_attestors.unix] hash_binary: must be true
or false, got 'yes'``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from sdk.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["Plugin", "PluginConfig", "Registry", "parse_settings"]

S = TypeVar("S", bound="BaseModel")
C = TypeVar("C")
P = TypeVar("P")


@dataclass(frozen=True)
class PluginConfig:
    """One ``[<section>.<name>]`` table of a config file: a plugin's name and raw settings."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plugin(Generic[S, C, P]):
    """An implementation of a plugin type, as its module exports it in ``PLUGIN``."""

    name: str
    settings: type[S]
    """Its settings: a frozen pydantic model that forbids unknown keys (see ``Settings``)."""
    build: Callable[[S, C], P]
    """Makes the plugin from its parsed settings and the caller's context."""


class Registry(Generic[C, P]):
    """The built-in implementations of one plugin type, by the name the config file uses.

    ``modules`` maps each name to the module exporting its ``PLUGIN`` (or the
    attribute named by ``attribute``: a node attestor's module holds both halves,
    as ``SERVER_PLUGIN`` and ``AGENT_PLUGIN``); a module is imported only when its
    plugin is loaded.
    """

    def __init__(
        self,
        kind: str,
        section: str,
        modules: Mapping[str, str],
        *,
        plural: str | None = None,
        attribute: str = "PLUGIN",
    ) -> None:
        self.kind = kind
        """What one plugin of the type is called in sentences, e.g. ``key manager``."""
        self.plural = plural or f"{kind}s"
        self.section = section
        """The config file's table for the type, e.g. ``key_manager``."""
        self._modules = dict(modules)
        self._attribute = attribute

    def names(self) -> tuple[str, ...]:
        """The names a config file may use, sorted."""
        return tuple(sorted(self._modules))

    def plugin(self, name: str) -> Plugin[Any, C, P]:
        """The implementation called ``name``; ConfigError naming the known ones if none."""
        module_name = self._modules.get(name)
        if module_name is None:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}"
            )
        module = importlib.import_module(module_name)
        plugin = cast("Plugin[Any, C, P]", getattr(module, self._attribute))
        if plugin.name != name:  # a wrong table entry, not a user's mistake
            raise AssertionError(f"{module_name} exports the {self.kind} {plugin.name!r}")
        return plugin

    def load(self, config: PluginConfig, context: C) -> P:
        """Parse ``config``'s settings with the plugin's model and build the plugin."""
        plugin = self.plugin(config.name)
        where = f"[{self.section}.{config.name}]"
        return plugin.build(parse_settings(plugin.settings, config.settings, where), context)


def parse_settings(model: type[S], raw: Mapping[str, Any], where: str) -> S:
    """``raw`` validated by ``model``; one ConfigError listing every error with its path.

    ``where`` names the table in messages, e.g. ``[workload_attestors.unix]``.
    """
    from pydantic import ValidationError

    try:
        return model.model_validate(dict(raw))
    except ValidationError as err:
        errors = err.errors()
    problems = [_describe(error, model) for error in errors]
    if any(error["type"] == "extra_forbidden" for error in errors):
        known = sorted(model.model_fields)
        problems.append(f"known settings: {', '.join(known)}" if known else "it takes no settings")
    raise ConfigError(f"{where} {'; '.join(problems)}")


def _describe(error: Any, model: type[BaseModel]) -> str:
    """One pydantic error as ``<field path>: <what is wrong>``, in Tessera's words."""
    path = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    field_info = model.model_fields.get(str(error["loc"][0])) if error["loc"] else None
    secret = field_info is not None and not field_info.repr
    got = "" if secret else f", got {error.get('input')!r}"  # a secret is never shown
    context = error.get("ctx") or {}
    if kind == "value_error" and not path:  # a model validator's sentence
        return str(context["error"])
    if kind == "value_error":
        what = str(context["error"])
    elif kind == "extra_forbidden":
        what = "unknown setting"
    elif kind == "missing":
        described = field_info.description if field_info is not None else None
        what = f"is required ({described})" if described else "is required"
    elif kind == "bool_type":
        what = f"must be true or false{got}"
    elif kind in ("int_type", "int_from_float"):
        what = f"must be a whole number{got}"
    elif kind == "string_type":
        what = f"must be a string{got}"
    elif kind == "path_type":
        what = f"must be a file path (a string){got}"
    elif kind == "greater_than_equal":
        what = f"must be at least {context['ge']}{got}"
    elif kind == "string_too_short":
        what = "must not be empty"
    else:
        what = f"{error['msg'][0].lower()}{error['msg'][1:]}{got}"
    return f"{path}: {what}"
