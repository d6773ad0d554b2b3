"""The real Kubernetes testbed as a test peer (pytest plugin).

``scripts/k8s-testbed`` runs a pinned kube-apiserver, kube-controller-manager,
kube-scheduler and etcd (built from Go modules) with kwok playing the kubelet for three CPU
nodes and one GPU node. This plugin starts it once per test session (or reuses one that is
already up) and hands tests what they need to act as fednode would: a namespace labelled
Pod Security ``restricted`` and a kubeconfig for a namespaced ServiceAccount (executor
tests must never run as cluster admin).

Set ``FEDNODE_TEST_KUBECONFIG`` to test against another cluster (for example kind, see
docs/testing.md); nothing is started or stopped then. ``FEDNODE_KEEP_PEERS=1`` leaves a
testbed this session started running at the end. A testbed that cannot start fails the
test with the reason and the log to read: it is never skipped and never mocked.

Pods on kwok nodes follow annotations (``fednode.test/run-seconds``, ``exit-code``,
``oom-killed``, ``image-missing``, ``start-seconds``); see the ``POD_*`` constants
(from ``testbed.kwok``, as are the node names, paths and ports here).

Fixtures:

- ``k8s_testbed`` (session) -> ``K8sTestbed``
- ``k8s_namespace`` (function, async) -> name of a fresh ``restricted`` namespace, deleted
  afterwards
- ``k8s_real_worker`` (session) -> ``K8sRealWorker``: the testbed with its real worker
  node (``scripts/k8s-testbed up --real-worker``): containerd, kubelet, Cilium enforcing
  NetworkPolicy, CoreDNS. Pods pinned there (``K8sRealWorker.node_selector`` and
  ``toleration``) really run. It stays up after the session unless this session started the
  whole testbed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

# Pod annotations the testbed's kwok stages understand, and its nodes (testbed.kwok).
from testbed.kwok import (
    GPU_LABEL,
    GPU_NODE,
    GPU_RESOURCE,
    POD_EXIT_CODE,
    POD_IMAGE_MISSING,
    POD_OOM_KILLED,
    POD_RUN_SECONDS,
    POD_START_SECONDS,
)
from testbed.layout import KUBECONFIG, PORTS, RUN_DIR
from testbed.worker import layout as worker_layout

__all__ = [
    "APISERVER_PORT",
    "EXECUTOR_RULES",
    "GPU_NODE",
    "GPU_NODE_SELECTOR",
    "GPU_RESOURCE",
    "GPU_TOLERATION",
    "POD_EXIT_CODE",
    "POD_IMAGE_MISSING",
    "POD_OOM_KILLED",
    "POD_RUN_SECONDS",
    "POD_START_SECONDS",
    "REAL_NODE_IP",
    "REAL_NODE_SELECTOR",
    "REAL_TOLERATION",
    "K8sRealWorker",
    "K8sTestbed",
]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "k8s-testbed"
DEFAULT_KUBECONFIG = KUBECONFIG  # honours FEDNODE_CACHE_DIR, as the testbed does
UP_TIMEOUT = 300.0

#: The real worker (testbed.worker): how to land there, and the host as pods see it.
REAL_NODE = worker_layout.NODE_NAME
REAL_NODE_SELECTOR = {worker_layout.REAL_LABEL: "true"}
REAL_TOLERATION = dict(worker_layout.REAL_TOLERATION)
REAL_NODE_IP = worker_layout.NODE_IP  # the pod bridge's address on the host (the node IP)
REAL_UP_TIMEOUT = 600.0

#: The kube-apiserver port; on the real worker pods reach it at ``REAL_NODE_IP``:this port.
APISERVER_PORT = PORTS["kube-apiserver"]

GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
#: Pins a pod to the kwok GPU node (with ``GPU_TOLERATION``).
GPU_NODE_SELECTOR = {GPU_LABEL: "true"}

#: What a fednode executor may do in its own namespace (the default Role of
#: ``K8sTestbed.service_account_kubeconfig``).
EXECUTOR_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "delete", "deletecollection", "patch"],
    },
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "delete", "deletecollection"],
    },
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]},
    {
        "apiGroups": [""],
        "resources": ["configmaps", "secrets"],
        "verbs": ["get", "list", "watch", "create", "delete", "deletecollection"],
    },
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get", "list", "watch", "create", "delete", "patch"],
    },
]


@dataclass
class K8sTestbed:
    """A reachable cluster: the testbed, or the one ``FEDNODE_TEST_KUBECONFIG`` names."""

    kubeconfig: Path  # admin (system:masters); for set-up only, never for the code under test
    workdir: Path  # where service-account kubeconfigs are written
    started_here: bool = False
    external: bool = False
    _namespaces: set[str] = field(default_factory=set)

    @contextlib.asynccontextmanager
    async def api_client(self, kubeconfig: Path | None = None) -> AsyncIterator[Any]:
        """A ``kubernetes_asyncio`` ApiClient for ``kubeconfig`` (default: admin)."""
        from kubernetes_asyncio import config

        client = await config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))
        try:
            yield client
        finally:
            await client.close()

    async def create_namespace(
        self,
        prefix: str = "fednode-test",
        *,
        pod_security: str = "restricted",
        labels: dict[str, str] | None = None,
    ) -> str:
        """Create a namespace enforcing Pod Security ``pod_security``; return its name.

        Returns once the namespace's ``default`` ServiceAccount exists (the ServiceAccount
        admission plugin rejects pods before that), observed through a watch.
        """
        from kubernetes_asyncio import client, watch

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        ps = {
            f"pod-security.kubernetes.io/{mode}": pod_security
            for mode in ("enforce", "audit", "warn")
        }
        ps |= {
            f"pod-security.kubernetes.io/{mode}-version": "latest"
            for mode in ("enforce", "audit", "warn")
        }
        async with self.api_client() as api:
            core = client.CoreV1Api(api)
            await core.create_namespace(
                client.V1Namespace(
                    metadata=client.V1ObjectMeta(
                        name=name, labels={"fednode.test/owner": "pytest", **ps, **(labels or {})}
                    )
                )
            )
            self._namespaces.add(name)
            listed = await core.list_namespaced_service_account(
                name, field_selector="metadata.name=default"
            )
            if not listed.items:
                async with watch.Watch() as w:
                    async for event in w.stream(
                        core.list_namespaced_service_account,
                        name,
                        field_selector="metadata.name=default",
                        resource_version=listed.metadata.resource_version,
                        timeout_seconds=30,
                    ):
                        if event["type"] == "ADDED":
                            break
                    else:
                        raise AssertionError(f"no default ServiceAccount in {name} after 30 s")
        return name

    async def delete_namespace(self, name: str) -> None:
        """Delete a namespace (foreground work happens in the namespace controller)."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        async with self.api_client() as api:
            try:
                await client.CoreV1Api(api).delete_namespace(name)
            except ApiException as error:
                if error.status != 404:
                    raise
        self._namespaces.discard(name)

    async def service_account_kubeconfig(
        self,
        namespace: str,
        name: str = "fednode-executor",
        *,
        rules: list[dict[str, Any]] | None = None,
        expiration_seconds: int = 3600,
    ) -> Path:
        """A kubeconfig acting as ServiceAccount ``namespace/name``, bound to a namespaced
        Role with ``rules`` (default ``EXECUTOR_RULES``); its token comes from TokenRequest."""
        from kubernetes_asyncio import client

        async with self.api_client() as api:
            core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
            await core.create_namespaced_service_account(
                namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
            )
            await rbac.create_namespaced_role(
                namespace,
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "Role",
                    "metadata": {"name": name},
                    "rules": rules if rules is not None else EXECUTOR_RULES,
                },
            )
            await rbac.create_namespaced_role_binding(
                namespace,
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": name},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Role",
                        "name": name,
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
                },
            )
            token = await core.create_namespaced_service_account_token(
                name,
                namespace,
                client.AuthenticationV1TokenRequest(
                    spec=client.V1TokenRequestSpec(
                        audiences=[], expiration_seconds=expiration_seconds
                    )
                ),
            )
        path = self.workdir / f"{namespace}.{name}.kubeconfig"
        path.write_text(self._kubeconfig_for_token(token.status.token, namespace, name))
        path.chmod(0o600)
        return path

    def _kubeconfig_for_token(self, token: str, namespace: str, user: str) -> str:
        admin = yaml.safe_load(self.kubeconfig.read_text())
        context_name = admin.get("current-context")
        context = next(c["context"] for c in admin["contexts"] if c["name"] == context_name)
        cluster = dict(
            next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
        )
        authority = cluster.pop("certificate-authority", None)
        if authority:  # embed, so the file stands alone
            ca_path = Path(authority)
            if not ca_path.is_absolute():
                ca_path = self.kubeconfig.parent / ca_path
            cluster["certificate-authority-data"] = base64.b64encode(ca_path.read_bytes()).decode()
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "cluster", "cluster": cluster}],
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": user,
                        "context": {"cluster": "cluster", "user": user, "namespace": namespace},
                    }
                ],
                "current-context": user,
            },
            sort_keys=False,
        )


