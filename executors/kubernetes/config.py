"""Settings of the Kubernetes executor (``executor: {kind: kubernetes, ...}``).

Grouped as the executor uses them: how to reach the API server; what each run's Job and
pod look like (retries, deadline safety nets, the uid runs use, resources, GPUs, Kueue); where the
run's files and databases come from; which isolation objects are checked and applied at
start-up. Every key has a default that works with the Helm chart; docs/executors.md
(``## Kubernetes``) describes each one.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Toleration = dict[str, str | int]
#: A Kubernetes object name that is also a label value (LocalQueue, priority class).
_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class DatabaseVolume(BaseModel):
    """Where the files of one database label come from; mounted read-only at
    ``/mnt/data/<label>``, so the database's file must be at the top of the source (or of
    ``sub_path`` in a claim), under its own file name (ConfigMap: the key is the file name).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    claim: str | None = None  # an existing PersistentVolumeClaim in the runs namespace
    sub_path: str | None = None  # a folder inside ``claim``
    config_map: str | None = None  # a ConfigMap in the runs namespace
    host_path: str | None = None  # a directory on the Kubernetes node (not under restricted)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DatabaseVolume:
        sources = [s for s in (self.claim, self.config_map, self.host_path) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one of claim, config_map, host_path")
        if self.sub_path and not self.claim:
            raise ValueError("sub_path only applies to a claim")
        return self


class DatabaseEgressSettings(BaseModel):
    """Where a network database is, as a NetworkPolicy names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: An address block (``10.0.4.7/32``; a bare address is read as a /32 or /128).
    cidr: str
    port: Annotated[int, Field(ge=1, le=65535)]

    @field_validator("cidr")
    @classmethod
    def _network(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an address block: give the database's IP address (runs "
                "have no DNS), e.g. 10.0.4.7/32"
            ) from None


class KueueSettings(BaseModel):
    """Opt-in: every run's Job goes through the cluster's Kueue, which admits it when its
    LocalQueue's ClusterQueue has quota (GPUs, CPU, memory; borrowing within a cohort).

    The Job is created suspended and labelled with the queue; Kueue unsuspends it on
    admission. Until then the run is ``pending`` with Kueue's reason (the Workload's
    ``QuotaReserved`` message) in ``fednode status`` and the run's trace.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The LocalQueue in the runs namespace (label ``kueue.x-k8s.io/queue-name``).
    queue_name: Annotated[str, Field(max_length=63, pattern=_NAME)]
    #: A Kueue WorkloadPriorityClass (label ``kueue.x-k8s.io/priority-class``); ``None``:
    #: the ClusterQueue's default.
    priority_class: Annotated[str | None, Field(max_length=63, pattern=_NAME)] = None


