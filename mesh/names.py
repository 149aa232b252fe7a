"""Names in the Kubernetes shape Istio's resources use: DNS-1123 labels and subdomains,
label keys and values.

Each check returns nothing or raises ``ValueError`` with a message that reads after the
field's path (``metadata.name must be a DNS-1123 subdomain: ...``)::

    check_dns_label("users-service")        # fine
    check_dns_label("Users_Service")        # ValueError: must be a DNS-1123 label: ...
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

__all__ = [
    "MAX_LABEL_LENGTH",
    "MAX_SUBDOMAIN_LENGTH",
    "check_dns_label",
    "check_dns_subdomain",
    "check_label_key",
    "check_label_value",
    "is_dns_label",
    "is_dns_subdomain",
    "similar_names",
]

MAX_LABEL_LENGTH = 63
MAX_SUBDOMAIN_LENGTH = 253

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")

_LABEL_RULE = (
    "lower-case letters, digits and '-', starting and ending with a letter or digit, "
    f"at most {MAX_LABEL_LENGTH} characters"
)


def is_dns_label(value: str) -> bool:
    return len(value) <= MAX_LABEL_LENGTH and _DNS_LABEL.fullmatch(value) is not None


def is_dns_subdomain(value: str) -> bool:
    return len(value) <= MAX_SUBDOMAIN_LENGTH and all(
        is_dns_label(part) for part in value.split(".")
    )


def check_dns_label(value: str) -> None:
    """A DNS-1123 label: ``users-service``, never ``users.service`` or ``Users``."""
    if not is_dns_label(value):
        raise ValueError(f"must be a DNS-1123 label: {_LABEL_RULE} (e.g. users-service)")


def check_dns_subdomain(value: str) -> None:
    """A DNS-1123 subdomain: DNS labels joined by '.', at most 253 characters."""
    if not is_dns_subdomain(value):
        raise ValueError(
            "must be a DNS-1123 subdomain: labels of lower-case letters, digits and '-' "
            f"joined by '.', at most {MAX_SUBDOMAIN_LENGTH} characters (e.g. reviews-route)"
        )


def check_label_key(value: str) -> None:
    """A label key: ``name`` or ``prefix/name`` (prefix a DNS subdomain), as Kubernetes."""
    prefix, _, name = value.rpartition("/")
    if "/" in value and not is_dns_subdomain(prefix):
        raise ValueError(
            "must be a label key: its prefix (before '/') must be a DNS-1123 subdomain"
        )
    if len(name) > MAX_LABEL_LENGTH or _LABEL_NAME.fullmatch(name) is None:
        raise ValueError(
            "must be a label key: letters, digits, '-', '_' and '.', starting and ending "
            f"with a letter or digit, at most {MAX_LABEL_LENGTH} characters, with an "
            "optional DNS prefix and '/' (e.g. app, app.kubernetes.io/name)"
        )


def check_label_value(value: str) -> None:
    """A label value: empty, or as a label key's name part."""
    if value and (len(value) > MAX_LABEL_LENGTH or _LABEL_NAME.fullmatch(value) is None):
        raise ValueError(
            "must be a label value: empty, or letters, digits, '-', '_' and '.', starting "
            f"and ending with a letter or digit, at most {MAX_LABEL_LENGTH} characters"
        )


def similar_names(name: str, names: Iterable[str], *, most: int = 3) -> list[str]:
    """The ``names`` a user who typed ``name`` may have meant: a close spelling
    (``user-service`` for ``users-service``), or one that begins with the other
    (``users`` for ``users-service``); at most ``most``, the closest first."""
    candidates = sorted(set(names) - {name})
    found = difflib.get_close_matches(name, candidates, n=most, cutoff=0.8)
    if len(name) >= 3:
        found += [
            other
            for other in candidates
            if other not in found and (other.startswith(name) or name.startswith(other))
        ]
    return found[:most]
