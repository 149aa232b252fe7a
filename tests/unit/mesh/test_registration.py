"""Whether an instance may join a Service: the refusals, in the words a user reads."""

from __future__ import annotations

import pytest

from mesh.registration import registration_problem, similar_names
from tests.unit.mesh.documents import USERS_SERVICE
from tests.unit.mesh.meshes import ORDERS_SERVICE, SPLIT, USERS, configured

APPLY = "apply one (kind: Service, tessera.io/v1alpha1) naming the SPIFFE IDs that may serve it"


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        ("user-service", f"there is no Service user-service; did you mean users-service? If "
                         f"not, {APPLY}"),
        ("users", f"there is no Service users; did you mean users-service? If not, {APPLY}"),
        ("review", f"there is no Service review; did you mean reviews? If not, {APPLY}"),
        ("later-service", f"there is no Service later-service; {APPLY}"),
        ("billing", f"there is no Service billing; {APPLY}"),
    ],
)  # fmt: skip
def test_a_service_that_does_not_exist_names_the_close_ones(typed: str, reason: str) -> None:
    config = configured(USERS_SERVICE, ORDERS_SERVICE, SPLIT)
    problem = registration_problem(config, typed, USERS)
    assert problem is not None
    assert (problem.code, problem.reason) == ("not-found", reason)


def test_similar_names_are_few_and_closest_first() -> None:
    names = ["users-service", "users-api", "users-admin", "users-batch", "orders"]
    assert similar_names("users-servce", names) == ["users-service"]
    assert similar_names("users", names) == [
        "users-admin", "users-api", "users-batch"
    ]  # fmt: skip
    assert similar_names("us", names) == []  # too short to be a prefix worth naming
    assert similar_names("orders", names) == []  # itself is no suggestion
