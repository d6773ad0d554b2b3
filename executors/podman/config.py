"""Settings of the podman executor (``executor: {kind: podman, ...}`` in node.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr

PullPolicy = Literal["always", "if-not-present", "never"]


class PodmanSettings(BaseModel):
    """Runs algorithms as podman containers through podman's REST API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["podman"] = "podman"
    socket: str = "unix:///run/podman/podman.sock"
    pull_policy: PullPolicy = "if-not-present"
    registry_username: str | None = None
    registry_password: SecretStr | None = None
    network: str = "fednode-runs"