#: A TCP relay (standard library only) from the pod's port to the node's proxy on the host:
#: it stands where the chart's node pod stands, with the node pod's labels, so the runs'
#: NetworkPolicy (egress to pods with those labels on the proxy port) is what admits them.
RELAY = """
import asyncio, os
TARGET = (os.environ["TARGET_HOST"], int(os.environ["TARGET_PORT"]))
async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
async def handle(reader, writer):
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*TARGET)
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer),
                         return_exceptions=True)
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(os.environ["LISTEN_PORT"]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""
RELAY_IMAGE = "localhost/fednode/python-base:latest"

#: Tries a TCP connection to each ``host:port`` argument once, prints the outcome as one
#: JSON line (target -> reached), then idles: what a pod that is not a run can reach.
CONNECT_PROBE = """
import json, socket, sys, time
reached = {}
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        reached[target] = True
    except OSError:
        reached[target] = False
print(json.dumps(reached), flush=True)
time.sleep(3600)
"""


def restricted_container(
    name: str,
    image: str,
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """A container that passes Pod Security ``restricted`` (uid 10001, read-only root)."""
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
        "command": command,
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}},
    }
    if port is not None:
        container["ports"] = [{"containerPort": port, "protocol": "TCP"}]
        container["readinessProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": 1}
    return container


@dataclass
class K8sRealWorker:
    """The testbed's real worker node: pods scheduled there run in containerd for real."""

    testbed: K8sTestbed
    node_name: str = REAL_NODE
    node_ip: str = REAL_NODE_IP
    node_selector: dict[str, str] = field(default_factory=lambda: dict(REAL_NODE_SELECTOR))
    toleration: dict[str, str] = field(default_factory=lambda: dict(REAL_TOLERATION))
    cluster_domain: str = "cluster.local"

    def import_images(self, *images: str) -> None:
        """Copy podman images into the worker's containerd (a no-op for current ones)."""
        result = _testbed("import-images", *images, timeout=600)
        if result.returncode != 0:
            pytest.fail(
                f"importing {images} into the real worker failed:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}",
                pytrace=False,
            )

    @contextlib.asynccontextmanager
    async def task_volume(
        self, namespace: str, path: Path, *, claim: str = "fednode-tasks"
    ) -> AsyncIterator[str]:
        """A claim in ``namespace`` bound to ``path`` on the host (a hostPath volume): the
        node's task directory, which the run pods mount their ``run-<id>`` folder from."""
        async with (
            self.testbed.api_client() as api,
            bound_claim(
                api, namespace, claim=claim, host_path={"path": str(path), "type": "Directory"}
            ),
        ):
            yield claim

    async def proxy_relay(
        self,
        namespace: str,
        *,
        labels: dict[str, str],
        pod_port: int,
        node_port: int,
        name: str = "fednode-proxy",
    ) -> str:
        """A relay pod (``labels``, listening on ``pod_port``) to the node's proxy at
        ``node_ip:node_port`` on the host, and a Service ``name`` (port ``node_port``) in
        front of it, as the chart's proxy Service; returns the Service's ClusterIP, what
        runs are told to call (the node reads it from the Service, ``proxy_service``)."""
        await self.run_pod(
            namespace,
            name,
            restricted_container(
                "relay",
                RELAY_IMAGE,
                ["python3", "-c", RELAY],
                port=pod_port,
                env={
                    "TARGET_HOST": self.node_ip,
                    "TARGET_PORT": str(node_port),
                    "LISTEN_PORT": str(pod_port),
                },
            ),
            labels=labels,
        )
        service = await self._create(
            namespace,
            "services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {
                    "selector": labels,
                    "ports": [{"port": node_port, "targetPort": pod_port, "protocol": "TCP"}],
                },
            },
        )
        return str(service.spec.cluster_ip)

    async def cluster_dns(self) -> dict[str, str]:
        """The cluster DNS as ``host:53`` targets: its Service address and its pod's."""
        from kubernetes_asyncio import client

        async with self.testbed.api_client() as api:
            core = client.CoreV1Api(api)
            service = await core.read_namespaced_service("kube-dns", "kube-system")
            pods = await core.list_namespaced_pod("kube-system", label_selector="k8s-app=kube-dns")
        (pod,) = pods.items
        return {
            "dns-service": f"{service.spec.cluster_ip}:53",
            "dns-pod": f"{pod.status.pod_ip}:53",
        }

    async def connect_probe(
        self,
        namespace: str,
        name: str,
        targets: list[str],
        *,
        labels: dict[str, str],
        within: float = 60,
    ) -> dict[str, bool]:
        """A pod (``labels``) that tries one TCP connection to each ``host:port``; returns
        which it reached, read from its log."""
        import json

        from kubernetes_asyncio import client

        await self.run_pod(
            namespace,
            name,
            restricted_container("probe", RELAY_IMAGE, ["python3", "-c", CONNECT_PROBE, *targets]),
            labels=labels,
        )
        async with self.testbed.api_client() as api, asyncio.timeout(within):
            core = client.CoreV1Api(api)
            while True:
                # The raw body: kubernetes_asyncio would parse a JSON log line into a
                # dict and hand back its repr.
                answer: Any = await core.read_namespaced_pod_log(
                    name, namespace, _preload_content=False
                )
                log = (await answer.read()).decode()
                if log.strip():
                    reached: dict[str, bool] = json.loads(log.strip().splitlines()[0])
                    return reached
                await asyncio.sleep(1)

    async def listener_pod(
        self,
        namespace: str,
        name: str = "listener",
        *,
        port: int = 8080,
        labels: dict[str, str] | None = None,
    ) -> str:
        """A pod (``labels``, default ``app: <name>``) that accepts TCP connections on
        ``port``; returns its IP."""
        pod = await self.run_pod(
            namespace,
            name,
            restricted_container(
                "listen",
                RELAY_IMAGE,
                [
                    "python3",
                    "-c",
                    "import socket,sys\ns=socket.create_server(('',int(sys.argv[1])))"
                    "\nwhile True: s.accept()[0].close()",
                    str(port),
                ],
                port=port,
            ),
            labels=labels or {"app": name},
        )
        return str(pod["status"]["podIP"])

    async def run_pod(
        self,
        namespace: str,
        name: str,
        container: dict[str, Any],
        *,
        labels: dict[str, str],
        ready_within: float = 60,
    ) -> dict[str, Any]:
        """Create a pod pinned to the real worker; return it once Ready (as JSON)."""
        from kubernetes_asyncio import client, watch

        await self._create(
            namespace,
            "pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "nodeSelector": self.node_selector,
                    "tolerations": [self.toleration],
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                },
            },
        )
        async with self.testbed.api_client() as api:
            core = client.CoreV1Api(api)
            async with asyncio.timeout(ready_within), watch.Watch() as w:
                async for event in w.stream(
                    core.list_namespaced_pod,
                    namespace,
                    field_selector=f"metadata.name={name}",
                    _preload_content=False,
                ):
                    pod = event["raw_object"]
                    conditions = pod.get("status", {}).get("conditions", [])
                    if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                        return dict(pod)
        raise AssertionError(f"pod {namespace}/{name} never became Ready")

    async def _create(self, namespace: str, plural: str, body: dict[str, Any]) -> Any:
        from kubernetes_asyncio import client

        async with self.testbed.api_client() as api:
            core = client.CoreV1Api(api)
            if plural == "pods":
                return await core.create_namespaced_pod(namespace, body)
            return await core.create_namespaced_service(namespace, body)


