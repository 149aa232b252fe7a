"""One document to one typed resource, or every error in it.

The boundary between pydantic and Tessera: a ``ValidationError`` is translated here,
and only here, into :class:`~mesh.errors.FieldError`s whose path reads as the YAML does
(``spec.http[0].route[1].weight``, ``metadata.labels[app]``) and whose message says
what to write instead::

    resource = parse_resource({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", ...})

The document's ``kind`` picks the model (:data:`mesh.resources.KINDS`); its
``apiVersion`` must be one the kind is accepted with. Every problem of the document is
reported at once, except that an unknown kind stops there (there is no model to check
the rest against).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from mesh.errors import ConfigError, FieldError, describe
from mesh.names import MAX_SUBDOMAIN_LENGTH
from mesh.resources import KINDS, Resource

__all__ = [
    "field_path",
    "parse_resource",
]

_KIND_NAMES = ", ".join(KINDS)


def parse_resource(document: object, *, source: str = "<stdin>", index: int = 0) -> Resource:
    """The resource ``document`` describes; raise ConfigError with every problem in it.

    ``source`` and ``index`` (the document's number in its input, from 1) only say where
    a document without a usable kind or name came from.
    """

    def error(kind: str, name: str, path: str, message: str) -> FieldError:
        return FieldError(kind, name, path, message, source=source, document=index)

    if not isinstance(document, Mapping):
        raise ConfigError(
            [
                error(
                    "",
                    "",
                    "",
                    f"is {describe(document)}, not a mapping: each document is one resource "
                    "with apiVersion, kind, metadata and spec",
                )
            ]
        )
    name = _name_of(document)
    kind_value = document.get("kind")
    model = KINDS.get(kind_value) if isinstance(kind_value, str) else None
    if model is None:
        raise ConfigError([error("", name, "kind", _kind_problem(kind_value))])

    errors: list[FieldError] = []
    api_version = document.get("apiVersion")
    if api_version not in model.api_versions():
        problem = _api_version_problem(model, api_version)
        errors.append(error(model.KIND, name, "apiVersion", problem))
    try:
        resource = model.model_validate(dict(document))
    except ValidationError as err:
        errors.extend(
            error(
                model.KIND,
                name,
                field_path(model, detail["loc"]),
                _message(detail) + _field_hint(model, detail),
            )
            for detail in err.errors()
            if detail["loc"][:1] not in (("apiVersion",), ("kind",))
        )
    if errors:
        raise ConfigError(errors)
    return resource


def field_path(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """``("spec", "http", 0, "corsPolicy")`` → ``spec.http[0].corsPolicy``.

    Walks the model's types along ``loc`` to tell a field (``.name``) from a list index
    or a mapping key (``[0]``, ``[x-user]``).
    """
    return _walk(model, loc)[0]


def _walk(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[str, Any]:
    """The path of ``loc`` in ``model``, and the type found at its end (None if unknown)."""
    path = ""
    annotation: Any = model
    for item in loc:
        if item == "[key]":  # pydantic's marker: the error is about the key itself
            continue
        annotation = _unwrap(annotation)
        origin = get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next(
                (
                    info
                    for field_name, info in annotation.model_fields.items()
                    if (info.alias or field_name) == item
                ),
                None,
            )
            path += f".{item}"
            annotation = field.annotation if field is not None else None
        elif origin in (tuple, list):
            path += f"[{item}]"
            annotation = get_args(annotation)[0]
        elif origin is dict:
            path += f"[{item}]"
            annotation = get_args(annotation)[1]
        else:
            path += f"[{item}]" if isinstance(item, int) else f".{item}"
            annotation = None
    return path.removeprefix("."), annotation


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _message(detail: ErrorDetails) -> str:
    kind = detail["type"]
    context = detail.get("ctx") or {}
    value = detail.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not supported"
    if kind == "value_error":
        return str(context.get("error", detail["msg"]))
    if kind == "literal_error":
        expected = str(context.get("expected", "")).replace("'", "")
        return f"must be {expected}, not {_shown(value)}"
    if kind == "too_short":
        minimum = context.get("min_length", 1)
        return "must not be empty" if minimum == 1 else f"must have at least {minimum} items"
    if kind == "too_long":
        return f"must have at most {context.get('max_length')} items"
    wanted = _EXPECTED.get(kind)
    if wanted is not None:
        return f"must be {wanted}, not {describe(value)}"
    return f"is not valid: {detail['msg']}"


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "float_type": "a number",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _shown(value: object) -> str:
    """A value where one of a few words belongs: itself if a short string or an integer."""
    if isinstance(value, str) and len(value) <= 80 and value.isprintable():
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return describe(value)


def _name_of(document: Mapping[Any, Any]) -> str:
    """The document's name, to label its errors, if it has one worth showing."""
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if isinstance(name, str) and 0 < len(name) <= MAX_SUBDOMAIN_LENGTH and name.isprintable():
        return name
    return ""


def _field_hint(model: type[BaseModel], detail: ErrorDetails) -> str:
    """For a field Tessera does not know, the supported one its name is a typo of."""
    loc = detail["loc"]
    if detail["type"] != "extra_forbidden" or not loc or not isinstance(loc[-1], str):
        return ""
    parent = _unwrap(_walk(model, loc[:-1])[1])
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return ""
    names = [info.alias or field_name for field_name, info in parent.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def _kind_problem(kind: object) -> str:
    if kind is None:
        return f"is required: one of {_KIND_NAMES}"
    if not isinstance(kind, str):
        return f"must be one of {_KIND_NAMES}, not {describe(kind)}"
    close = difflib.get_close_matches(kind, list(KINDS), n=1, cutoff=0.85)
    if not close:
        close = [name for name in KINDS if name.lower() == kind.lower()]
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"must be one of {_KIND_NAMES}, not {_shown(kind)}{hint}"


def _api_version_problem(model: type[Resource], api_version: object) -> str:
    versions = model.api_versions()
    accepted = versions[0]
    if len(versions) > 1:
        accepted = ", ".join(versions[:-1]) + " or " + versions[-1]
    if api_version is None:
        return f"is required: {accepted}"
    return f"must be {accepted} for a {model.KIND}, not {_shown(api_version)}"
