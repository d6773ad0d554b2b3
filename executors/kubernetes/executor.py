"""The Kubernetes executor: each run a Job, all runs followed by two shared watch streams.

How one run goes (five API requests in all, counted in :attr:`KubernetesExecutor.requests`):

1. ``start``: the run's files are written to its folder on the shared task volume, then
   the token Secret is created, then the Job (:mod:`~executors.kubernetes.manifests`), then
   the Job is made the Secret's owner so the Secret goes wherever the Job goes (cleanup,
   ``ttlSecondsAfterFinished``, a kill). ``409 AlreadyExists`` is success: a start is
   idempotent, and starts run concurrently (no lock between runs).
2. Nothing is polled: one Job informer and one Pod informer
   (:mod:`~executors.kubernetes.informer`), started by ``open`` and shared by every run,
   feed the :class:`~executors.kubernetes.tracker.RunTracker`, which publishes each run's
   phase once on the event stream (:meth:`events`). A run whose image cannot be pulled is
   failed at once and its Job deleted, instead of waiting in ``ImagePullBackOff``.
3. ``collect``: the output file from the run's folder (bounded, never through a link:
   :mod:`executors.outputs`), the end of the log from the run's pod (its name comes from
   the informer's cache, not from a list request), streamed through a bounded tail.
4. ``cleanup``: delete the Job with background propagation (pods and Secret follow through
   the garbage collector) and the run's folder — at once if the run's pods have ended,
   else when none is left that kubelet could still set up (it would make the folder
   again, owned by root: a run killed while its pod started).

With ``kueue`` set, the Job is created suspended with its queue's label and Kueue admits it
(unsuspends it) when there is quota; a third informer follows the namespace's Kueue
Workloads, so a run that waits is reported ``pending`` with Kueue's reason (and again
whenever that reason changes), never failed. Killing a waiting run is deleting its Job, as
for any run.

``kill`` deletes the Job; the informer's ``DELETED`` then reports ``killed``. A kill is
remembered, so a kill that races the start deletes the Job as soon as it appears.
``list_runs`` answers from the informers' caches (and, until cleanup, from how runs whose
Job is gone ended), so a restarted node rebuilds its runs from labels without asking the
API server anything more.

At ``open`` the executor checks its isolation, which it cannot change: the runs namespace
must enforce Pod Security ``restricted``, and the runs' NetworkPolicies of
:mod:`policies.network` (rendered by the chart) must be there as expected — read by name,
the only NetworkPolicy right the node's Role has. Out of a cluster
(``network_policies: apply``) it applies them itself with server-side apply. It also reads
the proxy's Service (``proxy_service``, by name) for the ClusterIP runs are given
(:meth:`KubernetesExecutor.proxy_placement`; :mod:`~executors.kubernetes.proxy_address`
says why an address and why this way).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator
from typing import ClassVar

from kubernetes_asyncio.config import ConfigException
from pydantic import BaseModel

from common.logging import get_logger
from common.types import Json
from executors.base import (
    ExecutorContext,
    ExecutorError,
    ProxyPlacement,
    TokenUnavailable,
    UnknownRun,
    database_label,
    run_labels,
)
from executors.events import RunEventStream
from executors.kubernetes.client import (
    JOBS,
    NETWORK_POLICIES,
    PODS,
    SECRETS,
    SERVICES,
    WORKLOADS,
    KubeClient,
    KubeError,
    connect,
    namespace_path,
    service_account_namespace,
)
from executors.kubernetes.config import KubernetesSettings
from executors.kubernetes.informer import Informer
from executors.kubernetes.manifests import (
    CONTAINER_NAME,
    ManifestError,
    job_name,
    label_selector,
    node_selector_labels,
    run_job,
    run_of_job_name,
    secret_name,
    token_secret,
)
from executors.kubernetes.observe import newest
from executors.kubernetes.proxy_address import ProxyServiceError, proxy_endpoint_of
from executors.kubernetes.tracker import RunTracker
from executors.kubernetes.transform import slim_job, slim_pod, slim_workload
from executors.memory import StartsInFlight
from executors.outputs import LogTail
from executors.runfiles import RunFiles
from executors.spec import ProxyEndpoint, RunEvent, RunOutput, RunSpec, RunState
from executors.tasks import TaskOwner
from policies.network import (
    DatabaseEgress,
    PeerAccess,
    RunIsolation,
    policy_differences,
    policy_name_prefix,
    proxy_peer,
    run_network_policies,
)
from policies.pod_security import enforces, pod_security_problems

log = get_logger(__name__)

FIELD_MANAGER = "fednode"
_LOG_CHUNK = 64 * 1024
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class KubernetesExecutor:
    """Runs algorithms as Jobs in one namespace; see the module docstring."""

    kind: ClassVar[str] = "kubernetes"
    settings_model: ClassVar[type[BaseModel]] = KubernetesSettings

    def __init__(self, settings: BaseModel, *, context: ExecutorContext) -> None:
        if not isinstance(settings, KubernetesSettings):
            raise ExecutorError(
                f"the Kubernetes executor needs KubernetesSettings, not {type(settings).__name__}"
            )
        if len(context.node_name) > 63 or not _LABEL_VALUE.match(context.node_name):
            raise ExecutorError(
                f"node name {context.node_name!r} cannot be a Kubernetes label value "
                "(at most 63 letters, digits, '-', '_', '.'; alphanumeric at both ends)"
            )
        self._settings = settings
        self._context = context
        self._namespace = settings.namespace
        self._node_labels = node_selector_labels(context.node_name)
        self._stream = RunEventStream()
        self._tracker = RunTracker(
            stream=self._stream,
            backoff_limit=settings.backoff_limit,
            delete_job=self._delete_job,
            run_of_job=lambda name: run_of_job_name(context.node_name, name),
        )
        self._client: KubeClient | None = None
        self._informers: list[Informer] = []
        self._tasks = TaskOwner("kubernetes", expected=(KubeError, ExecutorError))
        self._starting = StartsInFlight()
        # Starts that build their objects and talk to the API server at once: no more than
        # the connections they could use (the rest would only hold their Job manifests and
        # request bodies in memory while waiting for a connection).
        self._start_slots = asyncio.Semaphore(max(1, settings.max_connections - 4))
        self._owned_secrets: set[int] = set()  # the Job owns it: garbage-collected with it
        self._pin: str | None = None
        self._proxy: ProxyEndpoint | None = None

    # -- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        settings = self._settings
        if settings.task_volume_access == "ReadWriteOnce":
            if not settings.kubernetes_node:
                raise ExecutorError(
                    "task_volume_access ReadWriteOnce pins runs to the node pod's Kubernetes "
                    "node: set executor.kubernetes_node (the chart sets it from spec.nodeName)"
                )
            self._pin = settings.kubernetes_node
        try:
            api = await connect(
                kubeconfig=settings.kubeconfig,
                context=settings.context,
                max_connections=settings.max_connections,
            )
        except (ConfigException, OSError, ValueError) as error:
            raise ExecutorError(f"cannot configure the Kubernetes client: {error}") from error
        self._client = KubeClient(api, request_timeout=settings.request_timeout_seconds)
        try:
            await self._check_namespace(self._client)
            if settings.proxy_service is not None:
                self._proxy = await self._read_proxy_service(self._client, settings.proxy_service)
            if settings.network_policies == "apply":
                await self._apply_network_policies(self._client)
            elif settings.network_policies == "verify":
                await self._verify_network_policies(self._client)
            await self._start_informers(self._client)
        except BaseException:
            await self.close()
            raise
        log.info(
            "k8s.executor_open",
            namespace=self._namespace,
            jobs=len(self._tracker.jobs),
            node=self._context.node_name,
            proxy=f"{self._proxy.host}:{self._proxy.port}" if self._proxy else None,
        )

    async def close(self) -> None:
        await self._tasks.close()
        self._tasks = TaskOwner("kubernetes", expected=(KubeError, ExecutorError))
        self._informers = []
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def requests(self) -> dict[str, int]:
        """API requests made so far, by verb and resource (``"create jobs"``: 12, ...)."""
        return dict(self._client.requests) if self._client is not None else {}

    @property
    def informers(self) -> list[Informer]:
        return list(self._informers)

    def proxy_endpoint(self) -> ProxyEndpoint | None:
        """The proxy Service's ClusterIP and port, read at ``open()`` (``proxy_service``);
        ``None`` without one: the node then gives runs its ``proxy.advertise_host``."""
        return self._proxy

    # -- runs -----------------------------------------------------------------------------

    async def start(self, spec: RunSpec) -> None:
        client = self._require_open()
        run_id = spec.run_id
        if run_id in self._tracker.jobs:
            return
        # A second start of a run whose start is under way waits for that one's end.
        await self._starting.run(run_id, lambda: self._start_in_slot(client, spec))

    async def _start_in_slot(self, client: KubeClient, spec: RunSpec) -> None:
        run_id = spec.run_id
        try:
            async with self._start_slots:
                if run_id in self._tracker.killed:  # also while it waited for a slot
                    self._tracker.killed_before_start(run_id, spec.task_id)
                    return
                await self._start(client, spec)
        except KubeError as error:
            raise ExecutorError(f"Kubernetes refused run {run_id}: {error}") from error

    async def _start(self, client: KubeClient, spec: RunSpec) -> None:
        node, ns, run_id = self._context.node_name, self._namespace, spec.run_id
        name = job_name(node, run_id)
        labels = run_labels(spec, node_name=node)
        token_name = secret_name(node, run_id) if spec.token is not None else None
        try:
            job = run_job(
                spec,
                settings=self._settings,
                namespace=ns,
                name=name,
                labels=labels,
                token_secret_name=token_name,
                pin_to_node=self._pin,
            )
        except ManifestError as error:
            raise ExecutorError(str(error)) from error
        RunFiles(self._context.task_dir, run_id).prepare(
            spec, owner=(self._settings.run_as_user, self._settings.run_as_group), write_token=False
        )
        created = await _create(client, JOBS.path(ns), job, what="create jobs")
        if token_name is None:
            return
        if created is None:  # it existed: a repeated start
            created = self._tracker.jobs.get(run_id) or await client.get(
                JOBS.path(ns, name), what="get jobs"
            )
        # The pod waits (ContainerCreating) until its token Secret exists; the Secret is
        # created owned by the Job, so it is garbage-collected with it.
        secret = token_secret(spec, namespace=ns, name=token_name, labels=labels, owner=created)
        try:
            await _create(client, SECRETS.path(ns), secret, what="create secrets")
        except KubeError:
            await _delete(client, JOBS.path(ns, name), what="delete jobs")
            raise
        self._owned_secrets.add(run_id)

    async def kill(self, run_id: int) -> None:
        client = self._require_open()
        tracker = self._tracker
        tracker.killed.add(run_id)  # sticky: a Job that appears later is deleted too
        if run_id in tracker.deleting:
            return
        tracker.deleting.add(run_id)
        try:
            deleted = await _delete(client, self._job_path(run_id), what="delete jobs")
        except KubeError as error:
            tracker.deleting.discard(run_id)
            raise ExecutorError(f"cannot delete the Job of run {run_id}: {error}") from error
        if not deleted:
            tracker.deleting.discard(run_id)

    def events(self) -> AsyncIterator[RunEvent]:
        return aiter(self._stream)

    async def collect(self, run_id: int) -> RunOutput:
        client = self._require_open()
        files = RunFiles(self._context.task_dir, run_id)
        limits = self._context.limits
        pod = self._tracker.pod_name(run_id)
        if pod is None and run_id not in self._tracker.jobs and not files.directory.exists():
            raise UnknownRun(run_id)
        text = ""
        if pod is not None:
            tail = LogTail(limits.max_log_bytes)
            try:
                async with client.stream(
                    PODS.path(self._namespace, pod, "log"),
                    query=(
                        ("container", CONTAINER_NAME),
                        ("limitBytes", self._settings.log_limit_bytes),
                    ),
                    read_timeout=self._settings.request_timeout_seconds,
                    what="get pods/log",
                ) as body:
                    async for chunk in body.iter_chunked(_LOG_CHUNK):
                        tail.feed(chunk)
                text = tail.text()
            except KubeError as error:  # never started (bad image), or already removed
                log.info("k8s.no_log", run_id=run_id, pod=pod, status=error.status)
        read = await files.read_output(limit=limits.max_output_bytes)
        return RunOutput(read.data, text, read.refused)

    async def cleanup(self, run_id: int) -> None:
        client = self._require_open()
        tracker = self._tracker
        try:
            if run_id in tracker.jobs and run_id not in tracker.deleting:
                await _delete(client, self._job_path(run_id), what="delete jobs")
            if run_id not in self._owned_secrets:  # started before a restart: not known
                await _delete(
                    client,
                    SECRETS.path(self._namespace, secret_name(self._context.node_name, run_id)),
                    what="delete secrets",
                )
        except KubeError as error:
            raise ExecutorError(f"cannot clean up run {run_id}: {error}") from error
        self._owned_secrets.discard(run_id)
        tracker.forget_when_gone(
            run_id, remove_files=functools.partial(self._remove_folder, run_id)
        )

    def _remove_folder(self, run_id: int) -> None:
        """The run's folder on the task volume, once no pod of the run is left to set up."""
        files = RunFiles(self._context.task_dir, run_id)
        if not files.remove():
            log.error(
                "k8s.run.folder_not_removable",
                run_id=run_id,
                folder=str(files.directory),
                hint="another user made (part of) it, e.g. kubelet; remove it as that user",
            )

    async def list_runs(self) -> list[RunState]:
        self._require_open()
        return self._tracker.states()

    def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
        """Runs reach the proxy Service's ClusterIP and port, read at ``open()``
        (``proxy_service``); without one, where the operator says (``proxy.advertise_host``)."""
        if self._proxy is not None:
            return ProxyPlacement(host, self._proxy.host, advertise_port=self._proxy.port)
        return ProxyPlacement(host, advertise_host or host)

    # -- peering (executors.ports.PeerEndpoints) ----------------------------------------

    async def declared_ports(self, run_id: int, image: str) -> None:
        """Unknown here: the node reads no image configuration (it pulls nothing; kubelet
        does), so the node's ``peering.image_ports`` decide (docs/networking.md)."""
        return None

    async def run_address(self, run_id: int) -> str | None:
        """The IP of the run's pod while it runs, from the informer's cache (no request)."""
        pod = newest(list(self._tracker.pods.get(run_id, {}).values()))
        status = (pod or {}).get("status") or {}
        if status.get("phase") != "Running" or not status.get("podIP"):
            return None
        return str(status["podIP"])

    async def recover_token(self, state: RunState) -> str:
        """Never: the token is in a Secret the node may create but not read back."""
        raise TokenUnavailable(
            "the token is in the run's Secret, which the node may not read; "
            "only the sealed copy on the Job recovers it"
        )

    # -- inside ---------------------------------------------------------------------------

    def _require_open(self) -> KubeClient:
        if self._client is None:
            raise ExecutorError("the Kubernetes executor is not open")
        return self._client

    def _job_path(self, run_id: int) -> str:
        return JOBS.path(self._namespace, job_name(self._context.node_name, run_id))

    def _delete_job(self, run_id: int, why: str) -> None:
        """The tracker's request: a killed run's late Job, or a run that can never progress
        (a bad image) — delete the Job so that it does not linger."""
        log.info("k8s.deleting_job", run_id=run_id, why=why)
        if self._client is not None:
            self._tasks.spawn(self._delete_quietly(self._client, run_id), name=f"delete-{run_id}")

    async def _delete_quietly(self, client: KubeClient, run_id: int) -> None:
        try:
            await _delete(client, self._job_path(run_id), what="delete jobs")
        except KubeError as error:
            log.warning("k8s.delete_failed", run_id=run_id, error=str(error))
            self._tracker.deleting.discard(run_id)  # the run's next change retries

    async def _check_namespace(self, client: KubeClient) -> None:
        settings, ns = self._settings, self._namespace
        try:
            namespace = await client.get(namespace_path(ns), what="get namespaces")
        except KubeError as error:
            if error.status == 404:
                raise ExecutorError(
                    f"namespace {ns!r} does not exist; the chart (or the operator) creates it, "
                    "labelled pod-security.kubernetes.io/enforce=restricted"
                ) from error
            if error.status == 0:  # the node's first request: no answer at all
                raise ExecutorError(
                    f"cannot reach the Kubernetes API server ({error}); is the node's egress "
                    "to it allowed? (the chart: networkPolicy.apiServer; under Cilium also "
                    "networkPolicy.apiServer.cilium)"
                ) from error
            if error.status == 403 and not settings.require_restricted_namespace:
                log.warning("k8s.namespace_unverified", namespace=ns, error=str(error))
                return
            raise ExecutorError(
                f"cannot read namespace {ns!r} to verify its Pod Security level ({error}); "
                "grant `get namespaces` in the runs namespace's Role "
                "(executors/kubernetes/rbac.py)"
            ) from error
        labels = (namespace.get("metadata") or {}).get("labels") or {}
        problems = pod_security_problems(labels)
        if problems:
            message = f"namespace {ns!r} does not enforce Pod Security 'restricted': " + "; ".join(
                problems
            )
            if settings.require_restricted_namespace:
                raise ExecutorError(
                    message + " (label it, or set require_restricted_namespace: false)"
                )
            log.error("k8s.namespace_not_restricted", namespace=ns, problems=problems)
        host_paths = [label for label, v in settings.databases.items() if v.host_path]
        if host_paths and enforces(labels, "baseline"):
            raise ExecutorError(
                f"databases {host_paths} use hostPath volumes, which Pod Security "
                f"{labels.get('pod-security.kubernetes.io/enforce')!r} in namespace {ns!r} "
                "forbids; use a PersistentVolumeClaim or a ConfigMap"
            )

    async def _read_proxy_service(self, client: KubeClient, name: str) -> ProxyEndpoint:
        """The address runs call: the proxy Service's ClusterIP (runs have no DNS)."""
        ns = proxy_namespace(self._settings)
        try:
            service = await client.get(SERVICES.path(ns, name), what="get services")
        except KubeError as error:
            if error.status == 404:
                raise ExecutorError(
                    f"the proxy's Service {name!r} is missing in namespace {ns!r}; the chart "
                    "makes it (executor.proxy_service names it)"
                ) from error
            raise ExecutorError(
                f"cannot read the proxy's Service {name!r} in namespace {ns!r} ({error}); "
                f"grant `get services` with resourceNames [{name!r}] "
                "(executors/kubernetes/rbac.py proxy_service_rule)"
            ) from error
        try:
            return proxy_endpoint_of(service, proxy_port=self._settings.proxy_port)
        except ProxyServiceError as error:
            raise ExecutorError(f"executor.proxy_service in namespace {ns!r}: {error}") from error

    async def _apply_network_policies(self, client: KubeClient) -> None:
        for policy in run_network_policy_manifests(
            self._settings,
            node_name=self._context.node_name,
            peer_ports=self._context.peer_ports,
        ):
            path = NETWORK_POLICIES.path(self._namespace, policy["metadata"]["name"])
            try:
                await client.apply(
                    path, policy, field_manager=FIELD_MANAGER, what="apply networkpolicies"
                )
            except KubeError as error:
                raise ExecutorError(
                    f"cannot apply NetworkPolicy {policy['metadata']['name']!r} in "
                    f"{self._namespace!r}: {error} (network_policies: apply needs "
                    "create and patch on networkpolicies: "
                    "executors/kubernetes/rbac.py APPLY_NETWORK_POLICIES_RULE)"
                ) from error

    async def _verify_network_policies(self, client: KubeClient) -> None:
        """The runs' policies are the chart's: read each by name, refuse to start unless it
        is there and allows exactly what :mod:`policies.network` says."""
        ns = self._namespace
        fix = (
            "install or upgrade the Helm chart with runs.networkPolicies: true (it renders "
            "them), or out of a cluster set executor.network_policies: apply and grant "
            "create/patch on networkpolicies (docs/executors.md)"
        )
        for expected in run_network_policy_manifests(
            self._settings,
            node_name=self._context.node_name,
            peer_ports=self._context.peer_ports,
        ):
            name = expected["metadata"]["name"]
            try:
                found = await client.get(
                    NETWORK_POLICIES.path(ns, name), what="get networkpolicies"
                )
            except KubeError as error:
                if error.status == 404:
                    raise ExecutorError(
                        f"the runs' NetworkPolicy {name!r} is missing in namespace {ns!r}: {fix}"
                    ) from error
                raise ExecutorError(
                    f"cannot read the runs' NetworkPolicy {name!r} in namespace {ns!r} "
                    f"({error}); grant `get networkpolicies` with resourceNames {name!r} "
                    "(executors/kubernetes/rbac.py network_policy_rule)"
                ) from error
            problems = policy_differences(expected, found)
            if problems:
                raise ExecutorError(
                    f"the runs' NetworkPolicy {name!r} in namespace {ns!r} differs from what "
                    f"this node expects: {'; '.join(problems)}. Check the chart's values "
                    "against the executor settings (proxy port and pod labels), or "
                    f"{fix}"
                )

    async def _start_informers(self, client: KubeClient) -> None:
        selector = label_selector(self._node_labels)
        timeout = self._settings.watch_timeout_seconds
        jobs = Informer(
            client=client,
            resource=JOBS,
            namespace=self._namespace,
            label_selector=selector,
            handler=self._tracker.on_job,
            watch_timeout=timeout,
            transform=slim_job,
        )
        pods = Informer(
            client=client,
            resource=PODS,
            namespace=self._namespace,
            label_selector=selector,
            handler=self._tracker.on_pod,
            watch_timeout=timeout,
            transform=slim_pod,
        )
        informers = [jobs, pods]
        if self._settings.kueue is not None:
            # Kueue names a Workload after its Job and labels it with nothing of ours: all
            # of the runs namespace's, filed by their owner Job (RunTracker.on_workload).
            informers.append(
                Informer(
                    client=client,
                    resource=WORKLOADS,
                    namespace=self._namespace,
                    label_selector="",
                    handler=self._tracker.on_workload,
                    watch_timeout=timeout,
                    transform=slim_workload,
                )
            )
        try:
            async with asyncio.timeout(self._settings.sync_timeout_seconds):
                for informer in informers:
                    await informer.prime()
            self._tracker.release()  # judge each run once, with every cache full
        except KubeError as error:
            hint = (
                " (executor.kueue is set: is Kueue installed, and may the node list and "
                "watch workloads.kueue.x-k8s.io? executors/kubernetes/rbac.py KUEUE_RULE)"
                if self._settings.kueue is not None
                else ""
            )
            raise ExecutorError(
                f"cannot list the runs' objects in namespace {self._namespace!r}: {error}{hint}"
            ) from error
        except TimeoutError as error:
            raise ExecutorError(
                f"listing Jobs and Pods in {self._namespace!r} took more than "
                f"{self._settings.sync_timeout_seconds}s"
            ) from error
        self._informers = informers
        for informer in self._informers:
            self._stream.fed_by(self._tasks.spawn(informer.run(), name=f"informer-{informer.kind}"))


