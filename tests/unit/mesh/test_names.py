"""Kubernetes-shaped names."""

from __future__ import annotations

import pytest

from mesh.names import check_dns_label, check_dns_subdomain, check_label_key, check_label_value

LABEL = (
    "must be a DNS-1123 label: lower-case letters, digits and '-', starting and ending "
    "with a letter or digit, at most 63 characters (e.g. users-service)"
)
SUBDOMAIN = (
    "must be a DNS-1123 subdomain: labels of lower-case letters, digits and '-' joined by "
    "'.', at most 253 characters (e.g. reviews-route)"
)


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (check_dns_label, "Users", LABEL),
        (check_dns_label, "users.service", LABEL),
        (check_dns_label, "-users", LABEL),
        (check_dns_label, "users_service", LABEL),
        (check_dns_label, "a" * 64, LABEL),
        (check_dns_label, "", LABEL),
        (check_dns_subdomain, "reviews..route", SUBDOMAIN),
        (check_dns_subdomain, "Reviews", SUBDOMAIN),
        (check_dns_subdomain, ".".join(["a" * 60] * 5), SUBDOMAIN),
        (
            check_label_key,
            "Bad_Prefix/app",
            "must be a label key: its prefix (before '/') must be a DNS-1123 subdomain",
        ),
        (
            check_label_key,
            "app!",
            "must be a label key: letters, digits, '-', '_' and '.', starting and ending with "
            "a letter or digit, at most 63 characters, with an optional DNS prefix and '/' "
            "(e.g. app, app.kubernetes.io/name)",
        ),
        (
            check_label_value,
            "v1 ",
            "must be a label value: empty, or letters, digits, '-', '_' and '.', starting and "
            "ending with a letter or digit, at most 63 characters",
        ),
    ],
)
def test_refused(check: object, value: str, message: str) -> None:
    assert callable(check)
    with pytest.raises(ValueError) as caught:
        check(value)
    assert str(caught.value) == message


def test_accepted() -> None:
    check_dns_label("users-service")
    check_dns_subdomain("reviews.route-1")
    check_label_key("app.kubernetes.io/name")
    check_label_key("Version_1.x")
    check_label_value("")
    check_label_value("v1.2_rc-3")
