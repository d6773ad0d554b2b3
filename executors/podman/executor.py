"""The podman executor: one container per run, driven through podman's REST API.

How a run goes, and where each step is observed:

* ``start(spec)``: the image is checked (and pulled, per the pull policy), the run's files
  are written, the container is created (labelled with node, run and task) and started.
  ``starting`` is published before, ``running`` as soon as podman says it started. A
  container that already exists is adopted, never created twice.
* The end is observed twice, and :class:`~executors.events.RunEventStream` keeps the first:
  conmon's exit file through inotify (:mod:`executors.podman.exits`, milliseconds), and
  podman's event stream (``died``; podman 4.3 tails its events file every 250 ms). Either
  way the container is inspected once and its state classified by
  :func:`~executors.podman.containers.phase_of`.
* One background task follows the event stream; when it breaks it reconnects with backoff,
  and every (re)subscription is followed by a re-list by label that publishes each run's
  current phase, so nothing that happened while disconnected is lost (level-triggered).
* ``kill`` records the request in the run's files, then sends SIGKILL; ``collect`` reads
  the output file and the container log, both bounded and the output never through a link
  (:mod:`executors.outputs`); ``cleanup`` removes container and files.
* A run that asks for GPUs gets distinct CDI devices (``gpu_devices``) chosen by
  :class:`~executors.devices.DeviceAllocator`; it waits, ``starting``, while too few are
  free, and a container's label names its devices, so the relist after a restart tells
  the allocator which are busy before anything starts.
* A run that may call the proxy joins the runs' internal network, created once; before it
  does, :class:`~executors.podman.firewall.RunsFirewall` makes sure the host's nftables
  ruleset lets it reach only the proxy's port on the gateway (``firewall: nftables``).
  ``close`` leaves it all, the port included: the runs stay fenced in and reach the
  proxy again when the node is back.
* Network databases (``sql``, ``sparql``, ``omop``) are relayed on the gateway, one port
  each (:mod:`executors.podman.relay`, :meth:`PodmanExecutor.relay_databases`). A run on
  the network is set up (``init``: podman gives it its address) before it starts; its
  address is then let through to the relays of exactly the databases it asked for, by the
  relay and by the firewall, and taken out again at ``cleanup``.

Nothing here waits in a loop: every state change arrives as a notification, and the only
sleep is the reconnect backoff.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from pydantic import BaseModel

from common.backoff import Backoff
from common.logging import get_logger
from executors.base import (
    LABEL_NODE,
    ExecutorContext,
    ExecutorError,
    ImageUnavailable,
    ProxyPlacement,
    UnknownRun,
    requested_databases,
)
from executors.credentials import credential_for
from executors.devices import DeviceAllocator
from executors.events import RunEventStream
from executors.memory import GoneRuns, StartsInFlight
from executors.podman.api import MIN_API_VERSION, LibpodClient, LibpodError, registry_auth
from executors.podman.config import PodmanSettings
from executors.podman.containers import (
    ContainerState,
    container_name,
    create_body,
    phase_of,
    run_id_of,
)
from executors.podman.exits import ExitWatch
from executors.podman.firewall import RunNetwork, RunsFirewall, remove_firewall
from executors.podman.relay import DatabaseRelay, RelayTarget
from executors.ports import DeclaredPort, ports_from_image_config
from executors.runfiles import RunFiles
from executors.spec import (
    DatabaseMount,
    Phase,
    Reason,
    RunEvent,
    RunOutput,
    RunSpec,
    RunState,
    network_address,
)
from executors.tasks import SharedWork, TaskOwner

log = get_logger(__name__)

#: The database types whose URI names a host:port runs must reach (relayed on the gateway).
NETWORK_DATABASE_TYPES = frozenset({"sql", "sparql", "omop"})

_RECONNECT_FIRST = 0.1
_RECONNECT_MAX = 5.0


class PodmanExecutor:
    """Runs each algorithm as a podman container; see the module docstring."""

    kind: ClassVar[str] = "podman"
    settings_model: ClassVar[type[BaseModel]] = PodmanSettings

    def __init__(self, settings: PodmanSettings, *, context: ExecutorContext) -> None:
        self._settings = settings
        self._context = context
        self._api = LibpodClient(settings.socket_path, timeout=settings.api_timeout_seconds)
        self._stream = RunEventStream()
        self._label_filter = f"{LABEL_NODE}={context.node_name}"
        self._exit_watch: ExitWatch | None = None
        self._subscribed = asyncio.Event()
        self._tasks = TaskOwner("podman", expected=(ExecutorError, LibpodError))
        self._run_of_container: dict[str, int] = {}
        self._starting = StartsInFlight()
        #: Removed runs: late podman events about them are ignored.
        self._gone = GoneRuns()
        self._pulls: SharedWork[str, None] = SharedWork(self._tasks)
        self._network: asyncio.Task[RunNetwork] | None = None
        self._firewall = RunsFirewall(seconds=settings.api_timeout_seconds)
        #: Network databases' relays by label, and each run's address they were opened to.
        self._relays: dict[str, DatabaseRelay] = {}
        self._addresses: dict[int, str] = {}
        self._gpus = DeviceAllocator(settings.gpu_devices)

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the API version, watch exits, and subscribe to podman's events.

        Returns once the first subscription and re-list are done, so every run this node
        already has on podman has had its current phase published.
        """
        await self._api.open()
        try:
            version = await self._api.version()
            if version[:2] < MIN_API_VERSION:
                raise ExecutorError(
                    f"podman at {self._settings.socket_path} speaks API "
                    f"{'.'.join(map(str, version))}; fednode needs 4.0 or newer"
                )
            if self._settings.exits_dir is not None:
                watch = ExitWatch(
                    self._settings.exits_dir,
                    on_exit=self._on_exit_file,
                    on_overflow=self._on_exit_overflow,
                )
                if watch.start():
                    self._exit_watch = watch
            bridge_meta = None
            if self._settings.firewall != "off":
                bridge_meta = await self._firewall.learn_host()
            self._stream.fed_by(self._tasks.spawn(self._follow_events(), name="podman-events"))
            try:
                await asyncio.wait_for(
                    self._subscribed.wait(), timeout=self._settings.api_timeout_seconds
                )
            except TimeoutError:
                raise ExecutorError(
                    f"could not subscribe to podman's events at {self._settings.socket_path}"
                ) from None
        except BaseException:
            await self.close()
            raise
        log.info(
            "podman.opened",
            socket=self._settings.socket_path,
            api_version=".".join(map(str, version)),
            exit_watch=self._exit_watch is not None,
            # Facts about the host, said once here rather than by every run: None = unknown.
            nft_bridge_meta=bridge_meta,
        )

    async def close(self) -> None:
        """Stop following podman and release the connection; containers keep running."""
        if self._exit_watch is not None:
            self._exit_watch.close()
            self._exit_watch = None
        for relay in self._relays.values():
            await relay.close()
        self._relays.clear()
        await self._tasks.close()
        self._network = None
        # The firewall stays as it is, this proxy's port included: the runs keep running
        # and call that port again as soon as the node is back (they were told it).
        await self._api.close()

    def events(self) -> AsyncIterator[RunEvent]:
        return aiter(self._stream)

    # -- runs ---------------------------------------------------------------------------------

    async def start(self, spec: RunSpec) -> None:
        """Create and start the run's container; adopt it instead if it already exists.

        A missing image, a refused network or a container podman will not create or start
        ends as a ``failed`` event with a reason; only podman being unreachable raises. A
        second start of a run whose start is under way here waits for that one instead.
        """
        await self._starting.run(spec.run_id, lambda: self._start(spec))

    async def _start(self, spec: RunSpec) -> None:
        run_id = spec.run_id
        name = self._name(run_id)
        bound = log.bind(run_id=run_id, task_id=spec.task_id, container=name)
        existing = await self._api.inspect_container(name)
        if existing is not None:
            if self._is_this_run(existing, spec):
                bound.info("podman.run.adopted")
                await self._adopt(existing)
                return
            # Same name, another task: left by an earlier server (a reset database
            # reuses run ids). It is not this run; replace it rather than adopt it.
            bound.warning("podman.run.stale_container_removed")
            await self._api.remove_container(name)
        self._stream.publish(RunEvent.now(run_id, Phase.STARTING))
        try:
            await self._ensure_image(spec.image)
        except ImageUnavailable as exc:
            bound.warning("podman.run.image_unavailable", image=spec.image, error=str(exc))
            self._stream.fail(run_id, Reason.IMAGE_NOT_FOUND, str(exc))
            return
        if spec.proxy is not None:
            try:
                await self._ensure_network(
                    proxy_port=spec.proxy.port, peer_ports=spec.proxy.peer_ports
                )
            except ExecutorError as exc:
                bound.error("podman.run.network_unavailable", error=str(exc))
                self._stream.fail(run_id, Reason.START_FAILED, str(exc))
                return
        devices = await self._gpus.take_for(spec, stream=self._stream, log=bound)
        if devices is None:
            return
        files = self._files(run_id)
        files.prepare(spec, owner=(self._settings.run_uid, self._settings.run_gid))
        body = create_body(
            spec,
            settings=self._settings,
            node_name=self._context.node_name,
            files=files,
            devices=devices,
        )
        try:
            container_id = await self._api.create_container(body)
        except LibpodError as exc:
            self._gpus.release(run_id)
            if "already in use" in exc.message:  # another process started this run
                existing = await self._inspect_once_created(name)
                if existing is not None:
                    await self._adopt(existing)
                    return
            bound.error("podman.run.create_failed", error=exc.message)
            self._stream.fail(run_id, Reason.START_FAILED, f"podman refused the container: {exc}")
            return
        except BaseException:
            self._gpus.release(run_id)
            raise
        self._run_of_container[container_id] = run_id
        if spec.proxy is not None and self._relays:
            try:
                await self._open_databases(name, run_id, spec.requested_databases)
            except (ExecutorError, LibpodError) as exc:
                bound.error("podman.run.databases_unavailable", error=str(exc))
                self._stream.fail(run_id, Reason.START_FAILED, str(exc))
                return
        if files.killed:
            bound.info("podman.run.killed_before_start")
            self._gpus.release(run_id)
            self._stream.publish(RunEvent.now(run_id, Phase.KILLED, Reason.KILLED))
            return
        await self._start_created(name, run_id, bound)

    async def _inspect_once_created(self, name: str) -> dict[str, Any] | None:
        """Inspect a container whose name podman reserved a moment ago.

        podman reserves the name in its storage before the container is in its database,
        so for a short while the name is taken and yet the container is not found.
        """
        for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
            await asyncio.sleep(delay)
            document = await self._api.inspect_container(name)
            if document is not None:
                return document
        return None

    @staticmethod
    def _is_this_run(document: dict[str, Any], spec: RunSpec) -> bool:
        state = ContainerState.from_inspect(document)
        return state is not None and state.task_id == spec.task_id

    async def _start_created(self, name: str, run_id: int, bound: Any) -> None:
        try:
            await self._api.start_container(name)
        except LibpodError as exc:
            bound.error("podman.run.start_failed", error=exc.message)
            self._stream.fail(run_id, Reason.START_FAILED, f"podman could not start it: {exc}")
            return
        if self._files(run_id).killed:
            # kill() came while podman was starting it: it saw "created", so finish its job.
            await self._signal(name, run_id)
            return
        self._stream.publish(RunEvent.now(run_id, Phase.RUNNING))
        bound.info("podman.run.started")

    async def _adopt(self, document: dict[str, Any]) -> None:
        """An existing container of a run: follow it, starting it if it was only created."""
        state = ContainerState.from_inspect(document)
        if state is None:
            return
        self._run_of_container[state.container_id] = state.run_id
        verdict = phase_of(state, kill_requested=self._files(state.run_id).killed)
        if verdict is not None and verdict.phase is Phase.STARTING:
            bound = log.bind(run_id=state.run_id, container=self._name(state.run_id))
            await self._start_created(self._name(state.run_id), state.run_id, bound)
            return
        self._publish(state)

    # -- peering (executors.ports.PeerEndpoints) ----------------------------------------

    async def declared_ports(self, run_id: int, image: str) -> list[DeclaredPort]:
        """The image's ``EXPOSE``d TCP ports and their ``p<port>`` labels."""
        document = await self._api.inspect_image(image)
        config = (document or {}).get("Config") or {}
        return ports_from_image_config(config.get("ExposedPorts"), config.get("Labels"))

    async def run_address(self, run_id: int) -> str | None:
        """The run's address on the runs' network (the node connects there)."""
        document = await self._api.inspect_container(self._name(run_id))
        if document is None or not (document.get("State") or {}).get("Running"):
            return None
        networks = (document.get("NetworkSettings") or {}).get("Networks") or {}
        entry = networks.get(self._settings.network) or {}
        address = entry.get("IPAddress")
        return str(address) if address else None

    async def kill(self, run_id: int) -> None:
        """SIGKILL the run's container; its terminal event is ``killed``/``killed``."""
        name = self._name(run_id)
        files = self._files(run_id)
        document = await self._api.inspect_container(name)
        if document is None:
            if run_id in self._starting:
                files.mark_killed()  # start() checks this before it starts the container
                self._gpus.withdraw(run_id)  # a start waiting for GPUs ends its wait
                log.info("podman.run.kill_requested", run_id=run_id, before_start=True)
            return
        state = ContainerState.from_inspect(document)
        if state is None:
            return
        verdict = phase_of(state, kill_requested=False)
        if verdict is not None and verdict.phase.is_terminal:
            return  # it ended on its own first; that end stands
        files.mark_killed()
        log.info("podman.run.kill_requested", run_id=run_id, container=name)
        if verdict is not None and verdict.phase is Phase.STARTING:
            # No process yet; a start() in flight sees the mark before or after it starts.
            self._stream.publish(
                RunEvent.now(run_id, Phase.KILLED, Reason.KILLED, message="killed before start")
            )
        await self._signal(name, run_id)

    async def _signal(self, name: str, run_id: int) -> None:
        try:
            await self._api.kill_container(name)
        except LibpodError as exc:
            # 409: not running (not started yet, or just ended: that end is being reported).
            if exc.status not in (404, 409):
                raise ExecutorError(f"podman could not kill run {run_id}: {exc}") from exc

    async def collect(self, run_id: int) -> RunOutput:
        name = self._name(run_id)
        if await self._api.inspect_container(name) is None:
            raise UnknownRun(run_id)
        limits = self._context.limits
        try:
            logs = await self._api.container_logs(name, limit=limits.max_log_bytes)
        except (LibpodError, ExecutorError) as exc:  # the output is still worth reading
            logs = f"(podman could not return the log: {exc})"
        read = await self._files(run_id).read_output(limit=limits.max_output_bytes)
        return RunOutput(read.data, logs, read.refused)

    async def cleanup(self, run_id: int) -> None:
        """Remove the container and the run's files; later podman events about it are ignored."""
        self._gone.add(run_id)
        await self._close_databases(run_id)
        self._gpus.release(run_id)
        try:
            await self._api.remove_container(self._name(run_id))
        except LibpodError as exc:
            raise ExecutorError(f"podman could not remove run {run_id}: {exc}") from exc
        finally:
            self._files(run_id).remove()
        self._stream.forget(run_id)
        for container_id in [c for c, r in self._run_of_container.items() if r == run_id]:
            del self._run_of_container[container_id]
        log.info("podman.run.cleaned_up", run_id=run_id)

    async def list_runs(self) -> list[RunState]:
        """Every run of this node on podman, from the container labels."""
        runs: list[RunState] = []
        for state in await self._list():
            verdict = phase_of(state, kill_requested=self._files(state.run_id).killed)
            if verdict is None:
                continue
            runs.append(
                RunState(
                    run_id=state.run_id,
                    task_id=state.task_id,
                    phase=verdict.phase,
                    reason=verdict.reason,
                    exit_code=verdict.exit_code,
                    trace_context=state.trace_context,
                )
            )
        return runs

    def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
        """On the run network's gateway, bound before the bridge has that address."""
        gateway = self._settings.network_gateway
        return ProxyPlacement(gateway, advertise_host or gateway, freebind=True)

    async def recover_token(self, state: RunState) -> str:
        """From the run's token file, which the node wrote and the container reads."""
        return self._files(state.run_id).read_token()

    # -- network databases -------------------------------------------------------------------

    async def relay_databases(
        self, databases: tuple[DatabaseMount, ...]
    ) -> tuple[DatabaseMount, ...]:
        """Relay each network database on the gateway (ports from
        ``database_relay_port`` on, in order); runs are told the relay's address.

        Runs that kept going while the node was down are let through again to the
        databases they asked for (their container's label says which).
        """
        gateway = self._settings.network_gateway
        port = self._settings.database_relay_port
        placed = []
        for database in databases:
            if database.is_local_path or database.type not in NETWORK_DATABASE_TYPES:
                placed.append(database)
                continue
            address = network_address(database.uri)
            if address is None:
                raise ExecutorError(
                    f"database {database.label!r} ({database.type}): its uri names no host "
                    f"and port, so its runs cannot be given a way to it; write it as "
                    f"scheme://host:port/..."
                )
            target = RelayTarget(database.label, address[0], address[1], port)
            relay = DatabaseRelay(
                target, bind_host=gateway, connect_seconds=self._settings.api_timeout_seconds
            )
            await relay.open()
            self._relays[database.label] = relay
            placed.append(database.model_copy(update={"run_host": gateway, "run_port": port}))
            port += 1
        if self._relays:
            await self._readmit_running()
        return tuple(placed)

    async def _open_databases(self, name: str, run_id: int, requested: tuple[str, ...]) -> None:
        """Give the created container its address (``init``) and open to it the relays of
        the databases it asked for, and no other (an earlier run may have had the address)."""
        await self._api.init_container(name)
        document = await self._api.inspect_container(name)
        address = _address_on(document or {}, self._settings.network)
        if address is None:
            raise ExecutorError(
                f"podman gave run {run_id} no address on network {self._settings.network}"
            )
        await self._admit(run_id, address, requested)

    async def _admit(self, run_id: int, address: str, requested: tuple[str, ...]) -> None:
        wanted = {label.lower() for label in requested}
        allowed = {label: relay for label, relay in self._relays.items() if label.lower() in wanted}
        for relay in self._relays.values():
            relay.revoke(address)
        if self._settings.firewall != "off" and self._network is not None:
            network = await asyncio.shield(self._network)
            await self._firewall.admit(
                network,
                address=address,
                relay_ports=frozenset(r.target.relay_port for r in self._relays.values()),
                allowed_ports=frozenset(r.target.relay_port for r in allowed.values()),
            )
        for relay in allowed.values():
            relay.admit(address)
        # podman hands an ended run's address out again, maybe before that run is cleaned
        # up: the address is now this run's, and that cleanup must not take it away.
        for other in [r for r, a in self._addresses.items() if a == address and r != run_id]:
            del self._addresses[other]
        self._addresses[run_id] = address
        log.info(
            "podman.run.databases_opened", run_id=run_id, address=address, labels=sorted(allowed)
        )

    async def _close_databases(self, run_id: int) -> None:
        """Take the run's address out of every relay and the firewall's database set."""
        address = self._addresses.pop(run_id, None)
        if address is None:
            return  # never opened, or its address went to a later run (see _admit)
        for relay in self._relays.values():
            relay.revoke(address)
        if self._settings.firewall != "off" and self._network is not None:
            try:
                await self._firewall.admit(
                    await asyncio.shield(self._network),
                    address=address,
                    relay_ports=frozenset(r.target.relay_port for r in self._relays.values()),
                    allowed_ports=frozenset(),
                )
            except ExecutorError as exc:
                log.warning("podman.run.databases_close_failed", run_id=run_id, error=str(exc))

    async def _readmit_running(self) -> None:
        """After a restart: open the relays again to the running runs that asked for them."""
        for state in await self._list():
            if state.status not in ("running", "paused"):
                continue
            document = await self._api.inspect_container(state.container_id)
            address = _address_on(document or {}, self._settings.network)
            if address is None:
                continue
            labels = requested_databases(state.labels)
            if not labels:
                continue
            self._ensure_network_task()
            try:
                await self._admit(state.run_id, address, labels)
            except ExecutorError as exc:
                log.warning("podman.run.databases_unavailable", run_id=state.run_id, error=str(exc))

    # -- following podman ---------------------------------------------------------------------

    async def _follow_events(self) -> None:
        """The one owner of the event subscription: subscribe, re-list, follow; repeat."""
        backoff = Backoff(first=_RECONNECT_FIRST, cap=_RECONNECT_MAX)
        filters = {"type": ["container"], "label": [self._label_filter]}
        while True:
            try:
                async with self._api.events(filters=filters) as events:
                    await self._relist()
                    self._subscribed.set()
                    backoff.reset()
                    async for event in events:
                        self._on_podman_event(event)
                log.warning("podman.events.ended")
            except (ExecutorError, LibpodError) as exc:
                log.warning("podman.events.lost", error=str(exc))
            except Exception:
                log.exception("podman.events.failed")
            log.info("podman.events.resubscribing", delay=round(await backoff.pause(), 2))

    async def _relist(self) -> None:
        """Publish the current phase of every run on podman (RunEventStream drops repeats)."""
        for state in await self._list():
            self._publish(state)

    async def _list(self) -> list[ContainerState]:
        entries = await self._api.list_containers(labels=[self._label_filter])
        states = []
        for entry in entries:
            state = ContainerState.from_list_entry(entry)
            if state is None or state.run_id in self._gone:
                continue
            self._run_of_container[state.container_id] = state.run_id
            states.append(state)
        return states

    def _on_podman_event(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        container_id = str(actor.get("ID") or event.get("id") or "")
        run_id = run_id_of(attributes)
        if run_id is None or run_id in self._gone:
            return
        action = event.get("Action") or event.get("status")
        if action == "start":
            self._run_of_container[container_id] = run_id
            self._stream.publish(RunEvent.now(run_id, Phase.RUNNING))
        elif action == "died":
            self._tasks.spawn(self._settle(container_id, run_id), name=f"podman-settle-{run_id}")
        elif action == "remove":
            if self._run_of_container.get(container_id) != run_id:
                return  # not the container this run has now (a stale or replayed event)
            phase = self._stream.phase_of(run_id)
            if phase is not None and not phase.is_terminal and run_id not in self._starting:
                log.warning("podman.run.lost", run_id=run_id, container=container_id)
                self._stream.fail(run_id, Reason.LOST, "its container was removed while it ran")

    def _on_exit_file(self, container_id: str) -> None:
        run_id = self._run_of_container.get(container_id)
        if run_id is not None and run_id not in self._gone:
            self._tasks.spawn(self._settle(container_id, run_id), name=f"podman-settle-{run_id}")

    def _on_exit_overflow(self) -> None:
        log.warning("podman.exit_watch.overflow")
        self._tasks.spawn(self._relist(), name="podman-relist")

    async def _settle(self, container_id: str, run_id: int) -> None:
        """A container ended: inspect it once and publish its terminal phase."""
        phase = self._stream.phase_of(run_id)
        if phase is not None and phase.is_terminal:
            return
        document = await self._api.inspect_container(container_id)
        if run_id in self._gone:
            return
        if document is None:
            self._stream.fail(run_id, Reason.LOST, "its container vanished as it ended")
            return
        state = ContainerState.from_inspect(document)
        if state is not None:
            self._publish(state)

    def _publish(self, state: ContainerState) -> None:
        verdict = phase_of(state, kill_requested=self._files(state.run_id).killed)
        if verdict is None:
            return
        run_id = state.run_id
        self._gpus.observe(run_id, state.labels, ended=verdict.phase.is_terminal)
        if verdict.phase.is_terminal:
            if self._stream.publish_end(
                verdict.event(run_id),
                ran=state.exit_code is not None,
            ):
                log.info(
                    "podman.run.ended",
                    run_id=run_id,
                    phase=verdict.phase.value,
                    reason=verdict.reason.value if verdict.reason else None,
                    exit_code=verdict.exit_code,
                )
            return
        self._stream.publish(verdict.event(run_id))

    # -- images and network -------------------------------------------------------------------

    async def _ensure_image(self, image: str) -> None:
        """The image is there (pulled if the policy says so); :class:`ImageUnavailable`
        says why not."""
        policy = self._settings.pull_policy
        if policy != "always" and await self._api.image_exists(image):
            return
        if policy == "never":
            raise ImageUnavailable(
                f"image {image} is not present on this node (pull policy: never)"
            )
        # Concurrent starts of one image share one pull.
        await self._pulls.run(image, lambda: self._pull(image), name=f"podman-pull-{image}")

    async def _pull(self, image: str) -> None:
        settings = self._settings
        credential = credential_for(image, self._context.registry_credentials)
        auth = registry_auth(credential) if credential is not None else None
        log.info("podman.image.pulling", image=image, registry_login=credential is not None)
        try:
            await self._api.pull_image(image, auth=auth, seconds=settings.pull_timeout_seconds)
        except (LibpodError, ExecutorError) as exc:
            message = exc.message if isinstance(exc, LibpodError) else str(exc)
            raise ImageUnavailable(f"image {image} could not be pulled: {message}") from None
        log.info("podman.image.pulled", image=image)

    async def _ensure_network(self, *, proxy_port: int, peer_ports: tuple[int, ...] = ()) -> None:
        """Create the runs' internal network once and fence it in (per ``firewall``), so
        that a run may join it to reach ``proxy_port``; :class:`ExecutorError` says why not."""
        made = await asyncio.shield(self._ensure_network_task())
        if self._settings.firewall != "off":
            await self._firewall.allow(made, proxy_port=proxy_port, peer_ports=peer_ports)

    def _ensure_network_task(self) -> asyncio.Task[RunNetwork]:
        network = self._network
        if network is None or (
            network.done() and (network.cancelled() or network.exception() is not None)
        ):
            # First use, or the last attempt failed: (re)try; concurrent starts share one.
            network = self._network = self._tasks.spawn(self._make_network(), name="podman-network")
        return network

    async def _make_network(self) -> RunNetwork:
        settings = self._settings
        name = settings.network
        if settings.firewall == "off":
            log.warning(
                "podman.firewall.off",
                network=name,
                detail="runs on it can reach each other and host services on the gateway",
            )
            await remove_firewall(name, seconds=settings.api_timeout_seconds)
        document = await self._api.inspect_network(name)
        if document is None:
            body = {
                "name": name,
                "driver": "bridge",
                "internal": True,
                "dns_enabled": False,
                "subnets": [
                    {"subnet": str(settings.network_subnet), "gateway": settings.network_gateway}
                ],
            }
            try:
                await self._api.create_network(body)
                log.info("podman.network.created", network=name, subnet=body["subnets"])
            except LibpodError as exc:
                if exc.status != 409:
                    raise ExecutorError(
                        f"podman could not create network {name}: {exc.message}"
                    ) from None
            document = await self._api.inspect_network(name)
        if document is None:
            raise ExecutorError(f"podman network {name} vanished as it was made")
        if not document.get("internal"):
            raise ExecutorError(
                f"podman network {name} exists but is not internal; runs would get a route "
                "out, so none is attached to it"
            )
        return _run_network(name, document)

    # -- plumbing -----------------------------------------------------------------------------

    def _name(self, run_id: int) -> str:
        return container_name(self._context.node_name, run_id)

    def _files(self, run_id: int) -> RunFiles:
        return RunFiles(self._context.task_dir, run_id)


def _address_on(document: dict[str, Any], network: str) -> str | None:
    """A container's IPv4 address on ``network``, from its inspect document."""
    networks = (document.get("NetworkSettings") or {}).get("Networks") or {}
    address = (networks.get(network) or {}).get("IPAddress")
    return str(address) if address else None


def _run_network(name: str, document: dict[str, Any]) -> RunNetwork:
    """The bridge, subnet and gateway of a network, from libpod's inspect document.

    netavark names the bridge when the network is created (``network_interface``, kept in
    the network's config file) and brings it up when the first container attaches, so the
    name is known, and stable, before any run joins.
    """
    bridge = document.get("network_interface")
    for entry in document.get("subnets") or []:
        try:
            subnet = ipaddress.ip_network(str(entry.get("subnet")))
            gateway = ipaddress.ip_address(str(entry.get("gateway")))
        except ValueError:
            continue
        if isinstance(subnet, ipaddress.IPv4Network) and isinstance(gateway, ipaddress.IPv4Address):
            if not bridge:
                raise ExecutorError(
                    f"podman network {name} names no bridge interface; it cannot be fenced in"
                )
            return RunNetwork(name=name, bridge=str(bridge), subnet=subnet, gateway=gateway)
    raise ExecutorError(
        f"podman network {name} has no IPv4 subnet with a gateway, where the proxy would "
        "listen (podman gives an internal network one only when asked: --gateway)"
    )
