"""Multi-document YAML, read with bounds: what ``tessera mesh apply -f`` reads.

PyYAML's safe loader, with what makes it safe to run on any input and unsurprising to
read:

- at most :data:`MAX_INPUT_BYTES` (4 MiB) and :data:`MAX_DOCUMENTS` (1,000) documents,
  nested at most :data:`MAX_DEPTH` levels, with at most :data:`MAX_NODES` values in
  all (4 MiB of block-style resources is about 550,000; 4 MiB of ``[1,1,1,...`` would
  be 2 million, and PyYAML needs some 13 microseconds for each);
- no anchors (``&name``) nor aliases (``*name``), and so no merge keys (``<<``): an
  alias lets a few hundred bytes expand into gigabytes ("billion laughs"), and
  Kubernetes-style resources never need one;
- a mapping key is a string, and appears once in its mapping (PyYAML would keep the
  last of two ``route:`` silently);
- YAML 1.2's booleans and integers: ``on``, ``off``, ``yes`` and ``no`` stay strings
  (only ``true`` and ``false`` are booleans), an integer is decimal (``080`` is 80, not
  YAML 1.1's octal 64; ``1:30`` stays a string, not 90), and there are no timestamps
  (``2024-01-01`` stays a string).

Empty documents (``---`` with nothing after it) are skipped but counted, so a
document's number is its place in the file. A syntax error says the line and column::

    documents = load_documents(text, source="mesh.yaml")
    for document in documents:
        print(document.index, document.line, document.content["kind"])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from mesh.errors import ConfigError, FieldError

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENTS",
    "MAX_INPUT_BYTES",
    "MAX_NODES",
    "Document",
    "load_documents",
]

MAX_INPUT_BYTES = 4 * 1024 * 1024
MAX_DOCUMENTS = 1000
MAX_DEPTH = 64
MAX_NODES = 600_000

_MERGE_TAG = "tag:yaml.org,2002:merge"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_INT_TAG = "tag:yaml.org,2002:int"
_DECIMAL = re.compile(r"^[-+]?[0-9]+$")


@dataclass(frozen=True)
class Document:
    """One non-empty document: its number in the input (from 1), its first line, its data."""

    index: int
    line: int
    content: Any


_NO_ANCHORS = (
    "YAML anchors and aliases (&name, *name) are not supported: write each value out "
    "(an alias can make a small file expand into a huge one)"
)
_QUOTE_STARS = 'to write a value that starts with \'*\', quote it: "*", "*.example.com"'


class _Refused(yaml.MarkedYAMLError):
    """Something this loader refuses, at a place in the input."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(None, None, problem, mark)


def _yaml12_resolvers() -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}
    for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items():
        replaced = (_BOOL_TAG, _TIMESTAMP_TAG, _INT_TAG)
        kept = [(tag, pattern) for tag, pattern in entries if tag not in replaced]
        if kept:
            resolvers[first] = kept
    boolean = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
    for first in "tTfF":
        resolvers.setdefault(first, []).append((_BOOL_TAG, boolean))
    for first in "-+0123456789":
        resolvers.setdefault(first, []).insert(0, (_INT_TAG, _DECIMAL))
    return resolvers


