"""The node as an operator deploys it: the Helm chart installed on the testbed's real worker.

Everything else that tests the node on Kubernetes runs the node in the test process. Here
the node is the chart's Deployment: the node image (``scripts/node-image``, from these
sources) imported into the worker's containerd, ``helm install`` run by the installer
(admin) with a values file, and kubelet running the node pod under Pod Security
``restricted`` beside its runs, with the chart's NetworkPolicies enforced by Cilium.

What an operator's cluster has and the testbed lacks is supplied, and nothing more:

* **the vantage6 server** runs on the host. Pods reach the host through a relay pod (the
  same TCP relay the real-worker tests put where the node pod stands,
  :meth:`K8sRealWorker.proxy_relay`) in a namespace of its own, behind a Service: the node
  is given the Service's ClusterIP as ``server.url`` and its NetworkPolicy opens egress to
  the relay pod (``networkPolicy.server.to``), as an operator narrows it to the server. A
  server on loopback (the session's) is forwarded to the pod bridge's address first;
* **storage**: the task-directory claim the chart makes is bound to a hostPath volume made
  for it (a directory owned by the runs' uid), and the database is the chart's own
  ``hostPath`` database (the chart makes its volume and claim).

:class:`HelmNode` installs, upgrades and uninstalls one release, finds the node pod,
force-deletes it (grace period 0: the API object goes at once, kubelet kills the
container, the ReplicaSet starts another). ``follow_logs``
copies the log of every node pod, across its lives, into one file (a force-deleted pod's
log goes with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.backoff import Backoff
from tests.peers.helm import CHART, helm, merged, pre_bound_volume
from tests.peers.kubernetes import K8sRealWorker, K8sTestbed

REPO = Path(__file__).resolve().parents[2]
NODE_IMAGE_SCRIPT = REPO / "scripts" / "node-image"
RELEASE = "site"
FULLNAME = f"{RELEASE}-fednode"
#: The chart's node pod labels (``fednode.selectorLabels``) for release ``RELEASE``.
NODE_POD_SELECTOR = (
    f"app.kubernetes.io/name=fednode,app.kubernetes.io/instance={RELEASE},"
    "app.kubernetes.io/component=node"
)
NODE_POD_LABELS = dict(pair.split("=") for pair in NODE_POD_SELECTOR.split(","))
RUN_UID = 10001  # the chart's runs.runAsUser, which the node pod runs as too
SERVER_RELAY_LABELS = {"app": "v6-server-relay"}
T = TypeVar("T")


async def patiently(call: Callable[[], Awaitable[T]], *, within: float = 180.0) -> T:
    """``call()``, again while the API server cannot be reached (the shared testbed's API
    server is restarted now and then by other test sessions), for up to ``within`` s."""
    backoff = Backoff(first=1.0, cap=10.0)
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except OSError:
            if time.monotonic() > deadline:
                raise
            await backoff.pause()


def build_node_image() -> str:
    """``localhost/fednode/node:<content tag>`` from these sources (a no-op when built)."""
    result = subprocess.run(
        [str(NODE_IMAGE_SCRIPT)], capture_output=True, text=True, check=False, timeout=900
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/node-image failed:\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


@dataclass
class ServerRoute:
    """How pods reach the vantage6 server on the host: a relay pod behind a Service."""

    namespace: str
    cluster_ip: str
    port: int

    @property
    def egress_to(self) -> list[dict[str, Any]]:
        """NetworkPolicy peers naming the relay pod (a chart's ``networkPolicy.server.to``)."""
        return [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": self.namespace}
                },
                "podSelector": {"matchLabels": dict(SERVER_RELAY_LABELS)},
            }
        ]


@contextlib.asynccontextmanager
async def server_route(
    testbed: K8sTestbed, worker: K8sRealWorker, *, host: str, port: int
) -> AsyncIterator[ServerRoute]:
    """A relay to the server at ``host:port`` in a namespace of its own, removed on exit.

    Pods reach the host at ``worker.node_ip`` only: a server listening there is relayed to
    directly; one on loopback (the session's ``v6_server``) through a forwarder on the node
    IP in this process first."""
    async with contextlib.AsyncExitStack() as stack:
        if host != worker.node_ip:
            port = await stack.enter_async_context(_forwarder(worker.node_ip, (host, port)))
        namespace = await testbed.create_namespace("fednode-v6relay")
        stack.push_async_callback(testbed.delete_namespace, namespace)
        cluster_ip = await worker.proxy_relay(
            namespace, labels=SERVER_RELAY_LABELS, pod_port=port, node_port=port, name="v6-server"
        )
        yield ServerRoute(namespace, cluster_ip, port)


