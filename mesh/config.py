"""A whole mesh configuration: an immutable set of resources, by kind and name.

What the server stores and the compiler reads. Changing it makes a new one, checked
whole; nothing is changed when anything is wrong::

    config = Config()
    config, changes = config.apply(parse_documents(text, source="mesh.yaml"))
    for change in changes:
        print(change)                       # VirtualService reviews created
    config.get(VirtualService, "reviews")   # the typed resource
    config.to_documents()                   # what `tessera mesh get --output yaml` prints

An apply reports each resource as ``created`` (new), ``configured`` (its document
differs from the stored one) or ``unchanged`` (the same document:
:meth:`~mesh.resources.Resource.to_document` is equal). It is refused if the input has a
kind and name twice, or if the configuration it would leave refers to something that
does not exist (:func:`mesh.references.check_references`), and likewise a delete of
something still referred to. A problem already in the stored configuration (a check
added by a newer Tessera) does not block an apply that does not add to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from mesh.errors import ConfigError, FieldError
from mesh.references import check_references
from mesh.resources import Resource, ResourceKey, sort_key

__all__ = [
    "Change",
    "Config",
]

R = TypeVar("R", bound=Resource)


@dataclass(frozen=True)
class Change:
    """What an apply did to one resource."""

    kind: str
    name: str
    action: Literal["created", "configured", "unchanged"]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} {self.action}"


class Config:
    """An immutable set of resources, at most one per kind and name."""

    __slots__ = ("_resources",)

    def __init__(self, resources: Iterable[Resource] = ()) -> None:
        """Hold ``resources`` as they are (a stored configuration): only a kind and name
        twice is refused here; :meth:`check` and :meth:`apply` check the references."""
        by_key: dict[ResourceKey, Resource] = {}
        errors: list[FieldError] = []
        for resource in sorted(resources, key=sort_key):
            if resource.key in by_key:
                errors.append(FieldError(resource.KIND, resource.name, "", "is defined twice"))
            by_key[resource.key] = resource
        if errors:
            raise ConfigError(errors)
        self._resources: Mapping[ResourceKey, Resource] = by_key

    def __iter__(self) -> Iterator[Resource]:
        """Every resource, by kind (in :data:`mesh.resources.KINDS`' order), then name."""
        return iter(self._resources.values())

    def __len__(self) -> int:
        return len(self._resources)

    def __contains__(self, key: object) -> bool:
        return key in self._resources

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self.to_documents() == other.to_documents()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Config({len(self)} resources)"

    def get(self, kind: type[R], name: str) -> R | None:
        resource = self._resources.get(ResourceKey(kind.KIND, name))
        return resource if isinstance(resource, kind) else None

    def of_kind(self, kind: type[R]) -> tuple[R, ...]:
        """The resources of one kind, by name."""
        return tuple(resource for resource in self if isinstance(resource, kind))

    def check(self) -> list[FieldError]:
        """Every reference to something missing (empty for a configuration made by apply)."""
        return check_references(self)

    def apply(self, resources: Iterable[Resource]) -> tuple[Config, list[Change]]:
        """The configuration with ``resources`` created or replaced, and what changed.

        Raise ConfigError, and change nothing, if the input names a resource twice or the
        result refers to something that does not exist.
        """
        incoming = list(resources)
        seen: set[ResourceKey] = set()
        duplicates = []
        for resource in incoming:
            if resource.key in seen:
                duplicates.append(
                    FieldError(resource.KIND, resource.name, "", "is defined twice in this apply")
                )
            seen.add(resource.key)
        if duplicates:
            raise ConfigError(duplicates)

        merged = dict(self._resources)
        changes: list[Change] = []
        for resource in incoming:
            stored = self._resources.get(resource.key)
            if stored is None:
                action: Literal["created", "configured", "unchanged"] = "created"
            elif stored.to_document() == resource.to_document():
                action = "unchanged"
            else:
                action = "configured"
            merged[resource.key] = resource
            changes.append(Change(resource.KIND, resource.name, action))
        result = Config(merged.values())
        self._refuse_new_problems(result)
        return result, changes

    def delete(self, kind: type[Resource], name: str) -> Config:
        """The configuration without one resource; raise ConfigError if it is absent or
        something still refers to it."""
        key = ResourceKey(kind.KIND, name)
        if key not in self._resources:
            raise ConfigError([FieldError(kind.KIND, name, "", "does not exist")])
        result = Config(resource for resource in self if resource.key != key)
        self._refuse_new_problems(result)
        return result

    def to_documents(self) -> list[dict[str, Any]]:
        """Every resource as its Istio-shaped document, in :meth:`__iter__`'s order."""
        return [resource.to_document() for resource in self]

    def _refuse_new_problems(self, result: Config) -> None:
        before = set(self.check())
        problems = [error for error in result.check() if error not in before]
        if problems:
            raise ConfigError(problems)
