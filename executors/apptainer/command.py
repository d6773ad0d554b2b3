"""What a run's ``apptainer run`` looks like: pure functions from a RunSpec, no I/O.

:func:`run_argv` builds the command line; :func:`env_file_text` the ``--env-file`` that
carries the vantage6 environment (a file in the run's private directory rather than
``--env`` arguments, which every local user can read in ``/proc/<pid>/cmdline``);
:func:`supervisor_plan` what the run's supervisor needs besides (network, grace).

Isolation, on for every run and not configurable per run:

* ``--containall``: private PID, IPC and mount namespaces, minimal ``/dev``, empty
  ``/tmp`` and home; ``--cleanenv``: the host's environment stays out; ``--no-home``;
  ``--no-mount bind-paths``: none of the site's ``bind path`` entries (``/scratch``,
  ``/project``…) appear; ``--no-eval``: environment values and the image's
  ENTRYPOINT/CMD are taken literally, as Docker does; ``--no-privs``: a root-run node
  still gets no capabilities in the container;
* the root file system is the read-only SIF (no ``--writable``/``--writable-tmpfs``);
  ``/tmp`` and ``/var/tmp`` live in ``--workdir``, a directory of the run's own;
* the run's files are bound one by one (input and token read-only, output read-write),
  file databases read-only at ``/mnt/data/<label>/…``, like the podman executor;
* network: none (``--net --network none``: only ``lo``) unless the spec names a proxy;
  then, per ``proxy_network``, either a private network namespace made by the supervisor
  whose only listener is a relay to the proxy (its loopback TCP port in the host's
  namespace; ``--userns``, see ``supervisor.py``), or the host's network. With peering
  (:class:`PeerPlan`) the relay namespace also carries the node's forwarder ports, and
  the run gets a loopback address of its own on the host (:func:`run_loopback_address`)
  where the node reaches its declared ports;
* ``--memory``/``--memory-swap`` (equal: no swap), ``--cpus``, ``--pids-limit`` when
  ``cgroup_limits`` is on; ``--nv``/``--rocm`` when GPUs are asked for, with the devices
  the executor chose for the run (:mod:`executors.devices`) in ``CUDA_VISIBLE_DEVICES``
  (``ROCR_VISIBLE_DEVICES`` for ``rocm``), set in the env file (:func:`gpu_environment`).

apptainer itself sets ``no_new_privs`` for every container, and an unprivileged user's
container has no capabilities; the container runs as the node's user.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import shlex
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from executors.apptainer.config import ApptainerSettings
from executors.apptainer.records import RunPaths
from executors.ports import DeclaredPort
from executors.spec import (
    CONTAINER_TASK_DIR,
    INPUT_FILE_NAME,
    OUTPUT_FILE_NAME,
    TOKEN_FILE_NAME,
    RunSpec,
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PlanError(ValueError):
    """The spec cannot be run by apptainer as asked (the run fails with ``start-failed``)."""


class NetworkMode(enum.StrEnum):
    """The network a run gets."""

    NONE = "none"  # --net --network none: loopback only
    RELAY = "relay"  # the supervisor's namespace: loopback + a relay to the proxy socket
    HOST = "host"  # the host's network namespace: no isolation


#: Where runs' host-side loopback addresses come from (peering): the node connects to a
#: run's declared ports there, and the run's connections to the forwarders come from there.
RUN_ADDRESSES = ipaddress.IPv4Network("127.64.0.0/16")


class PeerPlan(NamedTuple):
    """A run's part in peering: its host-side address, the node's forwarder ports (relayed
    from inside its namespace) and its declared ports (relayed into it)."""

    address: str
    forward_ports: tuple[int, ...]
    declared: tuple[DeclaredPort, ...]


def network_mode(spec: RunSpec, settings: ApptainerSettings) -> NetworkMode:
    if spec.proxy is None:
        return NetworkMode.NONE
    return NetworkMode.RELAY if settings.proxy_network == "relay" else NetworkMode.HOST


def run_argv(
    *,
    binary: str,
    spec: RunSpec,
    sif: Path,
    paths: RunPaths,
    settings: ApptainerSettings,
    mode: NetworkMode,
    euid: int,
) -> list[str]:
    """The full ``apptainer run`` command line of one run."""
    argv = [
        binary,
        "--quiet",
        "run",
        "--containall",
        "--cleanenv",
        "--no-home",
        "--no-eval",
        "--no-privs",
        "--no-mount",
        "bind-paths",
        "--workdir",
        str(paths.workdir),
        "--env-file",
        str(paths.env_file),
    ]
    if mode is NetworkMode.NONE:
        argv += ["--net", "--network", "none"]
    elif mode is NetworkMode.RELAY and euid != 0:
        # Inside the supervisor's user namespace a setuid starter would lose its setuid
        # bit; ask for apptainer's unprivileged user-namespace mode explicitly.
        argv.append("--userns")
    for bind in binds(spec, paths):
        argv += ["--bind", bind]
    if settings.cgroup_limits:
        resources = spec.resources
        memory = str(resources.memory_mb * 1024 * 1024)
        argv += [
            "--memory",
            memory,
            "--memory-swap",
            memory,
            "--cpus",
            f"{resources.cpu:g}",
            "--pids-limit",
            str(resources.pids),
        ]
    if spec.resources.gpus > 0:
        argv.append(f"--{settings.gpu_flag}")
    argv.append(str(sif))
    return argv


def binds(spec: RunSpec, paths: RunPaths) -> list[str]:
    """``--bind`` specifications: the run's files one by one, file databases read-only."""
    files = paths.files
    specs = [
        bind_spec(files.input, f"{CONTAINER_TASK_DIR}/{INPUT_FILE_NAME}", read_only=True),
        bind_spec(files.token, f"{CONTAINER_TASK_DIR}/{TOKEN_FILE_NAME}", read_only=True),
        bind_spec(files.output, f"{CONTAINER_TASK_DIR}/{OUTPUT_FILE_NAME}", read_only=False),
    ]
    for database in spec.databases:
        if database.is_local_path:
            specs.append(bind_spec(Path(database.uri), database.container_uri, read_only=True))
    return specs


