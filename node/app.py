"""The composition root: builds a node from its settings and runs it until told to stop.

Start-up order matters and is written once, here:

1. authenticate at the server and learn who this node is (organization, collaboration,
   whether the collaboration is encrypted) — retried with backoff while the server is down;
2. set up encryption (and publish this organization's public key if the server lacks it);
3. open the executor and **reconcile** — claim every run it already has — before
   3. connecting the socket, whose first ``sync`` brings every open run of this node;
4. serve: socket link, server-event consumer, executor-event consumer (and the server
   client's token refresher) as root tasks (:class:`~node.background.RootTasks`): if one
   of them dies, the node stops as on SIGTERM and :meth:`Node.run` raises
   :class:`~node.background.RootTaskDied`, so ``fednode start`` exits non-zero.

Shutdown (SIGTERM): stop taking runs, let uploads in progress finish for a grace period,
close the socket, the executor (runs keep running in the runtime and are picked up by the
next start) and the server session, then flush traces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Tracer
from pydantic import BaseModel

from common.backoff import Backoff
from executors.base import (
    DatabaseRelaying,
    Executor,
    ExecutorContext,
    ExecutorError,
    ProxyPlacement,
)
from executors.outputs import OutputLimits
from executors.registry import load_factory
from executors.spec import DatabaseMount, ProxyEndpoint
from node.admin import AdminServer
from node.background import RootTasks
from node.crypto import CryptoError, Cryptor, RSACryptor, cryptor_for
from node.executor_set import ExecutorSet, Route, Routes
from node.health import make_health_app
from node.lifecycle import LifecycleConfig, RunLifecycle
from node.logging import direct_logger, get_logger
from node.metrics import NodeMetrics
from node.peers import NodePeering, PeeringRunTable
from node.posture import posture_warnings
from node.proxy_link import NodeProxyCrypto, OrganizationKeys
from node.server.models import NodeIdentity
from node.server.rest import ServerClient, ServerError
from node.server.socket import SocketLink
from node.settings import NodeSettings, ResourceProfileSettings, TelemetrySettings
from node.telemetry import OtlpTarget, TaskOrigins, make_tracer_provider
from node.token_seal import TokenSeal
from policies.admission import Admission, AdmissionPolicy, ResourcePolicy, ResourceProfile
from proxy import ProxyLimits, ProxyServer, RunTable, make_proxy_app

log = get_logger(__name__)

#: How many waiting runs ``/status`` names with their reason (the count is always whole).
STATUS_WAITING_SHOWN = 20


class NodeStartError(Exception):
    """The node cannot start with this configuration against this server."""


@dataclass
class NodeState:
    """What a health endpoint (and a test) can ask the running node."""

    identity: NodeIdentity | None = None
    lifecycle: RunLifecycle | None = None
    socket: SocketLink | None = None
    services: RootTasks | None = None


class Node:
    """One fednode node: settings in, a served node out."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        span_processors: tuple[SpanProcessor, ...] = (),
        executor: Executor | None = None,
        shutdown_grace: float = 10.0,
    ) -> None:
        self.settings = settings
        self.state = NodeState()
        self._executor = executor
        self._grace = shutdown_grace
        self.tracer_provider: TracerProvider = make_tracer_provider(
            service_name=settings.telemetry.service_name,
            node_name=settings.name,
            sampling_ratio=settings.telemetry.sampling_ratio,
            otlp=otlp_target(settings.telemetry),
            processors=span_processors,
        )
        self.metrics = NodeMetrics()
        self.task_origins = TaskOrigins()
        self.ready = asyncio.Event()
        self._advertised_proxy: ProxyEndpoint | None = None
        #: By executor name, with ``executors:`` (one executor: under "").
        self._advertised_proxies: dict[str, ProxyEndpoint] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; raises :class:`NodeStartError` on fatal set-up errors."""
        settings = self.settings
        for note in settings.carried_over:
            log.warning("config.v4_key", keys=list(note.keys), message=note.message)
        for warning in await asyncio.to_thread(posture_warnings, settings):
            log.warning(warning.event, message=warning.message, **warning.keys)
        server = ServerClient(
            api_url=settings.server_api_url, api_key=settings.api_key.get_secret_value()
        )
        await server.open()
        services = self.state.services = RootTasks()
        executor: Executor | None = None
        lifecycle: RunLifecycle | None = None
        proxy: ProxyServer | None = None
        peering: NodePeering | None = None
        health = await self._start_health()
        admin: AdminServer | None = None
        try:
            admin = await self._start_admin()
            identity = await self._connect(server, stop)
            if identity is None:
                return
            self.state.identity = identity
            if server.refresher is not None:
                services.watch(server.refresher)
            cryptor = await self._cryptor(server, identity)
            executor = self._executor or self._make_executor()
            await executor.open()
            databases = await self._place_databases(executor)
            keys = OrganizationKeys(
                server,
                collaboration_id=identity.collaboration_id,
                ttl=settings.proxy.key_cache_seconds,
            )
            tracer = self.tracer_provider.get_tracer("fednode")
            peering = self._make_peering(server, identity, cryptor, keys, executor, tracer)
            # Runs that kept going while the node was down call the proxy as soon as it
            # listens; it holds their unknown tokens until reconcile has registered them.
            proxy_runs = (
                PeeringRunTable(peering, restoring=True)
                if peering is not None
                else RunTable(restoring=True)
            )
            proxy = await self._start_proxy(
                executor, proxy_runs, NodeProxyCrypto(cryptor, keys), tracer, peering
            )
            lifecycle = RunLifecycle(
                server=server,
                notifier=(socket := SocketLink(url=self._socket_url(), client=server)),
                executor=executor,
                admission=Admission(self._admission_policy()),
                cryptor=cryptor,
                config=self._lifecycle_config(identity, executor, proxy, databases),
                tracer=tracer,
                keys=keys,
                token_seal=TokenSeal(api_key=settings.api_key.get_secret_value()),
                proxy_runs=proxy_runs if proxy is not None else None,
                metrics=self.metrics,
                task_origins=self.task_origins,
            )
            self.state.lifecycle, self.state.socket = lifecycle, socket
            running, link = lifecycle, socket
            self.metrics.watch(lambda: running.occupancy(server_reconnects=link.reconnects))
            try:
                await lifecycle.reconcile()
            finally:
                proxy_runs.mark_restored()
            if peering is not None:
                await peering.announce()
                services.spawn(peering.run(), name="peering-link")
            services.spawn(socket.run(), name="socket")
            services.spawn(lifecycle.consume_server_events(socket.events), name="server-events")
            services.spawn(lifecycle.consume_executor_events(), name="executor-events")
            self.ready.set()
            log.info(
                "node.started",
                node_id=identity.id,
                organization_id=identity.organization_id,
                collaboration_id=identity.collaboration_id,
                encrypted=identity.encrypted,
                executor=executor.kind,
            )
            await services.wait(stop)
            log.info("node.stopping", reason=str(services.failure or "asked to stop"))
        finally:
            self.ready.clear()
            services.shutting_down()
            if lifecycle is not None:
                await lifecycle.close(grace=self._grace)
            await services.close()
            if peering is not None:
                await peering.close()
            if proxy is not None:
                await proxy.stop()
            if executor is not None:
                await executor.close()
            await server.close()
            if health is not None:
                await health.cleanup()
            if admin is not None:
                await admin.stop()
            self.tracer_provider.shutdown()
            log.info("node.stopped")
        if services.failure is not None:
            raise services.failure

    async def _start_health(self) -> web.AppRunner | None:
        """Serve /healthz, /readyz and /status from the very start (liveness while connecting)."""
        health = self.settings.health
        if not health.enabled:
            return None
        runner = web.AppRunner(
            make_health_app(
                status=self.status,
                status_public=health.status_public,
                metrics=self.metrics.render if health.metrics else None,
            ),
            access_log=None,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, health.host, health.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise NodeStartError(
                f"health.port {health.port} on {health.host} cannot be used: {exc.strerror}"
            ) from None
        log.info("node.health_serving", host=health.host, port=health.port)
        return runner

    async def _start_admin(self) -> AdminServer | None:
        """Serve the operator's admin socket (``fednode runs``/``logs``/``kill``)."""
        settings = self.settings
        if not settings.admin.enabled:
            return None
        admin = AdminServer(settings.admin_socket, target=lambda: self.state.lifecycle)
        try:
            await admin.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if settings.admin.socket is not None:  # the operator's own choice: say so
                raise NodeStartError(
                    f"admin.socket {settings.admin_socket} cannot be used: {reason}"
                ) from None
            # The default place (task_dir) may be on a file system without sockets: the
            # node serves its runs all the same, and says why the CLI will not reach it.
            log.warning(
                "node.admin_unavailable",
                socket=str(settings.admin_socket),
                error=reason,
                fix="set admin.socket to a path on a local file system",
            )
            return None
        return admin

    def status(self) -> dict[str, Any]:
        """Readiness and a summary, for /readyz, /status and ``fednode status``."""
        state = self.state
        missing = []
        if state.identity is None:
            missing.append("server authentication")
        if state.lifecycle is None or not self.ready.is_set():
            missing.append("executor")
        if state.socket is None or not state.socket.connected.is_set():
            missing.append("server socket")
        if state.services is not None and state.services.failure is not None:
            missing.append(str(state.services.failure))
        identity = state.identity
        waiting = state.lifecycle.waiting() if state.lifecycle else {}
        return {
            "ready": not missing,
            "missing": missing,
            "name": self.settings.name,
            "executor": ", ".join(
                f"{entry.name} ({entry.kind})" if entry.name != entry.kind else entry.kind
                for entry in self.settings.executor_entries
            ),
            "node_id": identity.id if identity else None,
            "organization_id": identity.organization_id if identity else None,
            "collaboration_id": identity.collaboration_id if identity else None,
            "encrypted": identity.encrypted if identity else None,
            "runs_in_flight": state.lifecycle.in_flight if state.lifecycle else 0,
            # Runs the runtime's queue holds (Kueue): how many, and why (the first few).
            "runs_waiting": len(waiting),
            "waiting": dict(list(waiting.items())[:STATUS_WAITING_SHOWN]),
            "resource_profiles": self._profiles_summary(),
            "run_resources": state.lifecycle.resources_in_use() if state.lifecycle else {},
        }

    def _profiles_summary(self) -> dict[str, str]:
        """Each resource profile (and the defaults) as one line, for ``fednode status``."""
        limits = self.settings.policies.resources
        summary = {
            profile.name: f"{', '.join(profile.images)} -> {self._profile_of(profile).describe()}"
            for profile in limits.profiles
        }
        gpus = limits.default_gpus
        summary["(defaults)"] = (
            f"{limits.default_cpu:g} CPU, {limits.default_memory_mb} MB"
            + (f", {gpus} GPU" if gpus else "")
            + f"; caps {limits.max_cpu:g} CPU, {limits.max_memory_mb} MB, {limits.max_gpus} GPU"
        )
        return summary

    async def _connect(self, server: ServerClient, stop: asyncio.Event) -> NodeIdentity | None:
        """Authenticate and identify, retrying while the server is unreachable."""
        backoff = Backoff(first=1.0, cap=30.0)
        while not stop.is_set():
            try:
                await server.authenticate()
                return await server.identify()
            except ServerError as exc:
                if exc.status in (400, 401, 403):
                    raise NodeStartError(
                        f"the server refused this node's api_key: {exc.message}"
                    ) from None
                delay = backoff.next_delay()
                log.warning("node.server_unreachable", error=str(exc), retry_in=round(delay, 1))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        return None

    async def _cryptor(self, server: ServerClient, identity: NodeIdentity) -> Cryptor:
        enc = self.settings.encryption
        if identity.encrypted and not enc.enabled:
            raise NodeStartError(
                f"collaboration {identity.collaboration_id} is encrypted: set "
                "encryption.enabled: true and encryption.private_key"
            )
        if not identity.encrypted and enc.enabled:
            log.warning("node.encryption_ignored", reason="the collaboration is not encrypted")
        try:
            cryptor = cryptor_for(encrypted=identity.encrypted, private_key=enc.private_key)
        except CryptoError as exc:
            raise NodeStartError(str(exc)) from None
        if isinstance(cryptor, RSACryptor):
            org = await server.request("GET", f"organization/{identity.organization_id}")
            if (org or {}).get("public_key") != cryptor.public_key:
                log.info("node.publishing_public_key", organization_id=identity.organization_id)
                await server.request(
                    "PATCH",
                    f"organization/{identity.organization_id}",
                    json_body={"public_key": cryptor.public_key},
                )
        return cryptor

    def _make_executor(self) -> Executor:
        """The configured executor; with ``executors:``, all of them as one set."""
        entries = self.settings.executor_entries
        if self.settings.executors is None:
            return self._make_one(entries[0].kind, entries[0].settings)
        return ExecutorSet(
            {entry.name: self._make_one(entry.kind, entry.settings) for entry in entries},
            default=entries[0].name,
        )

    def _make_one(self, kind: str, executor_settings: BaseModel) -> Executor:
        settings = self.settings
        factory = load_factory(kind)
        return factory(
            executor_settings,
            context=ExecutorContext(
                node_name=settings.name,
                task_dir=settings.task_dir,
                registry_credentials=tuple(settings.docker_registries),
                limits=OutputLimits(
                    max_output_bytes=settings.max_output_bytes,
                    max_log_bytes=settings.max_log_bytes,
                ),
                peer_ports=settings.peering.forwarder_ports,
                peer_image_ports=settings.peering.image_port_rules,
            ),
        )

    def _socket_url(self) -> str:
        return f"{self.settings.server_url}:{self.settings.port}"

    def _admission_policy(self) -> AdmissionPolicy:
        policies = self.settings.policies
        limits = policies.resources
        return AdmissionPolicy(
            allowed_algorithms=tuple(policies.allowed_algorithms),
            require_image_digest=policies.require_image_digest,
            known_databases=tuple(db.label for db in self.settings.databases),
            allowed_organizations=tuple(policies.allowed_organizations),
            allowed_users=tuple(policies.allowed_users),
            resources=ResourcePolicy(
                default_cpu=limits.default_cpu,
                default_memory_mb=limits.default_memory_mb,
                default_gpus=limits.default_gpus,
                max_cpu=limits.max_cpu,
                max_memory_mb=limits.max_memory_mb,
                max_gpus=limits.max_gpus,
                profiles=tuple(self._profile_of(profile) for profile in limits.profiles),
            ),
        )

    def _make_peering(
        self,
        server: ServerClient,
        identity: NodeIdentity,
        cryptor: Cryptor,
        keys: OrganizationKeys,
        executor: Executor,
        tracer: Tracer,
    ) -> NodePeering | None:
        """Algorithm-to-algorithm networking, when ``peering.relay_url`` is set."""
        settings = self.settings
        if settings.peering.relay_url is None:
            return None
        if not isinstance(cryptor, RSACryptor):
            raise NodeStartError(
                "peering.relay_url is set, but peering authenticates with the organization's "
                "key pair: set encryption.enabled: true and encryption.private_key "
                "(the collaboration must be encrypted)"
            )
        if not settings.proxy.enabled:
            raise NodeStartError("peering.relay_url is set: peering needs proxy.enabled: true")
        placement = executor.proxy_placement(
            host=settings.proxy.host, advertise_host=settings.proxy.advertise_host
        )
        return NodePeering(
            settings=settings.peering,
            server=server,
            identity=identity,
            private_key=cryptor.private_key,
            keys=keys,
            executor=executor,
            bind_host=placement.bind_host,
            advertise_host=settings.peering.advertise_host or placement.advertise_host,
            tracer=tracer,
        )

    @staticmethod
    def _profile_of(profile: ResourceProfileSettings) -> ResourceProfile:
        return ResourceProfile(
            name=profile.name,
            images=tuple(profile.images),
            cpu=profile.cpu,
            memory_mb=profile.memory_mb,
            gpus=profile.gpus,
            gpu_type=profile.gpu_type,
            deadline_seconds=profile.deadline_seconds,
        )

    async def _start_proxy(
        self,
        executor: Executor,
        runs: RunTable,
        crypto: NodeProxyCrypto,
        tracer: Tracer,
        peering: NodePeering | None = None,
    ) -> ProxyServer | None:
        """Serve the algorithms' proxy where the executor's runs can reach it, and tell runs
        the address the executor found for it (Kubernetes: the Service's ClusterIP) or, if
        none, the one the settings give."""
        settings = self.settings
        if not settings.proxy.enabled:
            return None
        members = executor.members if isinstance(executor, ExecutorSet) else {"": executor}
        placements = {
            name: member.proxy_placement(
                host=settings.proxy.host, advertise_host=settings.proxy.advertise_host
            )
            for name, member in members.items()
        }
        hosts = listen_hosts(placements.values())
        app = make_proxy_app(
            upstream_api_url=settings.server_api_url,
            runs=runs,
            crypto=crypto,
            tracer=tracer,
            metrics=self.metrics.proxy,
            task_creations=self.task_origins,
            limits=ProxyLimits(
                max_body_bytes=settings.proxy.max_body_mb * 1024 * 1024,
                upstream_timeout=settings.proxy.upstream_timeout_seconds,
                unreachable_patience=settings.proxy.unreachable_patience_seconds,
                max_response_bytes=settings.proxy.max_response_mb * 1024 * 1024,
                max_connections_per_run=settings.proxy.max_connections_per_run,
                keepalive_timeout=settings.proxy.keepalive_timeout_seconds,
                max_task_organizations=settings.proxy.max_task_organizations,
                max_body_work=settings.proxy.max_body_work,
            ),
            access_log=direct_logger("proxy.access"),
            peers=peering,
        )
        (first, freebind), also = hosts[0], hosts[1:]
        server = ProxyServer(
            app, host=first, port=settings.proxy.port, freebind=freebind, also=also
        )
        try:
            await server.start()
        except OSError as exc:
            where = ", ".join(host for host, _ in hosts)
            raise NodeStartError(
                f"proxy.port {settings.proxy.port} on {where} cannot be used: {exc.strerror}"
            ) from None
        for name, placement in placements.items():
            endpoint = ProxyEndpoint(
                host=placement.advertise_host,
                port=placement.advertise_port or server.port,
                peer_ports=peering.peer_ports if peering is not None else (),
            )
            self._advertised_proxies[name] = endpoint
            log.info(
                "node.proxy_advertised",
                executor=name or None,
                host=endpoint.host,
                port=endpoint.port,
            )
        self._advertised_proxy = next(iter(self._advertised_proxies.values()))
        return server

    async def _place_databases(self, executor: Executor) -> tuple[DatabaseMount, ...]:
        """The node's databases as its runs are told them: an executor whose runs cannot
        reach network databases directly relays them (podman) and says where."""
        databases = tuple(
            DatabaseMount(
                label=db.label,
                type=db.type.value,
                uri=db.uri,
                is_local_path=db.type.is_local_path,
            )
            for db in self.settings.databases
        )
        if not isinstance(executor, DatabaseRelaying):
            return databases
        try:
            return await executor.relay_databases(databases)
        except ExecutorError as exc:
            raise NodeStartError(str(exc)) from None

    def _lifecycle_config(
        self,
        identity: NodeIdentity,
        executor: Executor,
        proxy: ProxyServer | None,
        databases: tuple[DatabaseMount, ...],
    ) -> LifecycleConfig:
        settings = self.settings
        return LifecycleConfig(
            identity=identity,
            databases=databases,
            proxy=self._advertised_proxy if proxy is not None else None,
            task_dir=settings.task_dir,
            max_concurrent_runs=settings.max_concurrent_runs,
            deadline_seconds=settings.policies.resources.default_deadline_seconds,
            executor_kind=executor.kind,
            allowed_algorithms=tuple(settings.policies.allowed_algorithms),
            allowed_organizations=tuple(settings.policies.allowed_organizations),
            allowed_users=tuple(settings.policies.allowed_users),
            database_env={db.label: dict(db.env) for db in settings.databases if db.env},
            algorithm_env=dict(settings.algorithm_env),
            share_algorithm_logs=settings.share_algorithm_logs,
            share_config=settings.share_config,
            routes=self._routes(),
            proxies=dict(self._advertised_proxies) if proxy is not None else {},
        )

    def _routes(self) -> Routes | None:
        """With ``executors:``, which runs go where; ``None`` with one executor."""
        if self.settings.executors is None:
            return None
        return Routes(
            [
                Route(
                    name=entry.name,
                    images=tuple(entry.route.images),
                    schemes=tuple(entry.route.schemes),
                    profiles=tuple(entry.route.profiles),
                )
                for entry in self.settings.executors
            ]
        )


