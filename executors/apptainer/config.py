"""Settings of the apptainer executor (``executor: {kind: apptainer, ...}`` in node.yaml).

Defaults fit an unprivileged node on an HPC login or service host with apptainer >= 1.1
(user-namespace mode, its default): images pulled once into a SIF cache, runs without any
network unless they need the node's proxy, in which case they get a private network
namespace whose only reachable endpoint is a relay to the proxy (see
``docs/executors.md``, apptainer section, for what each key changes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

from executors.credentials import unscoped_credential
from executors.devices import DeviceEntry, GpuDevice

PullPolicy = Literal["always", "if-not-present", "never"]
#: How a run that names a proxy reaches it: ``relay`` (its own network namespace whose
#: only listener relays to the proxy) or ``host`` (the host's network, no isolation).
ProxyNetwork = Literal["relay", "host"]
#: The variables apptainer (and singularity) read registry credentials for pulls from.
PULL_CREDENTIAL_VARIABLES = frozenset(
    f"{tool}_{name}"
    for tool in ("APPTAINER", "SINGULARITY")
    for name in ("DOCKER_USERNAME", "DOCKER_PASSWORD")
)


class ApptainerSettings(BaseModel):
    """Runs algorithms with ``apptainer run`` as detached, supervised processes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["apptainer"] = "apptainer"
    #: The apptainer (or singularity) executable: a name on ``PATH`` or a path.
    binary: str = "apptainer"
    #: Where pulled images are kept as SIF files; ``None``: ``<task_dir>/.apptainer-images``.
    #: A task may also name a ``.sif`` file in this directory directly.
    image_cache: Path | None = None
    pull_policy: PullPolicy = "if-not-present"
    #: Retired (a credential for every registry); set, they are a configuration error
    #: pointing to the top-level ``docker_registries``, whose credential of the image's
    #: registry is handed to ``apptainer pull`` in its environment (never its command line).
    registry_username: Annotated[str | None, AfterValidator(unscoped_credential)] = None
    registry_password: Annotated[SecretStr | None, AfterValidator(unscoped_credential)] = None
    pull_timeout_seconds: Annotated[float, Field(gt=0)] = 1800.0
    #: Extra environment for apptainer itself, not the container (which starts clean):
    #: e.g. ``APPTAINER_CACHEDIR``, ``APPTAINER_TMPDIR``, ``HTTPS_PROXY`` for pulls.
    #: Registry credentials are refused here: they would go to every registry.
    apptainer_environment: dict[str, str] = Field(default_factory=dict)
    proxy_network: ProxyNetwork = "relay"
    #: Pass memory/CPU/pids limits (``--memory --cpus --pids-limit``); unprivileged
    #: apptainer needs cgroups v2 with systemd for them, else it refuses to start the run.
    cgroup_limits: bool = True
    #: The GPU flag for runs that ask for GPUs: ``nv`` (NVIDIA) or ``rocm`` (AMD).
    gpu_flag: Literal["nv", "rocm"] = "nv"
    #: The GPUs runs may have: indexes or UUIDs as ``CUDA_VISIBLE_DEVICES`` (``nv``) or
    #: ``ROCR_VISIBLE_DEVICES`` (``rocm``) take them, or ``{device: ..., type: a100}``.
    #: Each run gets its own, set in that variable; a run waits (``starting``) while too
    #: few are free. Empty: GPU runs end ``not allowed``.
    gpu_devices: list[DeviceEntry] = Field(default_factory=list)
    #: Seconds between SIGTERM and SIGKILL when a run is killed or passes its deadline.
    kill_grace_seconds: Annotated[float, Field(ge=0)] = 10.0
    #: The Python that runs each run's supervisor (stdlib only); ``None``: the node's own.
    supervisor_python: str | None = None
    #: Upper bound for one short apptainer call (``version``) and for a launch.
    call_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("gpu_devices")
    @classmethod
    def _distinct(cls, devices: list[GpuDevice]) -> list[GpuDevice]:
        names = [device.device for device in devices]
        bad = sorted({name for name in names if names.count(name) > 1 or "," in name})
        if bad:
            raise ValueError(f"device(s) {', '.join(bad)} listed twice or containing ','")
        return devices

    @field_validator("apptainer_environment")
    @classmethod
    def _no_registry_credentials(cls, environment: dict[str, str]) -> dict[str, str]:
        found = sorted(name for name in environment if name.upper() in PULL_CREDENTIAL_VARIABLES)
        if found:
            raise ValueError(
                f"{', '.join(found)} would send one credential to every registry a task "
                "names; remove it and list the credential under the top-level "
                "'docker_registries' (registry, username, password)"
            )
        return environment