def _testbed(*args: str, timeout: float = UP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def k8s_testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8sTestbed]:
    """The Kubernetes testbed, started once per session (or reused, or external)."""
    workdir = tmp_path_factory.mktemp("k8s")
    external = os.environ.get("FEDNODE_TEST_KUBECONFIG")
    if external:
        path = Path(external).expanduser()
        if not path.is_file():
            pytest.fail(f"FEDNODE_TEST_KUBECONFIG={external}: no such file", pytrace=False)
        testbed = K8sTestbed(kubeconfig=path, workdir=workdir, external=True)
        yield testbed
        _delete_namespaces(testbed)
        return

    started_here = False
    if _testbed("status", timeout=60).returncode != 0:
        # Ours to stop at the end only if nothing was there: under load `status` can fail
        # on a shared testbed that is up (a slow health check), and `up` then finds it
        # healthy and returns; stopping it at the end took it from everyone.
        started_here = not RUN_DIR.exists()
        began = time.monotonic()
        result = _testbed("up")
        if result.returncode != 0:
            pytest.fail(
                f"the Kubernetes testbed did not start (scripts/k8s-testbed up, exit "
                f"{result.returncode}, {time.monotonic() - began:.0f}s):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}",
                pytrace=False,
            )
    testbed = K8sTestbed(kubeconfig=DEFAULT_KUBECONFIG, workdir=workdir, started_here=started_here)
    yield testbed
    if started_here and os.environ.get("FEDNODE_KEEP_PEERS") != "1":
        _testbed("down", timeout=120)
    else:
        _delete_namespaces(testbed)


