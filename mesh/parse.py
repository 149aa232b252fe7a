"""Text to resources: the first step of ``tessera mesh apply``.

::

    resources = parse_documents(Path("mesh.yaml").read_text(), source="mesh.yaml")

Every document is checked and every error of every document reported at once (a YAML
syntax error stops the reading there: what follows cannot be trusted). The same kind
and name twice in one input is refused: one of the two would be lost. Whether the
resources refer to things that exist is the next step, over the whole configuration
(:func:`mesh.references.check_references`, done by :meth:`mesh.config.Config.apply`).
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh.errors import ConfigError, FieldError
from mesh.resources import Resource, ResourceKey
from mesh.validation import parse_resource
from mesh.yamlload import load_documents

__all__ = [
    "duplicate_errors",
    "parse_documents",
]


def parse_documents(text: str | bytes, *, source: str = "<stdin>") -> list[Resource]:
    """The resources of a multi-document YAML ``text``; raise ConfigError with all errors."""
    resources: list[tuple[int, Resource]] = []
    errors: list[FieldError] = []
    for document in load_documents(text, source=source):
        try:
            resource = parse_resource(document.content, source=source, index=document.index)
        except ConfigError as err:
            errors.extend(err.errors)
        else:
            resources.append((document.index, resource))
    errors.extend(duplicate_errors(resources, source=source))
    if errors:
        raise ConfigError(errors)
    return [resource for _, resource in resources]


def duplicate_errors(
    resources: Iterable[tuple[int, Resource]], *, source: str = "<stdin>"
) -> list[FieldError]:
    """An error for each resource whose kind and name came earlier in the same input.

    ``resources`` are (document number, resource) pairs.
    """
    first: dict[ResourceKey, int] = {}
    errors: list[FieldError] = []
    for index, resource in resources:
        earlier = first.setdefault(resource.key, index)
        if earlier != index:
            errors.append(
                FieldError(
                    resource.KIND,
                    resource.name,
                    "",
                    f"is defined twice in {source} (documents {earlier} and {index})",
                    source=source,
                    document=index,
                )
            )
    return errors
