"""The executor-neutral values that cross the executor boundary.

``RunSpec`` is everything an executor needs to start one run; ``RunEvent`` is what it
reports back; ``RunState`` is what it can tell about a run from the runtime's own objects
(labels, annotations) after a restart, including values it keeps for the node without
reading them (the trace context; on Kubernetes the sealed token); ``RunOutput`` is what a
finished run produced.

Phases form one small state machine, the same for every runtime::

    pending -> starting -> running -> succeeded | failed | killed

A terminal phase carries a :class:`Reason` that the node maps onto the server's run
statuses (``crashed``, ``non-existing Docker image``, ...). Nothing here knows about HTTP,
the server or any runtime's client library.
"""

from __future__ import annotations

import enum
import ipaddress
from datetime import UTC, datetime
from typing import Annotated, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

#: Where an executor places the run's own files inside the container.
CONTAINER_TASK_DIR = "/mnt/task"
#: Where file databases appear inside the container: ``/mnt/data/<label>/<file name>``.
CONTAINER_DATA_DIR = "/mnt/data"
#: Writable scratch space inside the container (the root file system is read-only).
CONTAINER_SCRATCH_DIR = "/tmp"

INPUT_FILE_NAME = "input"
OUTPUT_FILE_NAME = "output"
TOKEN_FILE_NAME = "token"


class Phase(enum.StrEnum):
    """Where a run is in its life; the last three are terminal."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.KILLED})


class Reason(enum.StrEnum):
    """Why a run ended (or cannot start); the node maps these to server run statuses."""

    COMPLETED = "completed"
    CRASHED = "crashed"  # the algorithm exited non-zero
    IMAGE_NOT_FOUND = "image-not-found"  # missing image or failed pull
    OOM_KILLED = "oom-killed"
    DEADLINE_EXCEEDED = "deadline-exceeded"
    KILLED = "killed"  # on request (kill_containers)
    START_FAILED = "start-failed"  # the runtime refused to create or start it
    NOT_ALLOWED = "not-allowed"  # refused by a policy (e.g. more GPUs than allowed)
    LOST = "lost"  # the runtime object vanished without a terminal state
    OUTPUT_REFUSED = "output-refused"  # its output is a link, not a file, or over the limit


class DatabaseMount(BaseModel):
    """A database the run may read: file-like ones are bound read-only into the container;
    network ones (``sql``, ``sparql``, ``omop``, ...) are reached at their URI's host:port,
    directly or through a relay of the executor's (:class:`~executors.base.DatabaseRelaying`)."""

    model_config = ConfigDict(frozen=True)

    label: str
    type: str
    uri: str  # a host path for csv/parquet/excel/folder, else a service URI
    is_local_path: bool
    #: Where runs reach a network database when an executor relays it: the URI's port is
    #: replaced by ``run_port``, and an IP-literal host by ``run_host`` (a host *name* is
    #: kept, and the executor maps it to ``run_host`` in the run's hosts file, so TLS
    #: certificates still match). ``None``: the URI as configured.
    run_host: str | None = None
    run_port: int | None = None

    @property
    def container_uri(self) -> str:
        """What the algorithm sees as this database's URI."""
        if not self.is_local_path:
            if self.run_host is None or self.run_port is None:
                return self.uri
            return relayed_uri(self.uri, host=self.run_host, port=self.run_port)
        if self.type == "folder":
            return f"{CONTAINER_DATA_DIR}/{self.label}"
        return f"{CONTAINER_DATA_DIR}/{self.label}/{self.uri.rsplit('/', 1)[-1]}"


