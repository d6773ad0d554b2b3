"""The informer against the real API server: what it does when its watch cannot resume.

A watch resumed from a ``resourceVersion`` older than the API server's window gets
``410 Gone``; the informer must then relist, and the relist must leave its cache equal to
the server's list and hand its handler exactly what changed while it was away: deletions
as ``DELETED``, new objects once as ``ADDED``, changed ones once as ``MODIFIED``.

The informer acts as the executor's ServiceAccount (the Role of
``executors/kubernetes/rbac.py``); the admin client makes the changes behind its back.
The objects are suspended Jobs: the kind the executor follows, and no pods are made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from common.types import Json
from executors.kubernetes.client import JOBS, KubeClient, connect
from executors.kubernetes.informer import Change, Informer
from executors.kubernetes.rbac import role_rules
from tests.peers.kubernetes import K8sTestbed, restricted_container

pytestmark = pytest.mark.kubernetes

NODE = "fednode-informer-test"
SELECTOR = "fednode.io/test=informer"
#: Long before the API server's watch window: resuming from it is answered with 410 Gone.
ANCIENT_VERSION = "1"


class Seen:
    """What the informer handed its handler, in order; waits are woken by deliveries."""

    def __init__(self) -> None:
        self.changes: list[tuple[Change, str]] = []
        self._delivered = asyncio.Event()

    def __call__(self, change: Change, obj: Json) -> None:
        self.changes.append((change, obj["metadata"]["name"]))
        self._delivered.set()

    def since(self, mark: int) -> Counter[tuple[Change, str]]:
        return Counter(self.changes[mark:])

    async def wait(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        async def until() -> None:
            while not condition():
                self._delivered.clear()
                await self._delivered.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; seen: {self.changes[-10:]}"
            ) from None


@pytest.fixture
async def admin(k8s_testbed: K8sTestbed) -> AsyncIterator[Any]:
    async with k8s_testbed.api_client() as api:
        yield api


@pytest.fixture
async def executor_client(k8s_testbed: K8sTestbed, k8s_namespace: str) -> AsyncIterator[KubeClient]:
    """A client acting as the executor's ServiceAccount, with exactly the executor's Role."""
    kubeconfig: Path = await k8s_testbed.service_account_kubeconfig(
        k8s_namespace, rules=role_rules(NODE)
    )
    kube = KubeClient(
        await connect(kubeconfig=kubeconfig, context=None, max_connections=4), request_timeout=30
    )
    yield kube
    await kube.close()


@contextlib.asynccontextmanager
async def running(informer: Informer) -> AsyncIterator[asyncio.Task[None]]:
    """The informer's watch loop as a task, cancelled on leaving (its watch broken)."""
    task = asyncio.create_task(informer.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def suspended_job(name: str, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    key, value = SELECTOR.split("=")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {key: value} if labels is None else labels},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True},
                    "containers": [restricted_container("c", "busybox", ["true"])],
                }
            },
        },
    }


async def create_settled(jobs: Any, namespace: str, name: str, **kwargs: Any) -> str:
    """Create a suspended Job and wait for the Job controller's one status update (the
    ``Suspended`` condition), so that later changes are the test's own; its version."""
    await jobs.create_namespaced_job(namespace, suspended_job(name, **kwargs))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        job = await jobs.read_namespaced_job(name, namespace)
        if any(c.type == "Suspended" for c in job.status.conditions or ()):
            return str(job.metadata.resource_version)
        await asyncio.sleep(0.05)
    raise AssertionError(f"the Job controller did not mark {name} suspended within 15 s")


async def server_versions(admin: Any, namespace: str) -> dict[str, str]:
    """Name -> resourceVersion of the selected Jobs, as the server lists them now."""
    jobs = await client.BatchV1Api(admin).list_namespaced_job(namespace, label_selector=SELECTOR)
    return {job.metadata.name: job.metadata.resource_version for job in jobs.items}


def cached_versions(informer: Informer) -> dict[str, str]:
    return {name: obj["metadata"]["resourceVersion"] for name, obj in informer.store.items()}