def listen_hosts(placements: Iterable[ProxyPlacement]) -> list[tuple[str, bool]]:
    """Where the proxy listens so that every executor's runs reach it: each placement's
    address (with ``freebind`` if one needs it), or only the wildcard when one asks for it
    (it covers the others; Linux refuses a specific address beside it on one port)."""
    hosts: dict[str, bool] = {}
    for placement in placements:
        hosts[placement.bind_host] = hosts.get(placement.bind_host, False) or placement.freebind
    wildcard = [host for host in hosts if host in ("0.0.0.0", "::")]
    if wildcard:
        return [(wildcard[0], False)]
    return list(hosts.items())


def otlp_target(telemetry: TelemetrySettings) -> OtlpTarget | None:
    """Where the settings say spans go (``None``: nowhere but the tests' processors)."""
    if telemetry.otlp_endpoint is None:
        return None
    return OtlpTarget(
        endpoint=telemetry.otlp_endpoint,
        headers={k: v.get_secret_value() for k, v in telemetry.otlp_headers.items()},
        certificate=telemetry.otlp_certificate,
        client_certificate=telemetry.otlp_client_certificate,
        client_key=telemetry.otlp_client_key,
        timeout=telemetry.otlp_timeout_seconds,
    )


async def serve(settings: NodeSettings) -> None:
    """Run a node until SIGTERM/SIGINT (the ``fednode start`` command)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Node(settings).run(stop)