def run_network_policy_manifests(
    settings: KubernetesSettings, *, node_name: str, peer_ports: tuple[int, ...] = ()
) -> list[Json]:
    """The runs' NetworkPolicies for these settings (what the chart renders and the
    executor verifies or, with ``network_policies: apply``, applies); ``peer_ports``: the
    node's forwarder ports when it carries peer streams (``peering``), else none."""
    labels = node_selector_labels(node_name)
    peers = (
        PeerAccess(
            namespace=proxy_namespace(settings),
            node_selector=settings.proxy_pod_selector,
            forwarder_ports=peer_ports,
        )
        if peer_ports
        else None
    )
    isolation = RunIsolation(
        namespace=settings.namespace,
        run_selector=labels,
        allowed=(
            proxy_peer(
                namespace=proxy_namespace(settings),
                pod_selector=settings.proxy_pod_selector,
                port=settings.proxy_port,
            ),
        ),
        databases=tuple(
            DatabaseEgress(
                label=label,
                pod_label=database_label(label),
                cidr=egress.cidr,
                port=egress.port,
            )
            for label, egress in sorted(settings.database_egress.items())
        ),
        peers=peers,
        name_prefix=policy_name_prefix(node_name),
        labels=labels,
    )
    return run_network_policies(isolation)


def proxy_namespace(settings: KubernetesSettings) -> str:
    """The node pod's (and its proxy Service's) namespace."""
    return settings.proxy_namespace or service_account_namespace() or settings.namespace


async def _create(client: KubeClient, path: str, body: Json, *, what: str) -> Json | None:
    """Create an object; ``None`` when it already exists (a repeated, idempotent start)."""
    try:
        return await client.create(path, body, what=what)
    except KubeError as error:
        if error.status == 409 and error.reason == "AlreadyExists":
            return None
        raise


async def _delete(client: KubeClient, path: str, *, what: str) -> bool:
    """Delete in the background (dependents follow); whether it was there to delete."""
    try:
        await client.delete(path, query=(("propagationPolicy", "Background"),), what=what)
    except KubeError as error:
        if error.status == 404:
            return False
        raise
    return True
