"""The chart installed by a real helm on the real API server, and a node acting with the
credentials the chart gives it.

``helm install`` runs as the installer (admin) into a namespace the chart creates with Pod
Security ``restricted`` enforced. kwok plays the kubelets, so the node pod is scheduled
and reported Running but runs no code: the node itself runs in this process, configured
as the pod would be — the ``node.yaml`` of the installed ConfigMap, the API key of the
installed Secret, and in-cluster credentials read from token files of the chart's
ServiceAccount (a TokenRequest token, the cluster CA and the namespace, written where the
in-cluster loader looks). Only what the pod's volumes provide is replaced: the task
directory (the claim's mount) and the database file (the database claim's mount). The
test plays the algorithm container: it writes the run's output file when the run's pod
is Running, as in the executor's tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import incluster_config

from executors.base import LABEL_NODE, LABEL_RUN, run_labels
from executors.kubernetes import client as kube_client
from executors.kubernetes.client import KubeClient, KubeError, connect
from executors.kubernetes.config import KubernetesSettings
from executors.kubernetes.manifests import job_name, run_job, secret_name, token_secret
from node.app import Node
from node.contract import decode_value
from node.settings import load_settings
from policies.network import policy_name_prefix, run_network_policy_names
from tests.integration.k8s_executor_helpers import make_spec
from tests.peers.helm import CHART, helm, pre_bound_volume
from tests.peers.kubernetes import K8sTestbed
from tests.peers.v6server import V6Collaboration, V6Server

pytestmark = [pytest.mark.kubernetes, pytest.mark.helm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EMPLOYEES_A = REPO / "algorithms" / "data" / "employees_a.csv"
RELEASE = "hospital"
FULLNAME = "hospital-fednode"
PARTIAL = {"method": "partial_average", "kwargs": {"column_name": "age"}}
PARTIAL_OF_A = {"count": 10, "sum": 400}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Release:
    """One installed release and what the test needs to act as its node."""

    name: str
    namespace: str  # where the chart put the node and its runs
    release_namespace: str  # where helm keeps its record
    node_name: str
    admin_kubeconfig: Path
    install_output: str
    proxy_port: int
    health_port: int
    access_mode: str
    volumes: list[str] = field(default_factory=list)  # PersistentVolumes made for the test

    def helm(self, *args: str, check: bool = True) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.admin_kubeconfig)}
        result = helm(*args, "--namespace", self.release_namespace, check=check, env=env)
        return result.stdout + result.stderr

    def manifest(self) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.helm("get", "manifest", self.name)) if d]


class Collector:
    """An OTLP/HTTP receiver (what Jaeger, Tempo or a collector serve on 4318): keeps the
    spans of every ``POST /v1/traces``. It serves from its own thread: the node flushes
    its spans at shutdown from the event loop's thread, which must not be the server's."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, dict[str, Any]]] = []  # (name, attributes)
        self.services: set[str] = set()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.receive(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def receive(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    self.services.add(attribute.value.string_value)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        (
                            span.name,
                            {
                                a.key: a.value.string_value or a.value.int_value
                                for a in span.attributes
                            },
                        )
                    )

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def names(self) -> set[str]:
        return {name for name, _ in self.spans}

    def run_of(self, task_id: int) -> dict[str, Any]:
        """The attributes of the root span of the run of ``task_id``."""
        (attributes,) = [
            a for name, a in self.spans if name == "run" and a.get("fednode.task_id") == task_id
        ]
        return attributes


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@pytest.fixture
async def admin(k8s_testbed: K8sTestbed) -> AsyncIterator[Any]:
    async with k8s_testbed.api_client() as api:
        yield api


@pytest.fixture
async def release(
    k8s_testbed: K8sTestbed,
    admin: Any,
    v6_server: V6Server,
    v6_plain: V6Collaboration,
    collector: Collector,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Release]:
    """The chart installed for organization A of the plain collaboration, with a file
    database from a host path (the chart makes its volume and claim), sending traces to
    ``collector``; the task claim is ReadWriteMany unless the test's parameter says
    otherwise."""
    access_mode = getattr(request, "param", "ReadWriteMany")
    release_namespace = await k8s_testbed.create_namespace("fednode-helm-release")
    namespace = f"fednode-helm-{uuid.uuid4().hex[:8]}"
    installed = Release(
        name=RELEASE,
        namespace=namespace,
        release_namespace=release_namespace,
        node_name=f"helm-{uuid.uuid4().hex[:6]}",
        admin_kubeconfig=k8s_testbed.kubeconfig,
        install_output="",
        proxy_port=free_port(),
        health_port=free_port(),
        access_mode=access_mode,
    )
    values = {
        "nodeName": installed.node_name,
        "server": {
            "url": f"http://{v6_server.host}",
            "port": v6_server.port,
            "apiPath": v6_server.api_path,
        },
        "apiKey": v6_plain.org_a.api_key,
        "namespace": {"create": True, "name": namespace},
        "taskVolume": {"storageClassName": "", "size": "1Gi", "accessMode": access_mode},
        "databases": [
            {
                "label": "default",
                "type": "csv",
                "file": EMPLOYEES_A.name,
                "hostPath": {"path": str(EMPLOYEES_A.parent), "size": "1Gi"},
            }
        ],
        "proxy": {"port": installed.proxy_port},
        "health": {"port": installed.health_port},
        "telemetry": {
            "otlpEndpoint": f"http://127.0.0.1:{collector.port}",
            "serviceName": "fednode-helm-test",
        },
        "image": {"repository": "localhost/fednode/node", "tag": "latest"},
    }
    task_volume = f"{namespace}-tasks"
    await pre_bound_volume(  # kwok mounts nothing: the path is irrelevant
        admin,
        name=task_volume,
        namespace=namespace,
        claim=f"{FULLNAME}-tasks",
        mode=access_mode,
        host_path={"path": f"/tmp/{task_volume}"},
    )
    installed.volumes.append(task_volume)
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    try:
        installed.install_output = installed.helm(
            "install", RELEASE, str(CHART), "-f", str(tmp_path / "values.yaml")
        )
        yield installed
    finally:
        installed.helm("uninstall", RELEASE, check=False)
        await k8s_testbed.delete_namespace(namespace)  # kept by helm (resource policy)
        core = client.CoreV1Api(admin)
        for volume in installed.volumes:
            with contextlib.suppress(ApiException):
                await core.delete_persistent_volume(volume)


async def service_account_token(admin: Any, release: Release) -> str:
    """What the kubelet mounts into the node pod: a TokenRequest token of its account."""
    request = await client.CoreV1Api(admin).create_namespaced_service_account_token(
        FULLNAME,
        release.namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        ),
    )
    token: str = request.status.token
    return token


