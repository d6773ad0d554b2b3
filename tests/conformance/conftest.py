"""``executor_under_test``: every conformance test runs once per executor kind in ``KINDS``.

A kind is a harness fixture named ``<kind>_harness`` (see ``harness.py``); its marks say
which real peer it needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conformance.apptainer_harness import apptainer_harness
from tests.conformance.harness import EventRecorder, ExecutorUnderTest, Harness
from tests.conformance.kubernetes_harness import kubernetes_harness
from tests.conformance.memory_harness import memory_harness
from tests.conformance.podman_harness import behaviour_image, podman_harness

__all__ = [
    "apptainer_harness",
    "behaviour_image",
    "executor_under_test",
    "harness",
    "kubernetes_harness",
    "memory_harness",
    "podman_harness",
]

KINDS = [
    pytest.param("podman", marks=pytest.mark.podman, id="podman"),
    pytest.param("apptainer", id="apptainer"),  # a fake apptainer binary: no peer needed
    pytest.param("kubernetes", marks=pytest.mark.kubernetes, id="kubernetes"),  # kwok kubelets
    pytest.param("memory", id="memory"),  # the in-memory TEST executor: no peer needed
]


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest) -> Harness:
    """The harness of one executor kind (its own fixture, ``<kind>_harness``)."""
    found: Harness = request.getfixturevalue(f"{request.param}_harness")
    return found


@pytest.fixture
async def executor_under_test(harness: Harness) -> AsyncIterator[ExecutorUnderTest]:
    """An opened executor of the kind under test, with its event recorder and harness."""
    executor = await harness.open_executor()
    under_test = ExecutorUnderTest(harness, executor, EventRecorder(executor))
    try:
        yield under_test
    finally:
        await under_test.aclose()