def _delete_namespaces(testbed: K8sTestbed) -> None:
    async def delete_all() -> None:
        for name in sorted(testbed._namespaces):
            await testbed.delete_namespace(name)

    if testbed._namespaces:
        asyncio.run(delete_all())


@pytest.fixture
async def k8s_namespace(k8s_testbed: K8sTestbed) -> AsyncIterator[str]:
    """A fresh namespace enforcing Pod Security ``restricted``; deleted after the test."""
    name = await k8s_testbed.create_namespace()
    yield name
    await k8s_testbed.delete_namespace(name)


@pytest.fixture(scope="session")
def k8s_real_worker(k8s_testbed: K8sTestbed) -> K8sRealWorker:
    """The testbed with its real worker node (added if it is not there yet)."""
    if k8s_testbed.external:
        pytest.fail(
            "real-worker tests need the testbed's own worker node; they do not run "
            "against FEDNODE_TEST_KUBECONFIG",
            pytrace=False,
        )
    began = time.monotonic()
    result = _testbed("up", "--real-worker", timeout=REAL_UP_TIMEOUT)
    if result.returncode != 0:
        pytest.fail(
            f"the real worker did not start (scripts/k8s-testbed up --real-worker, exit "
            f"{result.returncode}, {time.monotonic() - began:.0f}s; it needs `scripts/"
            f"k8s-testbed build --real-worker` and the Debian packages named below):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}",
            pytrace=False,
        )
    return K8sRealWorker(testbed=k8s_testbed)