def bind_spec(source: Path, destination: str, *, read_only: bool) -> str:
    """``src:dst:ro|rw``; apptainer splits specs on ``,`` and ``:``, so those are refused."""
    for path in (str(source), destination):
        if "," in path or ":" in path:
            raise PlanError(
                f"cannot bind {path!r}: apptainer bind paths may not contain ',' or ':'"
            )
    return f"{source}:{destination}:{'ro' if read_only else 'rw'}"


def gpu_environment(devices: Sequence[str], settings: ApptainerSettings) -> dict[str, str]:
    """The variable that limits the run to its own GPUs (empty when it has none)."""
    if not devices:
        return {}
    name = "CUDA_VISIBLE_DEVICES" if settings.gpu_flag == "nv" else "ROCR_VISIBLE_DEVICES"
    return {name: ",".join(devices)}


def env_file_text(environment: Mapping[str, str]) -> str:
    """The ``--env-file``: apptainer evaluates it with a shell, so every value is quoted."""
    lines = ["# fednode: this run's container environment (apptainer --env-file)"]
    for name, value in environment.items():
        if not _ENV_NAME.fullmatch(name):
            raise PlanError(f"environment variable name {name!r} is not valid for apptainer")
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def peering_refusal(mode: NetworkMode, proxy_host: str | None) -> str | None:
    """Why a run of this network mode cannot take part in peering (``None``: it can)."""
    if mode is NetworkMode.HOST:
        return (
            "apptainer runs with proxy_network: host share the host's network, where "
            "nothing tells one run from another or keeps other processes off its ports; "
            "peering needs proxy_network: relay"
        )
    if mode is NetworkMode.NONE or proxy_host is None:
        return "the run has no network"
    if ipaddress.ip_address(loopback_address(proxy_host)).version != 4:
        return (
            "peering on apptainer needs the proxy on an IPv4 loopback address (runs' "
            f"host-side addresses are in {RUN_ADDRESSES}), not {proxy_host}"
        )
    return None


def run_loopback_address(run_id: int, taken: Collection[str]) -> str:
    """The run's host-side loopback address: derived from its id, or the next one that no
    other run of this node holds."""
    usable = RUN_ADDRESSES.num_addresses - 2  # not .0.0 nor .255.255
    for step in range(usable):
        candidate = str(RUN_ADDRESSES.network_address + 1 + (run_id + step) % usable)
        if candidate not in taken:
            return candidate
    raise PlanError(f"every address of {RUN_ADDRESSES} is held by a run of this node")


def supervisor_plan(
    *,
    argv: list[str],
    spec: RunSpec,
    settings: ApptainerSettings,
    mode: NetworkMode,
    peer: PeerPlan | None = None,
    euid: int = 0,
) -> dict[str, Any]:
    """What the supervisor (``supervisor.py``) is told, besides the paths it derives."""
    network: dict[str, Any] | None = None
    if mode is NetworkMode.RELAY:
        assert spec.proxy is not None
        address = loopback_address(spec.proxy.host)
        # The proxy listens on the same loopback address, in the host's namespace.
        network = {
            "listen_host": address,
            "listen_port": spec.proxy.port,
            "upstream_host": address,
            "upstream_port": spec.proxy.port,
        }
        if peer is not None:
            taken = {spec.proxy.port, *peer.forward_ports}
            clash = sorted(taken & {declared.port for declared in peer.declared})
            if clash:
                raise PlanError(
                    f"the image declares port(s) {', '.join(map(str, clash))}, which the "
                    "node's proxy and forwarders take in the run's network namespace"
                )
            network |= {
                "source_host": peer.address,
                "forward_ports": list(peer.forward_ports),
                "declared_ports": [declared.port for declared in peer.declared],
                "owner_uid": euid,
            }
    return {
        "argv": argv,
        "environment": dict(settings.apptainer_environment),
        "grace_seconds": settings.kill_grace_seconds,
        "network": network,
    }


def loopback_address(host: str) -> str:
    """The loopback address the relay listens on inside the run's network namespace."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise PlanError(
            f"apptainer runs reach the proxy on loopback inside their own network namespace; "
            f"the proxy host must be a loopback address, not {host!r}"
        )
    return str(address)
