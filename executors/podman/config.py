"""Settings of the podman executor (``executor: {kind: podman, ...}`` in node.yaml).

Defaults fit rootful podman 4.x on the node's own host: the API socket podman's system
service listens on, conmon's exit directory under podman's ``tmp_dir``, and an internal
network with a fixed subnet for runs that may reach the node's proxy, fenced in by an
nftables ruleset (see ``docs/executors.md``, podman section).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)

from executors.credentials import unscoped_credential
from executors.devices import DeviceEntry, GpuDevice

PullPolicy = Literal["always", "if-not-present", "never"]
Firewall = Literal["nftables", "off"]


class PodmanSettings(BaseModel):
    """Runs algorithms as podman containers through podman's REST API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["podman"] = "podman"
    socket: str = "unix:///run/podman/podman.sock"
    pull_policy: PullPolicy = "if-not-present"
    #: Retired (a credential for every registry); set, they are a configuration error
    #: pointing to the top-level ``docker_registries`` (one credential per registry).
    registry_username: Annotated[str | None, AfterValidator(unscoped_credential)] = None
    registry_password: Annotated[SecretStr | None, AfterValidator(unscoped_credential)] = None
    #: The internal network (no route out) runs join when their spec names a proxy.
    network: str = "fednode-runs"
    #: Its subnet; the first address is the gateway, where the node's proxy listens.
    network_subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.213.0.0/24")
    #: ``nftables``: from that network the host accepts only TCP to the proxy, and runs do
    #: not reach each other (``policies/podman_firewall.py``; needs ``nft`` and root or
    #: CAP_NET_ADMIN). ``off``: runs can reach each other and every host service that
    #: listens on all addresses, at the gateway.
    firewall: Firewall = "nftables"
    #: The gateway port of the first network database's relay (``sql``, ``sparql``,
    #: ``omop``); the next ones follow in the order of ``databases``. Keep that order: runs
    #: that outlive a node restart were told these ports. See ``executors/podman/relay.py``.
    database_relay_port: Annotated[int, Field(gt=0, lt=65536)] = 15432
    #: The user the algorithm runs as (never root); it owns the run's files. The default
    #: is an id no account on the host should have (as distroless images' ``nonroot``):
    #: not 1000, often the first person's account, whose files a run could then reach.
    run_uid: Annotated[int, Field(gt=0)] = 65532
    run_gid: Annotated[int, Field(gt=0)] = 65532
    #: Size of the container's writable ``/tmp`` (the root file system is read-only).
    scratch_size_mb: Annotated[int, Field(gt=0)] = 1024
    #: The CDI device kind a bare ``gpu_devices`` entry belongs to (``<kind>=<entry>``).
    cdi_gpu_kind: str = "nvidia.com/gpu"
    #: The GPUs runs may have, as CDI devices (``nvidia-ctk cdi list`` names them):
    #: ``nvidia.com/gpu=0``, a bare ``0`` (of ``cdi_gpu_kind``), or ``{device: ..., type:
    #: a100}`` for profiles that ask for a ``gpu_type``. Each run gets its own; a run
    #: waits (``starting``) while too few are free. Empty: GPU runs end ``not allowed``.
    gpu_devices: list[DeviceEntry] = Field(default_factory=list)
    #: conmon's exit directory (``<podman tmp_dir>/exits``), watched for prompt exits;
    #: ``None`` (or a directory this process cannot read) leaves only the event stream.
    exits_dir: Path | None = Path("/run/libpod/exits")
    #: Upper bounds for one API call and one image pull; a stuck podman never hangs a run.
    api_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    pull_timeout_seconds: Annotated[float, Field(gt=0)] = 600.0

    @field_validator("gpu_devices")
    @classmethod
    def _qualified(cls, devices: list[GpuDevice], info: ValidationInfo) -> list[GpuDevice]:
        kind = info.data.get("cdi_gpu_kind", "nvidia.com/gpu")
        qualified = [
            device
            if "=" in device.device
            else device.model_copy(update={"device": f"{kind}={device.device}"})
            for device in devices
        ]
        names = [device.device for device in qualified]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"device(s) {', '.join(twice)} listed more than once")
        return qualified

    @property
    def socket_path(self) -> str:
        """The file system path of the API socket (``unix://`` stripped)."""
        return self.socket.removeprefix("unix://")

    @property
    def network_gateway(self) -> str:
        """The run network's gateway address: where runs reach the node's proxy."""
        return str(next(self.network_subnet.hosts()))
