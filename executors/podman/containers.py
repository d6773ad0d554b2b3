"""What a run's container is, and what its state means: pure functions, no I/O.

:func:`create_body` turns a :class:`RunSpec` into libpod's container-create body (the
``SpecGenerator`` of podman 4.x): labels that let a restarted node find the run, the run's
files and databases as bind mounts, and the isolation every run gets whatever its spec
says. :func:`phase_of` reads a container's state back into a phase and a reason, from an
inspect document or a list entry, the same way before and after a restart.

Isolation, all of it on by default and none of it configurable per run:

* ``user`` uid:gid from the settings (never root), ``cap_drop: ALL``,
  ``no_new_privileges``, podman's default seccomp profile;
* read-only root file system, a size-limited tmpfs at ``/tmp``;
* ``netns: none`` (only ``lo``) unless the spec names a proxy, else the internal network
  (no route out; the node's proxy listens on its gateway address, and the relays of the
  network databases: a database's host *name* is mapped to the gateway in the run's hosts
  file, for the databases the run asked for);
* memory (swap included, so no swap), CPU quota and pids limits from ``spec.resources``;
* GPUs: the CDI devices the executor chose for the run (``devices``, distinct from other
  runs': :mod:`executors.devices`), also named in a label so a restart knows them;
* the deadline as podman's ``timeout``: conmon kills the container with SIGKILL when it
  passes, even while the node is down, and records exit code -1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from executors.base import ANNOTATION_TRACEPARENT, LABEL_RUN, LABEL_TASK, run_labels
from executors.devices import devices_label
from executors.podman.config import PodmanSettings
from executors.runfiles import RunFiles
from executors.spec import (
    CONTAINER_SCRATCH_DIR,
    CONTAINER_TASK_DIR,
    INPUT_FILE_NAME,
    OUTPUT_FILE_NAME,
    TOKEN_FILE_NAME,
    Phase,
    Reason,
    RunSpec,
    is_ip_literal,
    network_address,
)
from executors.verdict import Verdict

#: The run's deadline in seconds, kept on the container to classify its end after a restart.
LABEL_DEADLINE = "fednode.io/deadline-seconds"
#: conmon's exit code for a container it killed because podman's ``timeout`` passed.
TIMEOUT_EXIT_CODE = -1
#: 128 + SIGKILL: what the kernel's OOM killer (or any SIGKILL) leaves.
SIGKILL_EXIT_CODE = 137
CPU_PERIOD_US = 100_000

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")
#: libpod container states (``define.ContainerStatus``), grouped by what they mean for a run.
_NOT_STARTED = frozenset({"configured", "created", "initialized"})
_RUNNING = frozenset({"running", "paused", "stopping"})
_ENDED = frozenset({"exited", "stopped"})


def container_name(node_name: str, run_id: int) -> str:
    """The run's container name: unique per node and run, valid for podman."""
    node = _NAME_UNSAFE.sub("-", node_name).strip("-.") or "node"
    return f"fednode-{node}-run-{run_id}"


def create_body(
    spec: RunSpec,
    *,
    settings: PodmanSettings,
    node_name: str,
    files: RunFiles,
    devices: Sequence[str] = (),
) -> dict[str, Any]:
    """The libpod container-create body for one run; ``devices``: its CDI device names."""
    labels = run_labels(spec, node_name=node_name) | devices_label(devices)
    labels[LABEL_DEADLINE] = str(spec.deadline_seconds)
    annotations = dict(spec.annotations)
    traceparent = spec.trace_context.get("traceparent")
    if traceparent:
        # Labels are what the list endpoint returns; the annotation is the OCI-level record.
        labels[ANNOTATION_TRACEPARENT] = traceparent
        annotations[ANNOTATION_TRACEPARENT] = traceparent
    resources = spec.resources
    memory = resources.memory_mb * 1024 * 1024
    body: dict[str, Any] = {
        "name": container_name(node_name, spec.run_id),
        "image": spec.image,
        "labels": labels,
        "annotations": annotations,
        "env": dict(spec.environment),
        "user": f"{settings.run_uid}:{settings.run_gid}",
        "read_only_filesystem": True,
        "cap_drop": ["ALL"],
        "no_new_privileges": True,
        "seccomp_policy": "default",
        "mounts": _mounts(spec, settings=settings, files=files),
        "resource_limits": {
            "memory": {"limit": memory, "swap": memory},
            "cpu": {"quota": int(resources.cpu * CPU_PERIOD_US), "period": CPU_PERIOD_US},
            "pids": {"limit": resources.pids},
        },
        "timeout": spec.deadline_seconds,
        "hostname": f"run-{spec.run_id}",
    }
    if spec.proxy is None:
        body["netns"] = {"nsmode": "none"}
    else:
        body["netns"] = {"nsmode": "bridge"}
        body["Networks"] = {settings.network: {}}
        hosts = _relayed_hosts(spec)
        if hosts:
            body["hostadd"] = hosts
    if devices:
        body["devices"] = [{"path": name} for name in devices]
    return body


def _relayed_hosts(spec: RunSpec) -> list[str]:
    """``name:address`` hosts-file entries for the relayed databases the run asked for whose
    URI names its host by name: the name then leads to the relay (and TLS still sees it)."""
    wanted = set(spec.requested_databases)
    entries = []
    for database in spec.databases:
        if database.run_host is None or database.label not in wanted:
            continue
        address = network_address(database.uri)
        if address is not None and not is_ip_literal(address[0]):
            entries.append(f"{address[0]}:{database.run_host}")
    return sorted(set(entries))