class _PythonEventParser(Reader, Scanner, Parser):
    """PyYAML's own parser, where libyaml is missing."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)


def _event_parser() -> type:
    """libyaml's parser (five times faster; the same events), else PyYAML's own."""
    try:
        from yaml._yaml import CParser
    except ImportError:  # pragma: no cover - PyYAML's wheels have it
        return _PythonEventParser
    return CParser


_EventParser: Any = _event_parser()


class _BoundedLoader(Composer, _EventParser, SafeConstructor, Resolver):  # type: ignore[misc]
    """Events from the parser; nodes composed here (bounded); data constructed as safe_load."""

    yaml_implicit_resolvers = _yaml12_resolvers()

    def __init__(self, stream: str) -> None:
        _EventParser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(
                f"has more than {MAX_NODES:,} values in all; apply fewer at once (split the file)",
                event.start_mark,
            )
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"{_NO_ANCHORS}; {_QUOTE_STARS}", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(_NO_ANCHORS, event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_decimal_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        if not isinstance(text, str) or _DECIMAL.fullmatch(text) is None:
            raise _Refused(f"{text!r} is not a decimal integer", node.start_mark)
        return int(text, 10)

    yaml_constructors = {**SafeConstructor.yaml_constructors, _INT_TAG: construct_decimal_int}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                raise _Refused("YAML merge keys (<<) are not supported", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise _Refused(
                    f"a mapping key must be a string, not {key!r} (quote it)",
                    key_node.start_mark,
                )
            if key in seen:
                raise _Refused(
                    f"key {key!r} appears twice in this mapping (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _decode(text: str | bytes, source: str) -> str:
    if isinstance(text, str):
        # A character is at least one byte: only a string this long can be too large.
        size = len(text.encode("utf-8")) if len(text) > MAX_INPUT_BYTES // 4 else len(text)
    else:
        size = len(text)
    if size > MAX_INPUT_BYTES:
        raise ConfigError(
            [
                FieldError(
                    "",
                    "",
                    "",
                    f"is {size:,} bytes; at most {MAX_INPUT_BYTES:,} bytes (4 MiB) may be "
                    "applied at once: split it into several files",
                    source=source,
                )
            ]
        )
    if isinstance(text, str):
        return text.removeprefix("\ufeff")
    try:
        return text.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [
                FieldError(
                    "",
                    "",
                    "",
                    f"is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})",
                    source=source,
                )
            ]
        ) from None


def _syntax_error(err: yaml.YAMLError, source: str, text: str = "") -> FieldError:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "is not valid YAML"
        if err.context and err.problem:
            problem = f"{err.problem} ({err.context})"
        if not isinstance(err, _Refused):
            problem = f"invalid YAML: {problem}"
        if err.context == "while scanning an alias":  # hosts: [*]
            problem += f"; {_QUOTE_STARS}"
        if mark is not None and _is_tab(text, mark.line, mark.column):
            problem += "; a tab is not indentation in YAML: indent with spaces"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return FieldError("", "", "", f"{where}{problem}", source=source)
    return FieldError("", "", "", f"is not valid YAML: {err}", source=source)  # pragma: no cover


def _is_tab(text: str, line: int, column: int) -> bool:
    """Whether the character at (line, column), counted from 0, is a tab."""
    lines = text.split("\n", line + 1)
    return line < len(lines) and column < len(lines[line]) and lines[line][column] == "\t"


def load_documents(text: str | bytes, *, source: str = "<stdin>") -> list[Document]:
    """Every non-empty document of ``text``; raise ConfigError naming the first problem."""
    decoded = _decode(text, source)
    loader = _BoundedLoader(decoded)
    documents: list[Document] = []
    index = 0
    try:
        while loader.check_node():
            index += 1
            if index > MAX_DOCUMENTS:
                raise ConfigError(
                    [
                        FieldError(
                            "",
                            "",
                            "",
                            f"has more than {MAX_DOCUMENTS:,} documents; apply at most "
                            f"{MAX_DOCUMENTS:,} at once (split the file)",
                            source=source,
                        )
                    ]
                )
            node = loader.get_node()
            content = loader.construct_document(node) if node is not None else None
            if node is not None and content is not None:
                documents.append(Document(index, node.start_mark.line + 1, content))
    except yaml.YAMLError as err:  # _Refused is one too
        raise ConfigError([_syntax_error(err, source, decoded)]) from None
    except RecursionError:
        raise ConfigError(
            [FieldError("", "", "", f"nests deeper than {MAX_DEPTH} levels", source=source)]
        ) from None
    finally:
        loader.dispose()
    return documents
