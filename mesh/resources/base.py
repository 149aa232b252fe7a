"""What every resource has: ``apiVersion``, ``kind``, ``metadata`` and ``spec``.

``metadata`` accepts ``name`` (required), ``namespace``, ``labels`` and ``annotations``;
anything else Kubernetes puts there (``uid``, ``resourceVersion``, ...) is refused, as
is ``status``.

Namespaces: Tessera has one namespace per trust domain. A resource's ``namespace`` is
kept as written (and shown by ``tessera mesh get``) but is not part of its identity nor
used to resolve a name: a resource is known by its kind and name, two resources of one
kind and name in different namespaces are the same resource, and a host such as
``users-service.default.svc.cluster.local`` names the Service ``users-service`` whatever
the namespace (:mod:`mesh.hosts`).

Usage::

    resource.key                  # ResourceKey(kind="VirtualService", name="reviews")
    resource.to_document()        # the Istio-shaped mapping, as applied

A resource remembers the order its document's keys were written in
(:class:`mesh.keyorder.KeyOrder`), so ``to_document`` gives them back in that order:
what ``tessera mesh get -o yaml`` prints diffs cleanly against the file applied.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, NamedTuple, Self

from annotated_types import MaxLen
from pydantic import (
    AfterValidator,
    ModelWrapValidatorHandler,
    PrivateAttr,
    Strict,
    model_validator,
)

from mesh.fields import DnsLabel, DnsSubdomain, LabelKey, Labels, Model
from mesh.keyorder import KeyOrder

__all__ = [
    "MAX_ANNOTATIONS_BYTES",
    "ObjectMeta",
    "Resource",
    "ResourceKey",
    "WorkloadSelector",
]

MAX_ANNOTATIONS_BYTES = 256 * 1024


def _check_annotations(annotations: dict[str, str]) -> dict[str, str]:
    size = sum(len(key.encode()) + len(value.encode()) for key, value in annotations.items())
    if size > MAX_ANNOTATIONS_BYTES:
        raise ValueError(f"must be at most {MAX_ANNOTATIONS_BYTES // 1024} KiB in all")
    return annotations


Annotations = Annotated[
    dict[LabelKey, Annotated[str, Strict()]],  # a label's key; the value is free text
    MaxLen(256),
    AfterValidator(_check_annotations),
]


class ResourceKey(NamedTuple):
    """What identifies a resource: its kind and its name (never its namespace)."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


class ObjectMeta(Model):
    name: DnsSubdomain
    namespace: DnsLabel | None = None
    labels: Labels | None = None
    annotations: Annotations | None = None


class WorkloadSelector(Model):
    """``selector.matchLabels``: the ``--label``s a sidecar or gateway runs with."""

    match_labels: Labels


class Resource(Model):
    """Base of the seven kinds; each names its group, versions, kind and spec."""

    GROUP: ClassVar[str]
    VERSIONS: ClassVar[tuple[str, ...]]
    KIND: ClassVar[str]

    api_version: str
    kind: str
    metadata: ObjectMeta
    spec: Model

    _key_order: KeyOrder = PrivateAttr(default_factory=KeyOrder)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_key_order(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        resource = handler(data)
        resource._key_order = KeyOrder.of(data)
        return resource

    @classmethod
    def api_versions(cls) -> tuple[str, ...]:
        """Every ``apiVersion`` this kind is accepted with, the newest first."""
        return tuple(f"{cls.GROUP}/{version}" for version in cls.VERSIONS)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.KIND, self.metadata.name)

    def to_document(self) -> dict[str, Any]:
        """The resource as an Istio-shaped mapping (what ``mesh get`` prints), its keys in
        the order they were written.

        Fields left out stay out, so two applies of one document compare equal.
        """
        document: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return self._key_order.arrange(document)