def _mounts(spec: RunSpec, *, settings: PodmanSettings, files: RunFiles) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {
            "destination": CONTAINER_SCRATCH_DIR,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["rw", "nosuid", "nodev", f"size={settings.scratch_size_mb}m"],
        },
        _bind(files.input, f"{CONTAINER_TASK_DIR}/{INPUT_FILE_NAME}", read_only=True),
        _bind(files.token, f"{CONTAINER_TASK_DIR}/{TOKEN_FILE_NAME}", read_only=True),
        _bind(files.output, f"{CONTAINER_TASK_DIR}/{OUTPUT_FILE_NAME}", read_only=False),
    ]
    for database in spec.databases:
        if database.is_local_path:
            # A file is bound by itself (not its host folder, which may hold other files).
            mounts.append(_bind(Path(database.uri), database.container_uri, read_only=True))
    return mounts


def _bind(source: Path, destination: str, *, read_only: bool) -> dict[str, Any]:
    return {
        "destination": destination,
        "type": "bind",
        "source": str(source),
        "options": ["rbind", "ro" if read_only else "rw"],
    }


class ContainerState(NamedTuple):
    """A run's container as read back from podman: what ``phase_of`` needs, nothing more."""

    container_id: str
    run_id: int
    task_id: int
    status: str
    exit_code: int | None
    oom_killed: bool
    labels: Mapping[str, str]

    @classmethod
    def from_inspect(cls, document: Mapping[str, Any]) -> ContainerState | None:
        """From ``GET /containers/{name}/json``; ``None`` if it is not a fednode run."""
        config = document.get("Config") or {}
        state = document.get("State") or {}
        return cls._build(
            container_id=str(document.get("Id", "")),
            labels=config.get("Labels") or {},
            status=str(state.get("Status", "")),
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
        )

    @classmethod
    def from_list_entry(cls, entry: Mapping[str, Any]) -> ContainerState | None:
        """From one item of ``GET /containers/json`` (no OOM flag there)."""
        return cls._build(
            container_id=str(entry.get("Id", "")),
            labels=entry.get("Labels") or {},
            status=str(entry.get("State", "")),
            exit_code=entry.get("ExitCode"),
            oom_killed=False,
        )

    @classmethod
    def _build(
        cls,
        *,
        container_id: str,
        labels: Mapping[str, str],
        status: str,
        exit_code: Any,
        oom_killed: bool,
    ) -> ContainerState | None:
        run_id = run_id_of(labels)
        if run_id is None:
            return None
        return cls(
            container_id=container_id,
            run_id=run_id,
            task_id=_int_label(labels, LABEL_TASK) or 0,
            status=status.lower(),
            exit_code=int(exit_code) if isinstance(exit_code, int) else None,
            oom_killed=oom_killed,
            labels=dict(labels),
        )

    @property
    def trace_context(self) -> dict[str, str]:
        traceparent = self.labels.get(ANNOTATION_TRACEPARENT)
        return {"traceparent": traceparent} if traceparent else {}


def phase_of(state: ContainerState, *, kill_requested: bool) -> Verdict | None:
    """What the container's state means for its run; ``None`` for states in transition.

    ``kill_requested`` is the node's own record that it asked for this run to be killed
    (podman keeps no such record that survives a restart). An end is classified in this
    order: killed on request; conmon's timeout (exit code -1, the deadline); OOM (podman's
    flag, or exit 137 without a kill request — on cgroup v1 conmon often misses the OOM
    notification, and nothing else sends SIGKILL to a run); a non-zero exit; success.
    """
    status = state.status
    if status in _NOT_STARTED:
        if kill_requested:
            return Verdict(Phase.KILLED, Reason.KILLED, message="killed before it started")
        return Verdict(Phase.STARTING)
    if status in _RUNNING:
        return Verdict(Phase.RUNNING)
    if status not in _ENDED:
        return None  # "removing", or a state this podman version added
    code = state.exit_code
    if kill_requested:
        return Verdict(Phase.KILLED, Reason.KILLED, code)
    if code == TIMEOUT_EXIT_CODE:
        deadline = state.labels.get(LABEL_DEADLINE, "?")
        return Verdict(
            Phase.FAILED,
            Reason.DEADLINE_EXCEEDED,
            code,
            f"the run passed its deadline of {deadline} s and was killed",
        )
    if state.oom_killed or code == SIGKILL_EXIT_CODE:
        return Verdict(
            Phase.FAILED,
            Reason.OOM_KILLED,
            code,
            "the run was killed for using more memory than its limit",
        )
    if code == 0:
        return Verdict(Phase.SUCCEEDED, Reason.COMPLETED, 0)
    return Verdict(Phase.FAILED, Reason.CRASHED, code, f"the algorithm exited with code {code}")


def started_at(document: Mapping[str, Any]) -> datetime | None:
    """When the container started, from an inspect document (``None`` if it never did)."""
    text = str((document.get("State") or {}).get("StartedAt", ""))
    return _timestamp(text)


def finished_at(document: Mapping[str, Any]) -> datetime | None:
    """When the container's process ended, from an inspect document."""
    text = str((document.get("State") or {}).get("FinishedAt", ""))
    return _timestamp(text)


def _timestamp(text: str) -> datetime | None:
    """RFC 3339 with nanoseconds (Go's format) to an aware datetime; zero time is ``None``."""
    if not text or text.startswith("0001-01-01"):
        return None
    match = re.match(r"^(.*?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    if match is None:
        return None
    base, fraction, zone = match.groups()
    micro = (fraction or "0")[:6].ljust(6, "0")
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{base}.{micro}{zone}").astimezone(UTC)


def run_id_of(labels: Mapping[str, str]) -> int | None:
    """The run id a container (or a podman event about it) is labelled with."""
    return _int_label(labels, LABEL_RUN)


def _int_label(labels: Mapping[str, str], key: str) -> int | None:
    try:
        return int(labels[key])
    except (KeyError, ValueError):
        return None