@contextlib.asynccontextmanager
async def bound_claim(
    api: Any, namespace: str, *, claim: str, host_path: dict[str, str]
) -> AsyncIterator[str]:
    """A ReadWriteMany claim ``claim`` in ``namespace``, bound at once to a hostPath
    volume (``host_path``: the PersistentVolume's ``hostPath``); the volume is deleted on
    exit (the claim goes with its namespace).

    Bound here directly — the claim, a volume reserved for it by uid, the claim's status —
    because the scheduler places a pod only once its claims are bound, and waiting for the
    volume controller to bind them costs up to its 15 s resync per test.
    """
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    core = client.CoreV1Api(api)
    volume = f"{namespace}-{claim}"
    size = {"storage": "1Gi"}
    created = await core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": size},
            },
        },
    )
    await core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": {"fednode.test/owner": "pytest"}},
            "spec": {
                "capacity": size,
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": host_path,
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": namespace,
                    "name": claim,
                    "uid": created.metadata.uid,
                },
            },
        }
    )
    try:
        await core.patch_namespaced_persistent_volume_claim_status(
            claim,
            namespace,
            {"status": {"phase": "Bound", "accessModes": ["ReadWriteMany"], "capacity": size}},
        )
        yield claim
    finally:
        with contextlib.suppress(ApiException):
            await core.delete_persistent_volume(volume)
