"""The one interface every runtime implements, and what an executor is given to work with.

An executor owns the runtime objects of its runs (Jobs, containers, processes) and follows
them without polling where the runtime can push events (Kubernetes watch streams, podman's
event stream). The node drives it:

* ``open()`` once at start-up (connect, begin following events), ``close()`` at shutdown;
* ``start(spec)`` is idempotent: a run whose object already exists is not started twice;
* ``events()`` yields :class:`~executors.spec.RunEvent` for every phase change, for runs
  started by this instance and for runs found by ``list_runs()`` (after a restart);
* ``collect``/``cleanup`` after a terminal event; ``kill`` at any time;
* ``list_runs()`` rebuilds the state from the runtime's own labels, for reconciliation;
* ``proxy_placement()`` says where the node's proxy must listen for this runtime's runs to
  reach it, and ``recover_token()`` gives back an adopted run's token where the runtime
  keeps it readable for the node — so the node never needs to know a runtime's internals;
* an executor whose runs cannot reach network databases directly also implements
  :class:`DatabaseRelaying` (podman: a relay on the runs' gateway, per database).

Errors: an operation that cannot do what it was asked raises :class:`ExecutorError` (or a
subclass) with a message that names the cause; the node turns it into a log line, a run
status or a start-up error. A run that *ends* badly is not an error: it is a terminal
:class:`~executors.spec.RunEvent` with a :class:`~executors.spec.Reason`.

Executors are plugins: each registers a factory under the ``fednode.executors`` entry-point
group (see :mod:`executors.registry`), so a third party can add one without editing fednode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from executors.credentials import RegistryCredential
from executors.outputs import OutputLimits
from executors.ports import ImagePorts
from executors.spec import DatabaseMount, RunEvent, RunOutput, RunSpec, RunState

#: Label keys put on every runtime object (Kubernetes label syntax, valid for podman too).
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NODE = "fednode.io/node"
LABEL_RUN = "fednode.io/run-id"
LABEL_TASK = "fednode.io/task-id"
LABEL_ACTION = "fednode.io/action"
#: Prefix of one label per database the run asked for (``fednode.io/db-<label>: "true"``):
#: what opens that database's egress (a NetworkPolicy's pod selector; podman's relay).
LABEL_DATABASE_PREFIX = "fednode.io/db-"
MANAGED_BY = "fednode"
#: Annotation (or label, where the runtime has no annotations) with the W3C trace context.
ANNOTATION_TRACEPARENT = "fednode.io/traceparent"
#: Annotation (or label) with the run's sealed token (:attr:`RunSpec.sealed_token`).
ANNOTATION_SEALED_TOKEN = "fednode.io/sealed-token"


class ExecutorError(Exception):
    """The runtime cannot be used at all (unreachable, misconfigured): an operator problem."""


class UnknownRun(ExecutorError):
    """The runtime has no object for this run id."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"no run {run_id} in this executor")
        self.run_id = run_id


class ImageUnavailable(ExecutorError):
    """The run's image cannot be had (missing, not allowed by the pull policy, pull failed):
    the run ends ``failed``/``image-not-found`` with this message."""


class TokenUnavailable(ExecutorError):
    """The runtime keeps no copy of this run's token that the node may read back."""


class PeeringUnavailable(ExecutorError):
    """This run cannot take part in algorithm-to-algorithm peering on its runtime (e.g.
    apptainer's ``proxy_network: host``: no isolation to tell runs apart); says why."""


class ProxyPlacement(NamedTuple):
    """Where the node's proxy listens, and the host this executor's runs are told to call.

    ``freebind``: bind ``bind_host`` even before any interface has that address (podman's
    run network gets its gateway address only while a container is attached).
    ``advertise_port``: the port runs are told, where something in between forwards to the
    proxy (e.g. a Service); ``None``: the port the proxy listens on.
    """

    bind_host: str
    advertise_host: str
    freebind: bool = False
    advertise_port: int | None = None


class ExecutorContext(BaseModel):
    """What the node tells every executor, whatever its kind."""

    model_config = ConfigDict(frozen=True)

    node_name: str
    task_dir: Path
    #: One credential per registry; an executor hands a pull only its image's registry's.
    registry_credentials: tuple[RegistryCredential, ...] = ()
    #: How much output and log ``collect`` accepts (the node's ``max_output_bytes`` and
    #: ``max_log_bytes``); see :mod:`executors.outputs`.
    limits: OutputLimits = Field(default_factory=OutputLimits)
    #: The forwarder ports of algorithm-to-algorithm streams on the node (``peering``;
    #: empty: off). Runs must be able to reach them beside the proxy port; the node must be
    #: able to reach the runs (Kubernetes: the runs' ``-peers`` NetworkPolicy).
    peer_ports: tuple[int, ...] = ()
    #: The node's ``peering.image_ports``, for a runtime that cannot read an image's
    #: ``EXPOSE`` and must know a run's ports before it starts (apptainer).
    peer_image_ports: tuple[ImagePorts, ...] = ()