class KubernetesSettings(BaseModel):
    """Runs algorithms as Kubernetes Jobs in one namespace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["kubernetes"] = "kubernetes"

    # -- the API server -------------------------------------------------------------------
    #: A kubeconfig (and optionally its context); ``None``: the pod's service account when
    #: running in a cluster, else the default kubeconfig ($KUBECONFIG or ~/.kube/config).
    kubeconfig: Path | None = None
    context: str | None = None
    #: The namespace runs live in; the chart creates it, labelled Pod Security restricted.
    namespace: str = "fednode-runs"
    #: Connections to the API server at most (starts, deletes, logs; the two watches hold one
    #: each).
    max_connections: Annotated[int, Field(ge=4)] = 64
    request_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    #: Server-side timeout of one watch request; it is then resumed from its last version.
    watch_timeout_seconds: Annotated[int, Field(ge=10)] = 300
    #: How long the first list of Jobs and Pods may take at start-up.
    sync_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0

    # -- each run's Job and pod -----------------------------------------------------------
    #: Retries of a failed pod; 0 because a rerun of a central task duplicates subtasks.
    backoff_limit: Annotated[int, Field(ge=0)] = 0
    #: The Job (with its pod and token Secret) is deleted this long after it finished, if
    #: the node has not cleaned it up by then (a safety net, not the normal path).
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] = 3600
    #: The uid/gid the algorithm runs as (Pod Security restricted forbids root). Run the node
    #: with the same uid so both can use the run's files (the chart does), or as root (the
    #: node then hands the files to this uid).
    run_as_user: Annotated[int, Field(ge=1)] = 10001
    run_as_group: Annotated[int, Field(ge=0)] = 10001
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    #: Size limit of the writable scratch directory ``/tmp`` (an emptyDir).
    scratch_size_limit: str = "1Gi"
    #: Seconds a killed or timed-out run gets between SIGTERM and SIGKILL.
    termination_grace_seconds: Annotated[int, Field(ge=0)] = 5
    priority_class_name: str | None = None
    #: Scheduling constraints of every run pod.
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    #: Extended resource a GPU run asks for (its limit is the run's GPU count).
    gpu_resource_name: str = "nvidia.com/gpu"
    #: Added to GPU runs only: where GPU nodes are and the taints they carry.
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[Toleration] = Field(default_factory=list)
    #: A node label naming the GPU model (e.g. ``nvidia.com/gpu.product``); a run that asks
    #: for a GPU type is placed on nodes whose label has that value.
    gpu_type_label: str | None = None
    #: Queue runs through Kueue (GPU quotas, fair sharing); ``None``: runs start at once.
    kueue: KueueSettings | None = None
    #: Bytes of a run's log that ``collect`` reads at most (from the start of the log).
    log_limit_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024

    # -- storage --------------------------------------------------------------------------
    #: The claim holding the node's task directory; each run mounts its ``run-<id>`` folder.
    task_volume_claim: str = "fednode-tasks"
    #: ReadWriteMany: runs go anywhere. ReadWriteOnce: runs are pinned to the Kubernetes node
    #: the node pod runs on (``kubernetes_node``).
    task_volume_access: Literal["ReadWriteMany", "ReadWriteOnce"] = "ReadWriteMany"
    #: The Kubernetes node of the node pod (the chart sets it from the downward API through
    #: ``FEDNODE_EXECUTOR__KUBERNETES_NODE``); required with ReadWriteOnce.
    kubernetes_node: str | None = None
    #: Volumes of file databases, by database label.
    databases: dict[str, DatabaseVolume] = Field(default_factory=dict)

    # -- isolation ------------------------------------------------------------------------
    #: Refuse to start when the runs namespace does not enforce Pod Security restricted
    #: (``false``: log an error and go on).
    require_restricted_namespace: bool = True
    #: The runs' NetworkPolicies (default deny; egress to the proxy only).
    #: ``verify``: the chart renders them; the node only reads them at start-up and refuses
    #: to start when one is missing or differs (its Role can ``get`` them, nothing more).
    #: ``apply``: out of a cluster (development), the node applies them itself — its Role
    #: then needs ``rbac.APPLY_NETWORK_POLICIES_RULE`` (create, patch). ``off``: no isolation
    #: objects are checked. ``true``/``false`` read as ``verify``/``off``.
    network_policies: Literal["verify", "apply", "off"] = "verify"
    #: Labels the node pod (which serves the proxy) really carries.
    proxy_pod_selector: dict[str, str] = Field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "fednode",
            "app.kubernetes.io/component": "node",
        }
    )
    #: The node pod's namespace (``None``: the service account's namespace in a cluster,
    #: else ``namespace``).
    proxy_namespace: str | None = None
    #: The port the proxy container listens on (the node's ``proxy.port``).
    proxy_port: Annotated[int, Field(ge=1, le=65535)] = 7654
    #: The proxy's Service in ``proxy_namespace``. At ``open()`` the executor reads it (by
    #: name: the Role's only Service right) and runs are given its ClusterIP and port — an
    #: address, because runs may not query the cluster DNS. ``None``: runs are given the
    #: node's ``proxy.advertise_host`` (out of a cluster).
    proxy_service: str | None = None

    #: Network databases runs may reach when their task asks for them, by database label:
    #: the address block and TCP port of each (NetworkPolicy egress by address: runs have
    #: no DNS). The chart sets these from ``databases[].egress``.
    database_egress: dict[str, DatabaseEgressSettings] = Field(default_factory=dict)

    @field_validator("network_policies", mode="before")
    @classmethod
    def _from_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            return "verify" if value else "off"
        return value