@contextlib.asynccontextmanager
async def _forwarder(listen_host: str, target: tuple[str, int]) -> AsyncIterator[int]:
    """TCP from ``listen_host`` (a free port, yielded) to ``target``, both ways."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(handle, listen_host, 0)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


RELAY_CHART = REPO / "helm" / "fednode-relay"
RELAY_LABELS = {"app.kubernetes.io/name": "fednode-relay"}


@dataclass
class RelayRelease:
    """The relay chart installed on the real worker: where nodes reach it."""

    namespace: str
    pod_ip: str
    port: int

    @property
    def url(self) -> str:
        return f"ws://{self.pod_ip}:{self.port}/v1/connect"

    @property
    def egress_to(self) -> list[dict[str, Any]]:
        """The node chart's ``networkPolicy.relay.to`` naming this relay's pods."""
        return [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": self.namespace}
                },
                "podSelector": {"matchLabels": dict(RELAY_LABELS)},
            }
        ]


@contextlib.asynccontextmanager
async def relay_release(
    testbed: K8sTestbed,
    worker: K8sRealWorker,
    workdir: Path,
    *,
    route: ServerRoute,
    api_path: str,
    image: str,
    port: int = 7800,
) -> AsyncIterator[RelayRelease]:
    """``helm install`` of the relay chart (helm/fednode-relay) as a consortium would, in a
    namespace of its own, checking identities with the server behind ``route``; yields
    once its pod is Ready; uninstalled and deleted on exit."""
    from kubernetes_asyncio import client

    namespace = await testbed.create_namespace("fednode-relay")
    repository, _, tag = image.rpartition(":")
    values = {
        "server": {"url": f"http://{route.cluster_ip}", "port": route.port, "apiPath": api_path},
        "relay": {"port": port, "logLevel": "DEBUG"},
        "service": {"port": port},
        "networkPolicy": {"server": {"to": route.egress_to}},
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "nodeSelector": worker.node_selector,
        "tolerations": [worker.toleration],
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}},
    }
    values_file = await asyncio.to_thread(_write_yaml, workdir / "relay-values.yaml", values)
    env = {**os.environ, "KUBECONFIG": str(testbed.kubeconfig)}
    try:
        await asyncio.to_thread(
            helm,
            "install", "relay", str(RELAY_CHART), "-f", str(values_file),
            "--namespace", namespace, "--wait", "--timeout", "180s",
            env=env,
        )  # fmt: skip
        async with testbed.api_client() as api:
            pods = await client.CoreV1Api(api).list_namespaced_pod(
                namespace, label_selector="app.kubernetes.io/name=fednode-relay"
            )
        (pod,) = [p for p in pods.items if p.metadata.deletion_timestamp is None]
        yield RelayRelease(namespace, str(pod.status.pod_ip), port)
    finally:
        await asyncio.to_thread(
            helm, "uninstall", "relay", "--namespace", namespace, check=False, env=env
        )
        await testbed.delete_namespace(namespace)


def _write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path


def release_values(
    *,
    worker: K8sRealWorker,
    route: ServerRoute,
    api_path: str,
    api_key: str,
    node_name: str,
    namespace: str,
    image: str,
    data_dir: Path,
    csv_name: str,
) -> dict[str, Any]:
    """The values an operator of this cluster would write for the node of one organization."""
    repository, _, tag = image.rpartition(":")
    return {
        "nodeName": node_name,
        "server": {"url": f"http://{route.cluster_ip}", "port": route.port, "apiPath": api_path},
        "apiKey": api_key,
        "namespace": {"create": True, "name": namespace},
        "taskVolume": {"storageClassName": "", "size": "1Gi", "accessMode": "ReadWriteMany"},
        "databases": [
            {
                "label": "default",
                "type": "csv",
                "file": csv_name,
                "hostPath": {"path": str(data_dir), "node": worker.node_name, "size": "1Gi"},
            }
        ],
        # The worker has 2 CPUs: a run's default (1 CPU) would let one run at a time.
        "policies": {"resources": {"defaultCpu": 0.1, "defaultMemoryMb": 128}},
        "maxConcurrentRuns": 8,
        "runs": {"nodeSelector": worker.node_selector, "tolerations": [worker.toleration]},
        "networkPolicy": {
            "server": {
                "to": route.egress_to,
                "ports": [route.port],
            }
        },
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "nodeSelector": worker.node_selector,
        "tolerations": [worker.toleration],
        "resources": {
            "requests": {"cpu": "100m", "memory": "192Mi"},
            "limits": {"memory": "512Mi"},
        },
        "probes": {
            "liveness": {"initialDelaySeconds": 10, "periodSeconds": 10, "failureThreshold": 6},
            "readiness": {"initialDelaySeconds": 1, "periodSeconds": 1, "failureThreshold": 3},
        },
    }


@dataclass
class HelmNode:
    """One release of the chart on the real worker and the handles a test needs."""

    testbed: K8sTestbed
    worker: K8sRealWorker
    workdir: Path
    namespace: str  # the chart's namespace: the node pod and its runs
    release_namespace: str  # where helm keeps its record
    node_name: str
    task_dir: Path  # the host directory behind the task-directory claim
    values: dict[str, Any]
    volumes: list[str] = field(default_factory=list)
    installed: bool = False

    # -- helm --------------------------------------------------------------------------

    def helm(self, *args: str, check: bool = True) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.testbed.kubeconfig)}
        result = helm(*args, "--namespace", self.release_namespace, check=check, env=env)
        return result.stdout + result.stderr

    def _values_file(self, values: dict[str, Any]) -> Path:
        path = self.workdir / f"values-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    async def install(self) -> str:
        """``helm install`` as the operator; returns helm's output."""
        await self._task_volume()
        output = await asyncio.to_thread(
            self.helm, "install", RELEASE, str(CHART), "-f", str(self._values_file(self.values))
        )
        self.installed = True
        return output

    async def upgrade(self, changes: dict[str, Any]) -> str:
        """``helm upgrade`` with ``changes`` merged over the values installed."""
        self.values = merged(self.values, changes)
        return await asyncio.to_thread(
            self.helm, "upgrade", RELEASE, str(CHART), "-f", str(self._values_file(self.values))
        )

    async def uninstall(self) -> str:
        output = await asyncio.to_thread(self.helm, "uninstall", RELEASE, "--wait")
        self.installed = False
        return output

    def manifest(self) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.helm("get", "manifest", RELEASE)) if d]

    async def _task_volume(self) -> None:
        """A hostPath volume over ``task_dir`` reserved for the chart's task claim."""
        name = f"{self.namespace}-tasks"
        async with self.testbed.api_client() as api:
            await pre_bound_volume(
                api,
                name=name,
                namespace=self.namespace,
                claim=f"{FULLNAME}-tasks",
                mode="ReadWriteMany",
                host_path={"path": str(self.task_dir), "type": "Directory"},
            )
        self.volumes.append(name)

    async def remove(self) -> None:
        """Uninstall (if installed) and delete what the chart keeps and what was made for it:
        the namespace (with the task claim), the volumes, the release namespace."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        if self.installed:
            await asyncio.to_thread(self.helm, "uninstall", RELEASE, check=False)
            self.installed = False
        await self.testbed.delete_namespace(self.namespace)
        await self.testbed.delete_namespace(self.release_namespace)
        async with self.testbed.api_client() as api:
            core = client.CoreV1Api(api)
            for volume in self.volumes:
                with contextlib.suppress(ApiException):
                    await core.delete_persistent_volume(volume)

    # -- the node pod ------------------------------------------------------------------

    async def node_pods(self) -> list[dict[str, Any]]:
        """The Deployment's pods that are not being deleted (as JSON)."""
        from kubernetes_asyncio import client

        async def listed() -> Any:
            async with self.testbed.api_client() as api:
                core: Any = client.CoreV1Api(api)
                response = await core.list_namespaced_pod(
                    self.namespace, label_selector=NODE_POD_SELECTOR, _preload_content=False
                )
                return await response.json()

        pods = (await patiently(listed))["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    async def ready_pod(self, *, timeout: float, not_uid: str | None = None) -> dict[str, Any]:
        """The node pod once it is Ready (a pod other than ``not_uid``)."""
        deadline = time.monotonic() + timeout
        while True:
            for pod in await self.node_pods():
                if pod["metadata"]["uid"] != not_uid and _ready(pod):
                    return pod
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no Ready node pod in {self.namespace} within {timeout} s "
                    f"(pods: {[_phase(p) for p in await self.node_pods()]})"
                )
            await asyncio.sleep(0.5)

    async def force_delete(self, pod: dict[str, Any]) -> None:
        """Delete the pod with grace period 0: kubelet kills the node without SIGTERM."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        async def delete() -> None:
            async with self.testbed.api_client() as api:
                with contextlib.suppress(ApiException):
                    await client.CoreV1Api(api).delete_namespaced_pod(
                        pod["metadata"]["name"], self.namespace, grace_period_seconds=0
                    )

        await patiently(delete)

    async def follow_logs(self, log_path: Path) -> None:
        """Append every node pod's log to ``log_path`` until cancelled (one task per pod)."""
        from kubernetes_asyncio import client

        followed: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    pods = await self.node_pods()
                except OSError:  # the API server away for a moment: look again
                    pods = []
                for pod in pods:
                    uid = pod["metadata"]["uid"]
                    if uid in followed or _phase(pod) == "Pending":
                        continue
                    followed[uid] = asyncio.create_task(
                        self._follow(client, pod["metadata"]["name"], uid, log_path)
                    )
                await asyncio.sleep(0.5)
        finally:
            for task in followed.values():
                task.cancel()
            await asyncio.gather(*followed.values(), return_exceptions=True)

    async def _follow(self, client: Any, name: str, uid: str, log_path: Path) -> None:
        with contextlib.suppress(Exception):
            async with self.testbed.api_client() as api:
                response = await client.CoreV1Api(api).read_namespaced_pod_log(
                    name, self.namespace, follow=True, _preload_content=False
                )
                with log_path.open("ab") as log:
                    log.write(f'{{"event": "chaos.node_pod", "uid": "{uid}"}}\n'.encode())
                    async for line in response.content:
                        log.write(line)
                        log.flush()


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _phase(pod: dict[str, Any]) -> str:
    return str(pod.get("status", {}).get("phase", "?"))


