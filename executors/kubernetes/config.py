"""Settings of the Kubernetes executor (``executor: {kind: kubernetes, ...}``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class KubernetesSettings(BaseModel):
    """Runs algorithms as Kubernetes Jobs in one namespace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["kubernetes"] = "kubernetes"
    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str = "fednode-runs"
    gpu_resource_name: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    backoff_limit: Annotated[int, Field(ge=0)] = 0
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] = 3600
    task_volume_claim: str = "fednode-tasks"
    task_volume_access: Literal["ReadWriteMany", "ReadWriteOnce"] = "ReadWriteMany"