async def test_a_watch_that_cannot_resume_gets_410_relists_and_hands_on_what_it_missed(
    admin: Any,
    k8s_namespace: str,
    executor_client: KubeClient,
) -> None:
    jobs = client.BatchV1Api(admin)
    for name in ("job-a", "job-b", "job-c"):
        await create_settled(jobs, k8s_namespace, name)
    seen = Seen()
    informer = Informer(
        client=executor_client,
        resource=JOBS,
        namespace=k8s_namespace,
        label_selector=SELECTOR,
        handler=seen,
        watch_timeout=60,
    )
    await informer.prime()
    assert seen.since(0) == Counter({(Change.ADDED, n): 1 for n in ("job-a", "job-b", "job-c")})

    async with running(informer):  # live: a new Job arrives through the watch
        settled = await create_settled(jobs, k8s_namespace, "job-d")
        await seen.wait(
            lambda: cached_versions(informer).get("job-d") == settled,
            timeout=10,
            what="job-d through the watch",
        )
    assert informer.relists == 0
    assert cached_versions(informer) == await server_versions(admin, k8s_namespace)

    # Disconnected, and the version it would resume from is long gone from the server.
    informer.resource_version = ANCIENT_VERSION
    mark = len(seen.changes)
    await jobs.delete_namespaced_job("job-a", k8s_namespace, propagation_policy="Background")
    await jobs.patch_namespaced_job(
        "job-b", k8s_namespace, {"metadata": {"annotations": {"touched": "yes"}}}
    )
    for name in ("job-e", "job-f"):
        await create_settled(jobs, k8s_namespace, name)

    missed = Counter(
        {
            (Change.DELETED, "job-a"): 1,
            (Change.MODIFIED, "job-b"): 1,
            (Change.ADDED, "job-e"): 1,
            (Change.ADDED, "job-f"): 1,
        }
    )
    async with running(informer):
        await seen.wait(lambda: seen.since(mark) == missed, timeout=20, what="the relist")
        assert informer.relists == 1
        assert cached_versions(informer) == await server_versions(admin, k8s_namespace)
        # The watch goes on from the relist's version: a new Job once, nothing repeated.
        settled = await create_settled(jobs, k8s_namespace, "job-g")
        await seen.wait(
            lambda: cached_versions(informer).get("job-g") == settled,
            timeout=10,
            what="job-g through the watch after the relist",
        )
        await asyncio.sleep(0.5)  # room for a duplicate to show up, were there one
    assert seen.since(mark) == missed + Counter(
        {(Change.ADDED, "job-g"): 1, (Change.MODIFIED, "job-g"): 1}
    )  # created, then settled
    assert informer.relists == 1
    assert cached_versions(informer) == await server_versions(admin, k8s_namespace)
    assert set(informer.store) == {"job-b", "job-c", "job-d", "job-e", "job-f", "job-g"}


@pytest.mark.slow
async def test_a_quiet_watch_advances_its_version_by_bookmarks(
    admin: Any,
    k8s_namespace: str,
    executor_client: KubeClient,
) -> None:
    jobs = client.BatchV1Api(admin)
    seen = Seen()
    # The API server sends a bookmark 2 s before a watch's timeout, so 5 s suffices.
    informer = Informer(
        client=executor_client,
        resource=JOBS,
        namespace=k8s_namespace,
        label_selector=SELECTOR,
        handler=seen,
        watch_timeout=5,
    )
    bookmarks = watch_bookmarks(informer)
    await informer.prime()
    listed = int(informer.resource_version or 0)
    async with running(informer):
        # A Job the informer does not select moves the server's version, not its stream.
        target = int(
            await create_settled(
                jobs, k8s_namespace, "unselected", labels={"fednode.io/test": "other"}
            )
        )
        await bookmarks.wait(
            lambda: int(informer.resource_version or 0) >= target,
            timeout=15,
            what="a bookmark at the unselected Job's version",
        )
    assert int(informer.resource_version or 0) >= target > listed
    assert seen.changes == []
    assert informer.relists == 0


def watch_bookmarks(informer: Informer) -> Seen:
    """Bookmarks are not handed to the handler; this spies them on the informer's stream."""
    bookmarks, on_line = Seen(), informer._on_line

    def spy(line: bytes) -> None:
        on_line(line)
        event = json.loads(line) if line.strip() else {}
        if event.get("type") == "BOOKMARK":
            bookmarks(Change.MODIFIED, {"metadata": {"name": "bookmark"}})

    informer._on_line = spy  # type: ignore[method-assign]
    return bookmarks