def service_account_files(
    directory: Path, *, admin_kubeconfig: Path, token: str, namespace: str
) -> tuple[str, int]:
    """Write what the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount
    (token, ca.crt, namespace) into ``directory``; the API server's host and port (what
    the KUBERNETES_SERVICE_* variables say in a pod)."""
    kubeconfig = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = kubeconfig["clusters"][0]["cluster"]
    server = urlsplit(cluster["server"])
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"])
    else:
        authority = Path(cluster["certificate-authority"])
        ca = (
            authority if authority.is_absolute() else admin_kubeconfig.parent / authority
        ).read_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_bytes(ca)
    (directory / "namespace").write_text(namespace)
    return str(server.hostname), server.port or 443


@contextlib.contextmanager
def in_cluster(
    monkeypatch: pytest.MonkeyPatch,
    directory: Path,
    *,
    admin_kubeconfig: Path,
    token: str,
    namespace: str,
) -> Iterator[None]:
    """This process as if it were the node pod: the service account's files in
    ``directory`` and the KUBERNETES_SERVICE_* variables.

    The executor's in-cluster loader (executors/kubernetes/client.py) checks
    ``SERVICE_ACCOUNT_DIR`` and hands over to kubernetes_asyncio's loader, which reads its
    own two file constants; all three are pointed at ``directory``.
    """
    host, port = service_account_files(
        directory, admin_kubeconfig=admin_kubeconfig, token=token, namespace=namespace
    )
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setattr(kube_client, "SERVICE_ACCOUNT_DIR", directory)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(directory / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(directory / "ca.crt"))
    assert kube_client.in_cluster()
    yield


