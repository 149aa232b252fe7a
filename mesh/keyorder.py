"""The order a document's keys were written in, so a resource reads back as applied.

A resource is a typed model, and dumping a model gives its fields in the model's order,
not the user's: ``tessera mesh get -o yaml`` would print ``host`` before ``subsets``
however they were written, and a diff against the applied file would show lines that
did not change. :class:`KeyOrder` remembers the keys of the document a resource was read
from, at every depth, and puts a dump back in that order::

    order = KeyOrder.of({"spec": {"subsets": [{"name": "v1"}], "host": "reviews"}})
    order.arrange({"spec": {"host": "reviews", "subsets": [{"name": "v1"}]}})
    # {"spec": {"subsets": [{"name": "v1"}], "host": "reviews"}}

Only the order is taken from the document; keys and values are always the dump's (a key
the document had and the dump has not, such as a ``null`` left out, stays out; a key the
dump has and the document had not comes after the others). The order is not content:
two KeyOrders compare equal, so two resources that differ only in the order of their
keys are equal, and applying one over the other changes nothing.

Comments are not kept: the server stores documents, not text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["KeyOrder"]

# A document's shape: a mapping's keys in order (each with the shape of its value), a
# list's items' shapes, or None for a scalar.
_Shape = dict[Any, "_Shape"] | list["_Shape"] | None


class KeyOrder:
    """The keys of a document in the order they were written, at every depth."""

    __slots__ = ("_shape",)

    def __init__(self, shape: _Shape = None) -> None:
        self._shape = shape

    @classmethod
    def of(cls, document: object) -> KeyOrder:
        """The order of ``document``'s keys (a mapping from YAML or JSON)."""
        return cls(_shape(document))

    def arrange(self, dumped: dict[str, Any]) -> dict[str, Any]:
        """``dumped`` with its keys, at every depth, in the document's order."""
        arranged = _arrange(dumped, self._shape)
        assert isinstance(arranged, dict)
        return arranged

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyOrder)  # the order is not part of a resource's content

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "KeyOrder()"


def _shape(value: object) -> _Shape:
    # Depth is bounded by the YAML reader (mesh.yamlload), and by pydantic for a model
    # built in code.
    if isinstance(value, Mapping):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_shape(item) for item in value]
    return None


def _arrange(value: Any, shape: _Shape) -> Any:
    if isinstance(value, dict):
        written = shape if isinstance(shape, dict) else {}
        arranged = {key: _arrange(value[key], written[key]) for key in written if key in value}
        arranged.update(
            (key, _arrange(item, None)) for key, item in value.items() if key not in arranged
        )
        return arranged
    if isinstance(value, list):
        shapes = shape if isinstance(shape, list) else []
        return [
            _arrange(item, shapes[index] if index < len(shapes) else None)
            for index, item in enumerate(value)
        ]
    return value