def run_labels(spec: RunSpec, *, node_name: str) -> dict[str, str]:
    """The labels that let any executor find and rebuild its runs after a restart."""
    return {
        **spec.labels,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_NODE: node_name,
        LABEL_RUN: str(spec.run_id),
        LABEL_TASK: str(spec.task_id),
        LABEL_ACTION: spec.action,
        **{database_label(label): "true" for label in spec.requested_databases},
    }


def database_label(label: str) -> str:
    """The run label saying that a run asked for database ``label``."""
    return f"{LABEL_DATABASE_PREFIX}{label.lower()}"


def requested_databases(labels: Mapping[str, str]) -> tuple[str, ...]:
    """The database labels a run's runtime labels say it asked for (lower case)."""
    return tuple(
        key.removeprefix(LABEL_DATABASE_PREFIX)
        for key, value in labels.items()
        if key.startswith(LABEL_DATABASE_PREFIX) and value == "true"
    )


@runtime_checkable
class Executor(Protocol):
    """Run algorithm containers on one runtime. All methods are coroutine-safe."""

    kind: ClassVar[str]

    async def open(self) -> None:
        """Connect to the runtime and start following its events."""

    async def close(self) -> None:
        """Stop following events and release connections; runs keep running."""

    async def start(self, spec: RunSpec) -> None:
        """Create and start the run's container; a no-op if it already exists."""

    async def kill(self, run_id: int) -> None:
        """Stop the run; its terminal event has phase ``killed``. Unknown ids are ignored."""

    def events(self) -> AsyncIterator[RunEvent]:
        """Every phase change of every run of this executor, in order per run.

        Raises :class:`ExecutorError` when the executor can no longer follow its runtime
        (its watch or subscription task died): the node then exits, to be restarted.
        """
        ...

    async def collect(self, run_id: int) -> RunOutput:
        """The output file and the log of a finished run."""
        ...

    async def cleanup(self, run_id: int) -> None:
        """Remove the run's runtime objects and files (the decrypted input included)."""

    async def list_runs(self) -> list[RunState]:
        """All runs this node has on the runtime, rebuilt from labels."""
        ...

    def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
        """Where the proxy must listen so that this executor's runs reach it (asked once,
        after :meth:`open`, before the proxy starts).

        ``host`` and ``advertise_host`` are the operator's ``proxy.host`` and
        ``proxy.advertise_host`` (``None``: not set); the executor keeps them unless its
        runtime dictates otherwise (podman: the run network's gateway).
        """
        ...

    async def recover_token(self, state: RunState) -> str:
        """The container token of a run found by :meth:`list_runs`, read back from the runtime.

        The node asks only when the sealed copy (:attr:`RunState.sealed_token`) is missing or
        cannot be opened. Raises :class:`TokenUnavailable` naming why when the runtime keeps
        no copy the node may read (Kubernetes: a Secret the node may not get).
        """
        ...


@runtime_checkable
class DatabaseRelaying(Protocol):
    """An executor whose runs reach network databases through a relay of its own.

    A run on an internal network (podman) has no route to a database's host; such an
    executor relays each network database on an address its runs can reach, and opens that
    relay only to runs that asked for the database. Executors whose runs reach the database
    directly (Kubernetes: a NetworkPolicy egress rule per database) do not implement this.
    """

    async def relay_databases(
        self, databases: tuple[DatabaseMount, ...]
    ) -> tuple[DatabaseMount, ...]:
        """Start relaying the network ones among ``databases`` (asked once, after
        :meth:`Executor.open`, before any run); returns them as runs are to be told them
        (:attr:`DatabaseMount.run_host`/:attr:`~DatabaseMount.run_port` set).
        :class:`ExecutorError` names a database that cannot be relayed."""
        ...


class ExecutorFactory(Protocol):
    """What an entry point of the ``fednode.executors`` group points to."""

    settings_model: ClassVar[type[BaseModel]]

    def __call__(self, settings: BaseModel, *, context: ExecutorContext) -> Executor: ...