@contextlib.asynccontextmanager
async def node_client(
    release: Release, admin: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[KubeClient]:
    """The executor's own JSON client, connected with the node's in-cluster credentials."""
    token = await service_account_token(admin, release)
    with in_cluster(
        monkeypatch,
        tmp_path / "serviceaccount",
        token=token,
        admin_kubeconfig=release.admin_kubeconfig,
        namespace=release.namespace,
    ):
        api = await connect(kubeconfig=None, context=None, max_connections=4)
        kube = KubeClient(api, request_timeout=10)
        try:
            yield kube
        finally:
            await kube.close()


async def as_json(call: Any) -> Any:
    """The JSON of a kubernetes_asyncio call made with ``_preload_content=False``."""
    response = await call
    return await response.json()


async def status_of(call: Any) -> int:
    """The HTTP status of one request (2xx as 200)."""
    try:
        await call
    except KubeError as error:
        return error.status
    return 200


# -- install -------------------------------------------------------------------------------


async def test_helm_install_is_admitted_under_pod_security_restricted(
    release: Release,
    admin: Any,
) -> None:
    core: Any = client.CoreV1Api(admin)
    apps = client.AppsV1Api(admin)
    manifest = release.manifest()
    # Cilium's CRDs are there once the testbed's real worker has run
    groups = await client.ApisApi(admin).get_api_versions()
    cilium = "cilium.io" in {group.name for group in groups.groups}

    assert "PodSecurity" not in release.install_output  # no admission warning either
    assert "Warning" not in release.install_output
    assert sorted(o["kind"] for o in manifest) == sorted(
        (["CiliumNetworkPolicy"] if cilium else [])  # the node pod's, to the API server
        + [
            "Namespace",
            "ServiceAccount",
            "Secret",
            "ConfigMap",
            "PersistentVolume",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
            "Role",
            "RoleBinding",
            "Service",
            "NetworkPolicy",  # the node pod's
            "NetworkPolicy",  # the namespace's default deny
            "NetworkPolicy",  # the runs' default deny
            "NetworkPolicy",  # the runs' egress
            "Deployment",
            "ValidatingAdmissionPolicy",  # the node's Jobs
            "ValidatingAdmissionPolicyBinding",
            "ValidatingAdmissionPolicy",  # the node's Secrets
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    assert not [o for o in manifest if o["kind"].startswith("Cluster")]
    namespace = await core.read_namespace(release.namespace)
    assert namespace.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"

    # the node pod is admitted and scheduled (kwok reports it Running)
    deployment = await apps.read_namespaced_deployment(FULLNAME, release.namespace)
    selector = ",".join(f"{k}={v}" for k, v in deployment.spec.selector.match_labels.items())
    pod = await wait_for_running_pod(core, release.namespace, selector)
    assert pod.spec.security_context.run_as_non_root is True
    (node,) = pod.spec.containers
    assert node.security_context.read_only_root_filesystem is True

    # the proxy Service really selects it: its EndpointSlice holds the pod's address
    service = await core.read_namespaced_service(f"{FULLNAME}-proxy", release.namespace)
    assert service.spec.selector.items() <= pod.metadata.labels.items()
    addresses = await wait_for_endpoints(admin, release.namespace, f"{FULLNAME}-proxy")
    assert addresses == [pod.status.pod_ip]

    # claims bound: the task directory and the host-path database
    claims = await core.list_namespaced_persistent_volume_claim(release.namespace)
    assert {c.status.phase for c in claims.items} == {"Bound"}

    # and the namespace refuses a pod that is not locked down
    with pytest.raises(ApiException) as refused:
        await core.create_namespaced_pod(
            release.namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "privileged"},
                "spec": {
                    "containers": [
                        {"name": "c", "image": "busybox", "securityContext": {"privileged": True}}
                    ]
                },
            },
        )
    assert refused.value.status == 403 and "violates PodSecurity" in str(refused.value.body)


async def test_the_node_network_policy_is_given_the_api_servers_address(
    release: Release,
    admin: Any,
) -> None:
    policy = await as_json(
        client.NetworkingV1Api(admin).read_namespaced_network_policy(
            f"{FULLNAME}-node", release.namespace, _preload_content=False
        )
    )
    egress = policy["spec"]["egress"]
    slice_ = await as_json(
        client.DiscoveryV1Api(admin).read_namespaced_endpoint_slice(
            "kubernetes", "default", _preload_content=False
        )
    )

    # Without endpoints in the slice (the kwok-only testbed publishes none; its real
    # worker adds them) the chart falls back to any address on the usual ports.
    api_server = egress[1]
    expected_to = [
        {"ipBlock": {"cidr": f"{address}/32"}}
        for e in slice_.get("endpoints") or []
        for address in e["addresses"]
    ]
    expected_ports = [p["port"] for p in slice_.get("ports") or []] or [443, 6443]
    assert api_server["to"] == (expected_to or [{"ipBlock": {"cidr": "0.0.0.0/0"}}])
    assert api_server["ports"] == [{"port": port, "protocol": "TCP"} for port in expected_ports]


async def test_helm_uninstall_keeps_the_task_claim_and_its_namespace_only(
    release: Release,
    admin: Any,
) -> None:
    output = release.helm("uninstall", release.name)

    assert "[PersistentVolumeClaim] hospital-fednode-tasks" in output
    core = client.CoreV1Api(admin)
    claims = await core.list_namespaced_persistent_volume_claim(release.namespace)
    assert [c.metadata.name for c in claims.items if c.metadata.deletion_timestamp is None] == [
        f"{FULLNAME}-tasks"
    ]
    assert (await core.read_namespace(release.namespace)).status.phase == "Active"
    for gone in (
        core.read_namespaced_service_account(FULLNAME, release.namespace),
        core.read_namespaced_secret(FULLNAME, release.namespace),
        client.RbacAuthorizationV1Api(admin).read_namespaced_role(
            f"{FULLNAME}-executor", release.namespace
        ),
    ):
        with pytest.raises(ApiException) as missing:
            await gone
        assert missing.value.status == 404


# -- least privilege, with the node's own token -----------------------------------------------


async def test_the_node_token_can_do_what_the_executor_needs_in_its_namespace(
    release: Release,
    admin: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ns = release.namespace
    job, token = await run_objects(admin, release, run_id=1)
    name = job["metadata"]["name"]
    deny, egress = run_network_policy_names(policy_name_prefix(release.node_name))
    jobs, pods = f"/apis/batch/v1/namespaces/{ns}/jobs", f"/api/v1/namespaces/{ns}/pods"
    secrets = f"/api/v1/namespaces/{ns}/secrets"
    policies = f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"

    async with node_client(release, admin, monkeypatch, tmp_path) as kube:
        created = await kube.create(jobs, job, what="t")  # a run's Job, as the executor makes it
        allowed = {
            "get jobs": kube.get(f"{jobs}/{name}", what="t"),
            "list jobs": kube.get(jobs, what="t"),
            "watch jobs": watch_status(kube, jobs),
            "list pods": kube.get(pods, what="t"),
            "watch pods": watch_status(kube, pods),
            "create secrets": kube.create(secrets, token(created), what="t"),
            "delete secrets": kube.delete(f"{secrets}/{name}-token", what="t"),
            "delete jobs": kube.delete(f"{jobs}/{name}", what="t"),
            # its runs' NetworkPolicies, the chart's: read (checked at start-up), by name
            "get its runs' default-deny policy": kube.get(f"{policies}/{deny}", what="t"),
            "get its runs' egress policy": kube.get(f"{policies}/{egress}", what="t"),
            "get its namespace": kube.get(f"/api/v1/namespaces/{ns}", what="t"),
            # its proxy Service (its ClusterIP is what runs are given), by name
            "get its proxy service": kube.get(
                f"/api/v1/namespaces/{ns}/services/{FULLNAME}-proxy", what="t"
            ),
        }
        statuses = {what: await status_of(call) for what, call in allowed.items()}
        # a pod's log: authorized, then the API server finds no such pod
        statuses["get pods/log"] = await status_of(kube.text(f"{pods}/none/log", what="t"))

    assert statuses == {**{what: 200 for what in allowed}, "get pods/log": 404}


async def run_objects(
    admin: Any, release: Release, *, run_id: int
) -> tuple[dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]]:
    """A run's Job exactly as the executor makes it from the installed node.yaml, and how
    its token Secret is made once the Job exists (it is owned by the created Job)."""
    config_map = await client.CoreV1Api(admin).read_namespaced_config_map(
        FULLNAME, release.namespace
    )
    settings = KubernetesSettings.model_validate(
        yaml.safe_load(config_map.data["node.yaml"])["executor"]
    )
    spec = make_spec(run_id, image="localhost/fednode/average:latest")
    name = job_name(release.node_name, run_id)
    labels = run_labels(spec, node_name=release.node_name)
    job = run_job(
        spec,
        settings=settings,
        namespace=release.namespace,
        name=name,
        labels=labels,
        token_secret_name=secret_name(release.node_name, run_id),
        pin_to_node=None,
    )

    def token(created: dict[str, Any]) -> dict[str, Any]:
        return token_secret(
            spec,
            namespace=release.namespace,
            name=secret_name(release.node_name, run_id),
            labels=labels,
            owner=created,
        )

    return job, token


async def watch_status(kube: KubeClient, path: str, *, within: float = 30) -> int:
    """The status a real watch request gets. Authorization is decided before the stream's
    first byte, so the response's status is the answer, and an empty stream (nothing
    changes) is fine: the stream is left as soon as it is granted. A failure to get any
    answer (status 0, e.g. an API server still starting) is retried for ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        try:
            async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                async with kube.stream(
                    path,
                    query=(
                        ("watch", "true"),
                        ("allowWatchBookmarks", "true"),
                        ("timeoutSeconds", 30),
                    ),
                    read_timeout=60,
                    what="t",
                ):
                    return 200
        except KubeError as error:
            if error.status != 0 or time.monotonic() >= deadline:
                return error.status
        except TimeoutError:
            return 0
        await asyncio.sleep(0.5)


async def test_a_stolen_node_token_cannot_run_a_job_that_reaches_the_nodes_secret(
    release: Release,
    admin: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """What ``jobs: create`` and ``secrets: create`` in the namespace of the node's own
    Secret would allow a stolen node token, each refused by the chart's admission policies;
    the objects the executor makes still pass."""
    ns = release.namespace
    job, token = await run_objects(admin, release, run_id=2)
    jobs, secrets = f"/apis/batch/v1/namespaces/{ns}/jobs", f"/api/v1/namespaces/{ns}/secrets"

    def attack(name: str, change: Callable[[dict[str, Any], dict[str, Any]], None]) -> Any:
        bad = copy.deepcopy(job)
        bad["metadata"]["name"] = f"attack-{name}"
        pod = bad["spec"]["template"]["spec"]
        change(pod, pod["containers"][0])
        return bad

    def mount_secret(pod: dict[str, Any], container: dict[str, Any]) -> None:
        pod["volumes"].append({"name": "stolen", "secret": {"secretName": FULLNAME}})
        container["volumeMounts"].append({"name": "stolen", "mountPath": "/mnt/stolen"})

    def env_from_secret(pod: dict[str, Any], container: dict[str, Any]) -> None:
        ref = {"secretKeyRef": {"name": FULLNAME, "key": "api-key"}}
        container["env"].append({"name": "STOLEN", "valueFrom": ref})

    def node_account(pod: dict[str, Any], container: dict[str, Any]) -> None:
        pod["serviceAccountName"] = FULLNAME
        pod["automountServiceAccountToken"] = True

    def projected_token(pod: dict[str, Any], container: dict[str, Any]) -> None:
        source = {"serviceAccountToken": {"path": "token"}}
        pod["volumes"].append({"name": "sa", "projected": {"sources": [source]}})

    def sidecar(pod: dict[str, Any], container: dict[str, Any]) -> None:
        pod["containers"].append({**copy.deepcopy(container), "name": "sidecar"})

    def pull_with_secret(pod: dict[str, Any], container: dict[str, Any]) -> None:
        pod["imagePullSecrets"] = [{"name": FULLNAME}]

    unlabelled = copy.deepcopy(job)  # outside the runs' NetworkPolicies (open egress)
    unlabelled["metadata"]["name"] = "attack-unlabelled"
    unlabelled["spec"]["template"]["metadata"]["labels"] = {"innocent": "yes"}
    attacks: dict[str, dict[str, Any]] = {
        "a Job mounting the node's Secret": attack("mount", mount_secret),
        "a Job with the node's API key in its environment": attack("env", env_from_secret),
        "a Job under the node's service account, token mounted": attack("sa", node_account),
        "a Job projecting a service-account token": attack("projected", projected_token),
        "a Job with a second container": attack("sidecar", sidecar),
        "a Job pulling with the node's Secret": attack("pull", pull_with_secret),
        "a Job without the run labels": unlabelled,
    }
    forged: dict[str, dict[str, Any]] = {
        # the token controller would fill it with a token of the node's service account
        "a service-account-token Secret": {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/service-account-token",
            "metadata": {
                "name": "fednode-run-9-abcdef-token",
                "annotations": {"kubernetes.io/service-account.name": FULLNAME},
            },
        },
        "a token Secret no run's Job owns": {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "immutable": True,
            "metadata": {"name": "fednode-run-9-abcdef-token"},
            "data": {"token": "dA=="},
        },
    }

    refusals: dict[str, tuple[int, str]] = {}
    async with node_client(release, admin, monkeypatch, tmp_path) as kube:
        await policies_in_force(kube, jobs, attacks["a Job mounting the node's Secret"])
        for what, body in attacks.items():
            refusals[what] = await refusal_of(kube.create(jobs, body, what="t"))
        for what, body in forged.items():
            refusals[what] = await refusal_of(kube.create(secrets, body, what="t"))
        # the executor's own objects pass
        created = await kube.create(jobs, job, what="t")
        await kube.create(secrets, token(created), what="t")
        await kube.delete(f"{jobs}/{job['metadata']['name']}", what="t")

    for what, (status, message) in refusals.items():
        assert status == 403, (what, status, message)
        assert "ValidatingAdmissionPolicy" in message and "denied request" in message, what
    assert "mounts only the task claim" in refusals["a Job mounting the node's Secret"][1]
    assert (
        "no service-account token"
        in refusals["a Job under the node's service account, token mounted"][1]
    )
    assert "Opaque" in refusals["a service-account-token Secret"][1]
    # and nothing of the attacks was created
    listed = await client.BatchV1Api(admin).list_namespaced_job(ns)
    assert not [j for j in listed.items if j.metadata.name.startswith("attack-")]


async def policies_in_force(kube: KubeClient, jobs: str, attack: Any, within: float = 15) -> None:
    """Until the API server enforces the just-installed admission policies: it compiles
    new policies in the background (about a second after they are created), so a dry run
    of one attack is repeated until it is refused."""
    deadline = time.monotonic() + within
    while await status_of(kube.create(jobs, attack, query=(("dryRun", "All"),), what="t")) < 400:
        assert time.monotonic() < deadline, f"admission policies not in force after {within} s"
        await asyncio.sleep(0.2)


async def refusal_of(call: Any) -> tuple[int, str]:
    """(status, message) of a request that should be refused; (200, "") if it was not."""
    try:
        await call
    except KubeError as error:
        return error.status, error.message
    return 200, ""


async def test_the_node_token_is_refused_secrets_namespaces_and_anything_cluster_wide(
    release: Release,
    admin: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ns, elsewhere = release.namespace, release.release_namespace
    policies = f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"
    deny, _ = run_network_policy_names(policy_name_prefix(release.node_name))
    opened = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "rbac-probe", "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {LABEL_RUN: "0"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
        },
    }
    async with node_client(release, admin, monkeypatch, tmp_path) as kube:
        refused = {
            # secrets: no reading (the answer to a patch carries the data), no changing
            "patch secrets": kube.merge_patch(
                f"/api/v1/namespaces/{ns}/secrets/{FULLNAME}",
                {"metadata": {"labels": {"x": "y"}}},
                what="t",
            ),
            # network policies: no writing, so no opening its runs' egress
            "create networkpolicies": kube.create(policies, opened, what="t"),
            "apply networkpolicies": kube.apply(
                f"{policies}/rbac-probe", opened, field_manager="fednode", what="t"
            ),
            "patch its runs' policy": kube.merge_patch(
                f"{policies}/{deny}", {"spec": {"policyTypes": ["Ingress"]}}, what="t"
            ),
            "delete its runs' policy": kube.delete(f"{policies}/{deny}", what="t"),
            "get another policy": kube.get(f"{policies}/{FULLNAME}-node", what="t"),
            # its own API key, and any other secret, cannot be read or listed
            "get its api-key secret": kube.get(
                f"/api/v1/namespaces/{ns}/secrets/{FULLNAME}", what="t"
            ),
            "list secrets": kube.get(f"/api/v1/namespaces/{ns}/secrets", what="t"),
            "list secrets elsewhere": kube.get(f"/api/v1/namespaces/{elsewhere}/secrets", what="t"),
            "list secrets cluster-wide": kube.get("/api/v1/secrets", what="t"),
            "create secrets elsewhere": kube.create(
                f"/api/v1/namespaces/{elsewhere}/secrets",
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}},
                what="t",
            ),
            # namespaces: only reading its own
            "list namespaces": kube.get("/api/v1/namespaces", what="t"),
            "get another namespace": kube.get(f"/api/v1/namespaces/{elsewhere}", what="t"),
            "create namespaces": kube.create(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
                what="t",
            ),
            "label its namespace": kube.merge_patch(
                f"/api/v1/namespaces/{ns}",
                {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}},
                what="t",
            ),
            # cluster-scoped objects
            "list nodes": kube.get("/api/v1/nodes", what="t"),
            "list persistentvolumes": kube.get("/api/v1/persistentvolumes", what="t"),
            "list clusterroles": kube.get(
                "/apis/rbac.authorization.k8s.io/v1/clusterroles", what="t"
            ),
            # work outside its namespace, or not through Jobs
            "list jobs cluster-wide": kube.get("/apis/batch/v1/jobs", what="t"),
            "list jobs elsewhere": kube.get(
                f"/apis/batch/v1/namespaces/{elsewhere}/jobs", what="t"
            ),
            "list pods elsewhere": kube.get(f"/api/v1/namespaces/{elsewhere}/pods", what="t"),
            "create pods": kube.create(
                f"/api/v1/namespaces/{ns}/pods",
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "x"},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]},
                },
                what="t",
            ),
            "delete pods": kube.delete(f"/api/v1/namespaces/{ns}/pods/x", what="t"),
            "read its configmap": kube.get(
                f"/api/v1/namespaces/{ns}/configmaps/{FULLNAME}", what="t"
            ),
            "change its deployment": kube.merge_patch(
                f"/apis/apps/v1/namespaces/{ns}/deployments/{FULLNAME}",
                {"spec": {"replicas": 2}},
                what="t",
            ),
            # no way to widen its own rights, or its network policy
            "change its role": kube.merge_patch(
                f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{FULLNAME}-executor",
                {"rules": []},
                what="t",
            ),
            "create rolebindings": kube.create(
                f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": "x"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "admin",
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": ns}],
                },
                what="t",
            ),
            "delete its network policy": kube.delete(
                f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/{FULLNAME}-node",
                what="t",
            ),
        }
        statuses = {what: await status_of(call) for what, call in refused.items()}

    assert statuses == {what: 403 for what in refused}


# -- a task end to end ------------------------------------------------------------------------


async def wait_for_running_pod(
    core: Any, namespace: str, selector: str, timeout: float = 30
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        pods = await core.list_namespaced_pod(namespace, label_selector=selector)
        running = [p for p in pods.items if p.status.phase == "Running"]
        if running:
            return running[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no Running pod for {selector} in {namespace}: {pods.items}")
        await asyncio.sleep(0.2)


async def wait_for_endpoints(
    admin: Any, namespace: str, service: str, timeout: float = 30
) -> list[str]:
    discovery = client.DiscoveryV1Api(admin)
    deadline = time.monotonic() + timeout
    while True:
        slices = await discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}"
        )
        addresses = [a for s in slices.items for e in (s.endpoints or []) for a in e.addresses]
        if addresses:
            return addresses
        if time.monotonic() > deadline:
            raise AssertionError(f"Service {service} has no endpoints after {timeout} s")
        await asyncio.sleep(0.2)


class Container:
    """Plays the algorithm container of every run pod of one node: when the pod is
    Running, it writes the partial result where the run's ``/mnt/task/output`` is."""

    def __init__(self, admin: Any, namespace: str, node_name: str, task_dir: Path) -> None:
        self.admin, self.namespace, self.node_name = admin, namespace, node_name
        self.task_dir = task_dir
        self.pods: dict[str, dict[str, Any]] = {}  # run id -> the pod as first seen Running
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Container:
        self._task = asyncio.create_task(self._play(), name="container")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _play(self) -> None:
        core = client.CoreV1Api(self.admin)
        async with watch.Watch() as stream:
            async for event in stream.stream(
                core.list_namespaced_pod,
                self.namespace,
                label_selector=f"{LABEL_NODE}={self.node_name}",
                timeout_seconds=300,
                _preload_content=False,
            ):
                pod = event["raw_object"]
                run_id = pod["metadata"]["labels"].get(LABEL_RUN)
                if pod["status"].get("phase") != "Running" or run_id in self.pods:
                    continue
                self.pods[run_id] = pod
                run_dir = self.task_dir / f"run-{run_id}"
                if run_dir.is_dir():
                    (run_dir / "output").write_text(json.dumps(PARTIAL_OF_A))


async def wait_until_ready(node: Node, running: asyncio.Task[None], timeout: float = 60) -> None:
    async def ready() -> None:
        await node.ready.wait()
        assert node.state.socket is not None
        await node.state.socket.connected.wait()

    waiter = asyncio.create_task(ready())
    done, _ = await asyncio.wait(
        {waiter, running}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if running in done:
        waiter.cancel()
        running.result()  # the node's start-up error
        pytest.fail("the node stopped during start-up")
    if waiter not in done:
        waiter.cancel()
        pytest.fail(f"the node was not ready within {timeout} s")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.mark.v6server
@pytest.mark.parametrize("release", ["ReadWriteMany", "ReadWriteOnce"], indirect=True)
async def test_the_node_with_the_chart_config_and_its_service_account_runs_a_task_end_to_end(
    release: Release,
    admin: Any,
    v6_plain: V6Collaboration,
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(admin)
    deployment = await client.AppsV1Api(admin).read_namespaced_deployment(
        FULLNAME, release.namespace
    )
    (node_container,) = deployment.spec.template.spec.containers
    # ReadWriteOnce: the downward API gives the node its pod's Kubernetes node
    pinned = any(e.name == "FEDNODE_EXECUTOR__KUBERNETES_NODE" for e in node_container.env)
    if pinned:
        node_pod = await wait_for_running_pod(
            core,
            release.namespace,
            ",".join(f"{k}={v}" for k, v in deployment.spec.selector.match_labels.items()),
        )
        monkeypatch.setenv("FEDNODE_EXECUTOR__KUBERNETES_NODE", node_pod.spec.node_name)
    # what the pod would mount: the ConfigMap's node.yaml, the Secret's key as env
    config_map = await core.read_namespaced_config_map(FULLNAME, release.namespace)
    node_yaml = tmp_path / "node.yaml"
    node_yaml.write_text(config_map.data["node.yaml"])
    secret = await core.read_namespaced_secret(FULLNAME, release.namespace)
    monkeypatch.setenv("FEDNODE_API_KEY", base64.b64decode(secret.data["api-key"]).decode())
    # what the pod's volumes would provide: the task claim and the database claim
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    rendered = yaml.safe_load(config_map.data["node.yaml"])
    databases = [{**db, "uri": str(EMPLOYEES_A)} for db in rendered["databases"]]
    token = await service_account_token(admin, release)

    with in_cluster(
        monkeypatch,
        tmp_path / "serviceaccount",
        token=token,
        admin_kubeconfig=release.admin_kubeconfig,
        namespace=release.namespace,
    ):
        settings = load_settings(node_yaml, task_dir=task_dir, databases=databases)
        node = Node(settings, shutdown_grace=5.0)
        stop = asyncio.Event()
        running = asyncio.create_task(node.run(stop), name="node")
        try:
            await wait_until_ready(node, running)
            health = f"http://127.0.0.1:{release.health_port}"
            assert await asyncio.to_thread(http_status, f"{health}/readyz") == 200
            assert await asyncio.to_thread(http_status, f"{health}/healthz") == 200

            async with Container(
                admin, release.namespace, release.node_name, task_dir
            ) as container:
                task = await asyncio.to_thread(
                    v6_plain.create_task,
                    input_=PARTIAL,
                    image="localhost/fednode/average",
                    organizations=[v6_plain.org_a.id],
                )
                await asyncio.to_thread(v6_plain.user.wait_for_results, task["id"], timeout=90)
                results = await asyncio.to_thread(v6_plain.user.result_values, task["id"])
                runs = await asyncio.to_thread(v6_plain.user.runs, task["id"])
        finally:
            stop.set()
            await asyncio.wait_for(running, 60)

    assert results == [PARTIAL_OF_A]
    assert [run["status"] for run in runs] == ["completed"]
    assert pinned == (release.access_mode == "ReadWriteOnce")
    # the run's trace reached the chart's OTLP endpoint (flushed at shutdown)
    assert collector.names() == {"run", "admit", "start", "execute", "upload"}
    assert collector.run_of(task["id"])["fednode.executor"] == "kubernetes"
    assert collector.services == {"fednode-helm-test"}
    (pod,) = [
        p
        for p in container.pods.values()
        if p["metadata"]["labels"].get("fednode.io/task-id") == str(task["id"])
    ]
    # the run was told to call the proxy Service by its ClusterIP (runs have no DNS), which
    # the node read from the Service with its own token, on the proxy's port
    service = await core.read_namespaced_service(f"{FULLNAME}-proxy", release.namespace)
    env = {
        e["name"]: decode_value(e["value"])
        for e in pod["spec"]["containers"][0]["env"]
        if e["name"] in ("HOST", "PORT")
    }
    assert env["HOST"] == f"http://{service.spec.cluster_ip}"
    assert env["PORT"] == str(release.proxy_port)
    if pinned:  # on the Kubernetes node that has the node pod (and its RWO claim)
        assert pod["spec"]["nodeName"] == node_pod.spec.node_name
        (term,) = pod["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        assert node_pod.spec.node_name in str(term)
    # and mounted the chart's claims: the task directory and the database
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {f"{FULLNAME}-tasks", f"{FULLNAME}-db-default"}

    # the runs' NetworkPolicies the chart rendered (the node verified) let them reach
    # exactly the node pod
    listed = await as_json(
        client.NetworkingV1Api(admin).list_namespaced_network_policy(
            release.namespace,
            label_selector=f"{LABEL_NODE}={release.node_name}",
            _preload_content=False,
        )
    )
    policies = {p["metadata"]["name"]: p["spec"] for p in listed["items"]}
    prefix = f"fednode-runs-{release.node_name}"
    assert set(policies) == {f"{prefix}-default-deny", f"{prefix}-egress"}
    (to_proxy,) = policies[f"{prefix}-egress"]["egress"]  # and not the DNS
    assert to_proxy["to"][0]["podSelector"]["matchLabels"] == service.spec.selector
    assert to_proxy["ports"] == [{"port": release.proxy_port, "protocol": "TCP"}]
    node_pods = await core.list_namespaced_pod(
        release.namespace,
        label_selector=",".join(f"{k}={v}" for k, v in service.spec.selector.items()),
    )
    assert len(node_pods.items) == 1  # the Deployment's pod carries those labels


# -- the node image, as the node pod would run it ------------------------------------------


@pytest.fixture(scope="module")
def node_image() -> str:
    """localhost/fednode/node built by scripts/node-image (a no-op when the sources match
    an image already built)."""
    began = time.monotonic()
    result = subprocess.run(
        [str(REPO / "scripts" / "node-image")],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/node-image failed:\n{result.stderr[-4000:]}", pytrace=False)
    image = result.stdout.strip().splitlines()[-1]
    print(
        f"node image {image}: {time.monotonic() - began:.1f} s "
        f"({result.stderr.strip().splitlines()[-1]})"
    )
    return image


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr[-3000:]}")
    return result


#: How the chart runs the node container (deployment.yaml securityContext), in podman terms.
RESTRICTED = (
    "--read-only",
    "--tmpfs",
    "/tmp",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--user",
    "10001:10001",
)


@pytest.mark.podman
def test_the_node_image_checks_the_charts_config_as_uid_10001_with_a_read_only_root(
    node_image: str,
    tmp_path: Path,
) -> None:
    from tests.peers.helm import REQUIRED_VALUES, merged, node_yaml, render

    values = merged(
        REQUIRED_VALUES,
        {
            "databases": [
                {"label": "default", "type": "csv", "file": EMPLOYEES_A.name, "claim": "data"}
            ]
        },
    )
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(node_yaml(render(values, tmp_path))))

    user = podman("run", "--rm", *RESTRICTED, "--entrypoint", "id", node_image)
    checked = podman(
        "run",
        "--rm",
        *RESTRICTED,
        "-e",
        "FEDNODE_API_KEY=from-the-secret",
        "-v",
        f"{config}:/etc/fednode/node.yaml:ro",
        "-v",
        f"{EMPLOYEES_A}:/mnt/data/default/{EMPLOYEES_A.name}:ro",
        node_image,
        "config",
        "check",
        "-c",
        "/etc/fednode/node.yaml",
        check=False,
    )

    assert user.stdout.startswith("uid=10001(fednode) gid=10001(fednode)")
    assert checked.returncode == 0, checked.stderr
    effective = yaml.safe_load(checked.stdout)
    assert effective["api_key"] == "***"
    assert effective["executor"]["kind"] == "kubernetes"


@pytest.mark.podman
@pytest.mark.v6server
async def test_the_node_image_runs_a_task_with_the_mounted_service_account(
    release: Release,
    admin: Any,
    v6_plain: V6Collaboration,
    collector: Collector,
    node_image: str,
    tmp_path: Path,
) -> None:
    """No stand-ins in the process: the image's own entrypoint, the installed node.yaml,
    and the service account's files where the kubelet mounts them; the in-cluster loader
    finds them unaided. Host networking stands in for the pod network."""
    core = client.CoreV1Api(admin)
    config_map = await core.read_namespaced_config_map(FULLNAME, release.namespace)
    secret = await core.read_namespaced_secret(FULLNAME, release.namespace)
    (tmp_path / "node.yaml").write_text(config_map.data["node.yaml"])
    account = tmp_path / "serviceaccount"
    host, port = service_account_files(
        account,
        admin_kubeconfig=release.admin_kubeconfig,
        token=await service_account_token(admin, release),
        namespace=release.namespace,
    )
    for path in account.iterdir():
        path.chmod(0o644)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    os.chown(task_dir, 10001, 10001)
    name = f"fednode-helm-{uuid.uuid4().hex[:8]}"
    podman(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        *RESTRICTED,
        "-e",
        f"FEDNODE_API_KEY={base64.b64decode(secret.data['api-key']).decode()}",
        "-e",
        f"KUBERNETES_SERVICE_HOST={host}",
        "-e",
        f"KUBERNETES_SERVICE_PORT={port}",
        "-v",
        f"{tmp_path / 'node.yaml'}:/etc/fednode/node.yaml:ro",
        "-v",
        f"{account}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
        "-v",
        f"{task_dir}:/var/lib/fednode/tasks",
        "-v",
        f"{EMPLOYEES_A}:/mnt/data/default/{EMPLOYEES_A.name}:ro",
        node_image,
    )
    try:
        health = f"http://127.0.0.1:{release.health_port}"
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(http_status_or_zero, f"{health}/readyz") != 200:
            assert time.monotonic() < deadline, podman("logs", name).stdout[-4000:]
            await asyncio.sleep(0.5)
        async with Container(admin, release.namespace, release.node_name, task_dir):
            task = await asyncio.to_thread(
                v6_plain.create_task,
                input_=PARTIAL,
                image="localhost/fednode/average",
                organizations=[v6_plain.org_a.id],
            )
            await asyncio.to_thread(v6_plain.user.wait_for_results, task["id"], timeout=90)
            results = await asyncio.to_thread(v6_plain.user.result_values, task["id"])
        stopped = podman("stop", "--time", "30", name)
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logged = podman("logs", name)
        logs = logged.stdout + logged.stderr
    finally:
        podman("rm", "--force", name, check=False)

    assert results == [PARTIAL_OF_A], logs[-4000:]
    assert stopped.returncode == 0 and exit_code == "0", logs[-4000:]
    events = [json.loads(line)["event"] for line in logs.splitlines() if line.startswith("{")]
    assert "k8s.executor_open" in events and events[-1] == "node.stopped"
    assert collector.names() == {"run", "admit", "start", "execute", "upload"}
    assert collector.run_of(task["id"])["fednode.node"]


def http_status_or_zero(url: str) -> int:
    try:
        return http_status(url)
    except OSError:
        return 0