def network_address(uri: str) -> tuple[str, int] | None:
    """The host and port a network database's URI names (the scheme's default port when it
    names none); ``None`` when it names no host or the port is not known."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if not host:
        return None
    scheme = parts.scheme.split("+", 1)[0].lower()
    port = port or DEFAULT_PORTS.get(scheme)
    return (host, port) if port else None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def relayed_uri(uri: str, *, host: str, port: int) -> str:
    """``uri`` with its port replaced by ``port`` (and an IP-literal host by ``host``)."""
    parts = urlsplit(uri)
    name = parts.hostname or host
    shown = host if is_ip_literal(name) else name
    if ":" in shown:
        shown = f"[{shown}]"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{shown}:{port}" if userinfo else f"{shown}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


#: Default ports of the URI schemes network databases use (SQLAlchemy's dialect names
#: and plain HTTP for SPARQL endpoints).
DEFAULT_PORTS = {
    "postgresql": 5432,
    "postgres": 5432,
    "mysql": 3306,
    "mariadb": 3306,
    "mssql": 1433,
    "oracle": 1521,
    "http": 80,
    "https": 443,
}


class Resources(BaseModel):
    """What one run may use; executors turn these into limits (and GPU requests)."""

    model_config = ConfigDict(frozen=True)

    cpu: Annotated[float, Field(gt=0)] = 1.0
    memory_mb: Annotated[int, Field(gt=0)] = 1024
    gpus: Annotated[int, Field(ge=0)] = 0
    gpu_type: str | None = None
    pids: Annotated[int, Field(gt=0)] = 512


class ProxyEndpoint(BaseModel):
    """How a run reaches the node's proxy; ``None`` on a spec means no network at all."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    #: The node's peer forwarders on the same host (docs/networking.md), if peering is on.
    peer_ports: tuple[int, ...] = ()


class RunSpec(BaseModel):
    """Everything needed to start one run, whatever the runtime."""

    model_config = ConfigDict(frozen=True)

    run_id: int
    task_id: int
    organization_id: int
    collaboration_id: int
    parent_task_id: int | None = None
    image: str
    action: str = "compute"
    input: bytes = b""
    token: SecretStr | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    databases: tuple[DatabaseMount, ...] = ()
    #: The labels of the databases the task asked for: only these network databases are
    #: reachable from the run (the executor opens its egress to them, and to no other).
    requested_databases: tuple[str, ...] = ()
    resources: Resources = Field(default_factory=Resources)
    deadline_seconds: Annotated[int, Field(gt=0)] = 24 * 3600
    labels: dict[str, str] = Field(default_factory=dict)
    #: Extra annotations on the run's runtime object where the runtime has them (Kubernetes:
    #: the pod); for operators' tooling and the test peers (kwok pod behaviour), else unused.
    annotations: dict[str, str] = Field(default_factory=dict)
    proxy: ProxyEndpoint | None = None
    trace_context: dict[str, str] = Field(default_factory=dict)
    #: The run's token as the node sealed it: opaque to executors. An executor whose runtime
    #: keeps the token where the node cannot read it back (Kubernetes: a Secret) stores this
    #: with the run (a Job annotation) and hands it back in :class:`RunState`, so a restarted
    #: node can re-admit the run to the proxy; where the node can read the run's token file
    #: back (podman, apptainer) the executor may ignore it.
    sealed_token: str | None = None


class RunEvent(NamedTuple):
    """One observed change of a run's phase."""

    run_id: int
    phase: Phase
    reason: Reason | None = None
    exit_code: int | None = None
    at: datetime = datetime.min.replace(tzinfo=UTC)
    message: str = ""

    @classmethod
    def now(
        cls,
        run_id: int,
        phase: Phase,
        reason: Reason | None = None,
        *,
        exit_code: int | None = None,
        message: str = "",
    ) -> RunEvent:
        return cls(run_id, phase, reason, exit_code, datetime.now(UTC), message)


class RunState(NamedTuple):
    """A run as the runtime knows it, rebuilt from labels/annotations (for reconciliation)."""

    run_id: int
    task_id: int
    phase: Phase
    reason: Reason | None = None
    exit_code: int | None = None
    trace_context: dict[str, str] = {}  # noqa: RUF012 - NamedTuple default, never mutated
    sealed_token: str | None = None  # as the spec had it (see RunSpec.sealed_token)


class RunOutput(NamedTuple):
    """What a finished run produced: the output file's bytes and the container log.

    ``refused`` says why the node would not take the output (a link, not a plain file,
    over the size limit: :mod:`executors.outputs`); ``output`` is then empty and the run
    fails with :attr:`Reason.OUTPUT_REFUSED`.
    """

    output: bytes
    log: str
    refused: str = ""
