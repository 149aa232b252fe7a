"""How a field error reads, and the exception that carries them."""

from __future__ import annotations

import pytest

import sdk.errors
from mesh.errors import ConfigError, FieldError, MeshError, describe


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(
            FieldError(
                "VirtualService",
                "microservice-virtual-service",
                "spec.http[0].corsPolicy",
                "is not supported",
            ),
            "VirtualService microservice-virtual-service: spec.http[0].corsPolicy is not supported",
            id="predicate",
        ),
        pytest.param(
            FieldError(
                "VirtualService",
                "reviews",
                "spec.http[0].route[1].destination.subset",
                "subset v3 is not defined by any DestinationRule for host reviews",
            ),
            "VirtualService reviews: spec.http[0].route[1].destination.subset: subset v3 is "
            "not defined by any DestinationRule for host reviews",
            id="statement",
        ),
        pytest.param(
            FieldError("Service", "users", "", "is defined twice"),
            "Service users is defined twice",
            id="whole-resource",
        ),
        pytest.param(
            FieldError("", "", "", "line 2, column 1: invalid YAML: x", source="mesh.yaml"),
            "mesh.yaml: line 2, column 1: invalid YAML: x",
            id="input",
        ),
        pytest.param(
            FieldError("", "", "", "is a list, not a mapping", source="mesh.yaml", document=3),
            "mesh.yaml document 3 is a list, not a mapping",
            id="document",
        ),
        pytest.param(
            FieldError("Gateway", "", "metadata.name", "is required", source="a.yaml", document=2),
            "Gateway in a.yaml document 2: metadata.name is required",
            id="kind-without-name",
        ),
        pytest.param(
            FieldError("", "x", "kind", "is required", document=1),
            "<input> document 1: kind is required",
            id="no-source",
        ),
    ],
)
def test_field_error_reads_as_one_line(error: FieldError, expected: str) -> None:
    assert str(error) == expected


def test_config_error_carries_every_error_a_line() -> None:
    first = FieldError("Service", "a", "spec.ports", "must not be empty")
    second = FieldError("Service", "b", "", "is defined twice")
    err = ConfigError([first, second])
    assert err.errors == (first, second)
    assert err.message == "Service a: spec.ports must not be empty\nService b is defined twice"
    assert str(err) == err.message
    assert err.status == 400
    # One root for the mesh; and it is a configuration error as the rest of Tessera's.
    assert isinstance(err, MeshError)
    assert isinstance(err, sdk.errors.ConfigError)
    assert isinstance(err, sdk.errors.TesseraError)


def test_config_error_needs_an_error() -> None:
    with pytest.raises(ValueError, match="at least one FieldError"):
        ConfigError([])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "empty"),
        (True, "true"),
        (80, "an integer (80)"),
        (1.5, "a number (1.5)"),
        ("80", "a string ('80')"),
        ("x" * 50, "a string ('" + "x" * 37 + "...')"),
        ({"a": 1}, "a mapping"),
        ([1], "a list"),
        (b"x", "a bytes"),
    ],
)
def test_describe(value: object, expected: str) -> None:
    assert describe(value) == expected
