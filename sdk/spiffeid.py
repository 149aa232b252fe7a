"""SPIFFE ID and trust-domain parsing with errors a user can act on.

The value types are the ``spiffe`` package's ``SpiffeId`` and ``TrustDomain``;
this module wraps their parsing so a bad input becomes an ``InvalidArgument``
that names the input and the rule it broke, and is where Tessera imports them
from (``from sdk.spiffeid import SpiffeId, TrustDomain``).

Why not ``from spiffe import SpiffeId``: the ``spiffe`` package's ``__init__``
imports its Workload API client too (grpc, protobuf, pyasn1), about 80 ms of
CPU that a server or a CLI command, which need only the two value types, would
pay at every start. So the two are loaded from their own module,
``spiffe.spiffe_id.spiffe_id`` (which needs only ``spiffe.errors``), with the
package's ``__init__`` put off until something else of the package is asked
for (:func:`_value_types`). The classes are the package's own either way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sdk.errors import InvalidArgument

if TYPE_CHECKING:
    from spiffe import SpiffeId, TrustDomain

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TRUST_DOMAIN_LENGTH",
    "SpiffeId",
    "TrustDomain",
    "parse_spiffe_id",
    "parse_trust_domain",
    "require_member",
]

MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255


def parse_spiffe_id(value: str, *, what: str = "SPIFFE ID") -> SpiffeId:
    """Parse ``spiffe://<trust-domain>/<path>``; raise InvalidArgument if malformed."""
    if len(value.encode()) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_ID_LENGTH} bytes")
    try:
        spiffe_id: SpiffeId = _value_types().SpiffeId(value)
        _require_lower_case(value)
    except Exception as err:  # the spiffe package raises several types here
        raise InvalidArgument(
            f"{what} {value!r} is not valid: {_reason(err)}; "
            "expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web"
        ) from err
    if len(spiffe_id.trust_domain.name.encode()) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidArgument(f"{what} has a trust domain longer than 255 bytes")
    return spiffe_id


def parse_trust_domain(value: str) -> TrustDomain:
    """Parse a trust domain name (``example.org``) or its ID (``spiffe://example.org``)."""
    try:
        trust_domain: TrustDomain = _value_types().TrustDomain(value)
        _require_lower_case(value)
    except Exception as err:
        raise InvalidArgument(
            f"trust domain {value!r} is not valid: {_reason(err)}; "
            "use lower-case letters, digits, '.', '-' and '_', e.g. example.org"
        ) from err
    if len(trust_domain.name.encode()) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidArgument("trust domain is longer than 255 bytes")
    return trust_domain


def require_member(spiffe_id: SpiffeId, trust_domain: TrustDomain, *, what: str) -> None:
    """Raise InvalidArgument unless ``spiffe_id`` belongs to ``trust_domain``."""
    if spiffe_id.trust_domain != trust_domain:
        raise InvalidArgument(
            f"{what} {spiffe_id} is not in trust domain {trust_domain.name}; "
            f"use an ID of the form spiffe://{trust_domain.name}/..."
        )


def _require_lower_case(value: str) -> None:
    """The spiffe package folds the trust domain to lower case; the standard forbids it."""
    authority = value.removeprefix("spiffe://").split("/", 1)[0]
    if authority != authority.lower():
        raise ValueError("trust domain must be lower case")


def _reason(err: Exception) -> str:
    """Keep only the rule that was broken; the spiffe package repeats the input."""
    text = str(err).strip()
    if ": " in text and text.startswith("Invalid"):
        text = text.rsplit(": ", 1)[1]
    return text.rstrip(".") or type(err).__name__


def _value_types() -> ModuleType:
    """``spiffe.spiffe_id.spiffe_id``, loaded without running the ``spiffe`` package's
    ``__init__`` when nothing has imported the package yet.

    The package is registered unexecuted (its ``__path__`` is all a submodule import
    needs) with a module ``__getattr__`` (PEP 562) that runs the real ``__init__`` the
    first time a name it defines is asked for: ``from spiffe import X509Source`` and
    ``import spiffe; spiffe.WorkloadApiClient`` work as they always do, and find the
    same ``SpiffeId`` class, since ``__init__`` re-imports the loaded submodule."""
    module = sys.modules.get("spiffe.spiffe_id.spiffe_id")
    if module is not None:
        return module
    if "spiffe" not in sys.modules:
        spec = importlib.util.find_spec("spiffe")
        if spec is not None and spec.loader is not None:
            package = importlib.util.module_from_spec(spec)
            loader = spec.loader

            def finish(name: str) -> Any:
                del package.__dict__["__getattr__"]
                try:
                    loader.exec_module(package)
                except BaseException:
                    sys.modules.pop("spiffe", None)  # as a failed import leaves it
                    raise
                return object.__getattribute__(package, name)

            package.__dict__["__getattr__"] = finish
            sys.modules["spiffe"] = package
    return importlib.import_module("spiffe.spiffe_id.spiffe_id")


def __getattr__(name: str) -> Any:
    """``SpiffeId`` and ``TrustDomain`` load on first use (PEP 562), so that importing
    this module for its parsing loads no part of the ``spiffe`` package."""
    if name in ("SpiffeId", "TrustDomain"):
        return getattr(_value_types(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
