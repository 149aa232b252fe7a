"""The mesh's exceptions, and the field error they carry.

    TesseraError (sdk.errors)
    ├── ConfigError (sdk.errors)      a flag, environment variable or config file is wrong
    │   └── mesh.ConfigError          mesh configuration that cannot be applied: every
    │                                 FieldError found, at once
    ├── NotFound (sdk.errors)
    │   └── mesh.UnknownServiceError  describe/explain of a Service that does not exist
    └── MeshError                     root of the mesh's own errors
        ├── mesh.ConfigError
        └── mesh.UnknownServiceError

A :class:`FieldError` names the resource (kind and name), the path of the field in it
and what is wrong, and reads as one line::

    VirtualService microservice-virtual-service: spec.http[0].corsPolicy is not supported
    VirtualService reviews: spec.http[0].route[1].destination.subset: subset v3 is not
        defined by any DestinationRule for host reviews     (one line)

Usage::

    try:
        resources = parse_documents(text, source="mesh.yaml")
    except ConfigError as err:
        for error in err.errors:
            print(error, file=sys.stderr)

The message is the user's own input and Tessera's words about it: safe to show the
caller (the server answers it with status 400).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mesh.names import similar_names
from sdk.errors import ConfigError as _SdkConfigError
from sdk.errors import NotFound, TesseraError

__all__ = [
    "ConfigError",
    "FieldError",
    "MeshError",
    "UnknownServiceError",
    "describe",
]

# A message beginning with one of these reads as a predicate of the field it follows
# ("spec.hosts is required"); any other message follows the field after ": ".
_PREDICATE_STARTS = ("is ", "are ", "must ", "has ", "may ", "cannot ", "does ")


@dataclass(frozen=True)
class FieldError:
    """One thing wrong with one field of one resource.

    ``kind`` and ``name`` are empty where the document did not get that far (YAML that
    does not parse, a document that is not a mapping, a kind without a name); then
    ``source`` and ``document`` (1-based, counting every ``---``) say where it is.
    ``path`` is the field's path in the document (``spec.http[0].route[1].weight``), empty
    for the document as a whole.
    """

    kind: str
    name: str
    path: str
    message: str
    source: str = ""
    document: int = 0

    def __str__(self) -> str:
        named = self.kind and self.name
        where = f"{self.kind} {self.name}" if named else self._document_label()
        separator = " " if _is_predicate(self.message) else ": "
        if not self.path:
            return f"{where}{separator}{self.message}"
        return f"{where}: {self.path}{separator}{self.message}"

    def _document_label(self) -> str:
        source = self.source or "<input>"
        label = f"{source} document {self.document}" if self.document else source
        return f"{self.kind} in {label}" if self.kind else label


def _is_predicate(message: str) -> bool:
    return message.startswith(_PREDICATE_STARTS)


class MeshError(TesseraError):
    """Root of the mesh's errors."""

    status = 400


class ConfigError(MeshError, _SdkConfigError):
    """Mesh configuration that cannot be applied; ``errors`` has every problem found.

    The message is one error a line, in the order of the input.
    """

    status = 400

    def __init__(self, errors: Iterable[FieldError]) -> None:
        self.errors: tuple[FieldError, ...] = tuple(errors)
        if not self.errors:
            raise ValueError("a ConfigError needs at least one FieldError")
        super().__init__("\n".join(str(error) for error in self.errors))


class UnknownServiceError(MeshError, NotFound):
    """A Service asked about (``mesh describe``, ``mesh explain``) is not configured."""

    status = 404

    def __init__(self, service: str, known: Iterable[str] = ()) -> None:
        self.service = service
        close = similar_names(service, known)
        guess = f"; did you mean {' or '.join(close)}?" if close else ""
        super().__init__(f"Service {service} does not exist{guess}")


_MAX_SHOWN = 40


def describe(value: object) -> str:
    """What the user wrote, in YAML's words: ``a string ('80')``, ``a list``, ``empty``."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value:g})"
    if isinstance(value, str):
        shown = value if len(value) <= _MAX_SHOWN else value[: _MAX_SHOWN - 3] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"