@contextlib.asynccontextmanager
async def helm_node(
    testbed: K8sTestbed,
    worker: K8sRealWorker,
    workdir: Path,
    *,
    route: ServerRoute,
    api_path: str,
    api_key: str,
    csv: Path,
    image: str,
    extra_values: dict[str, Any] | None = None,
) -> AsyncIterator[HelmNode]:
    """A release for one organization, not yet installed (``install()``); removed on exit
    with everything made for it."""
    suffix = uuid.uuid4().hex[:6]
    namespace = f"fednode-site-{suffix}"
    task_dir = workdir / "tasks"
    task_dir.mkdir(parents=True)
    os.chown(task_dir, RUN_UID, RUN_UID)
    data_dir = workdir / "data"
    data_dir.mkdir()
    shutil.copy(csv, data_dir / csv.name)
    data_dir.chmod(0o755)
    (data_dir / csv.name).chmod(0o644)
    node_name = f"site-{suffix}"
    values = release_values(
        worker=worker,
        route=route,
        api_path=api_path,
        api_key=api_key,
        node_name=node_name,
        namespace=namespace,
        image=image,
        data_dir=data_dir,
        csv_name=csv.name,
    )
    release_namespace = await testbed.create_namespace("fednode-release")
    node = HelmNode(
        testbed,
        worker,
        workdir,
        namespace,
        release_namespace,
        node_name,
        task_dir,
        merged(values, extra_values or {}),
    )
    try:
        yield node
    finally:
        await node.remove()
