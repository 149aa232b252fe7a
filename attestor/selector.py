"""Selectors: ``type:value`` facts about a node or workload, e.g. ``unix:uid:1000``.

An entry matches a workload when every selector of the entry is among the
workload's selectors::

    >>> entry = {Selector.parse("unix:uid:1000")}
    >>> matches(entry, {Selector.parse("unix:uid:1000"), Selector.parse("unix:gid:0")})
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sdk.errors import InvalidArgument

MAX_SELECTOR_LENGTH = 1024


@dataclass(frozen=True, order=True)
class Selector:
    type: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse ``type:value``; the value may itself contain colons."""
        if len(text) > MAX_SELECTOR_LENGTH:
            raise InvalidArgument(f"selector is longer than {MAX_SELECTOR_LENGTH} characters")
        selector_type, sep, value = text.partition(":")
        if not sep or not selector_type or not value:
            raise InvalidArgument(
                f"selector {text!r} is not of the form type:value; "
                "write e.g. unix:uid:1000 or unix:path:/usr/bin/app"
            )
        if not selector_type.isidentifier():
            raise InvalidArgument(
                f"selector type {selector_type!r} is not valid; "
                "use letters, digits and '_' such as unix, docker, k8s, systemd"
            )
        return cls(selector_type, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def parse_selectors(texts: Iterable[str]) -> frozenset[Selector]:
    return frozenset(Selector.parse(text) for text in texts)


def matches(entry_selectors: Iterable[Selector], workload_selectors: Iterable[Selector]) -> bool:
    """True when every selector of the entry is among the workload's selectors."""
    required = set(entry_selectors)
    return bool(required) and required.issubset(set(workload_selectors))
