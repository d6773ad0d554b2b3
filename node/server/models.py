"""The server's payloads as fednode reads them (vantage6 4.x REST and socket.io).

Only the fields fednode uses are declared; everything else the server sends is ignored, so
a newer server that adds fields does not break the node. Field names are the server's.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RunStatus(enum.StrEnum):
    """vantage6 4.x run statuses (``vantage6.common.task_status.TaskStatus``)."""

    PENDING = "pending"
    INITIALIZING = "initializing"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    START_FAILED = "start failed"
    NO_DOCKER_IMAGE = "non-existing Docker image"
    CRASHED = "crashed"
    KILLED = "killed by user"
    NOT_ALLOWED = "not allowed"
    UNKNOWN_ERROR = "unknown error"

    @property
    def is_finished(self) -> bool:
        return self not in {RunStatus.PENDING, RunStatus.INITIALIZING, RunStatus.ACTIVE}


class Ref(_Payload):
    """A ``{"id": N, "link": ...}`` reference to another resource."""

    id: int


class TaskDatabase(_Payload):
    label: str
    parameters: str | dict[str, Any] | None = None


class Task(_Payload):
    id: int
    name: str = ""
    image: str
    job_id: int | None = None
    parent: Ref | None = None
    init_org: Ref | None = None
    init_user: Ref | None = None
    collaboration: Ref | None = None
    databases: list[TaskDatabase] = Field(default_factory=list)


class Run(_Payload):
    """An algorithm run assigned to this node (``GET run?include=task``)."""

    id: int
    status: str = RunStatus.PENDING.value
    input: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    organization: Ref | None = None
    task: Task


class TokenPair(_Payload):
    access_token: str
    refresh_token: str | None = None


class NodeIdentity(_Payload):
    """Who this node is on the server, learned once after authentication."""

    id: int
    name: str = ""
    organization_id: int
    collaboration_id: int
    encrypted: bool


class KillTarget(_Payload):
    task_id: int
    run_id: int
    organization_id: int


class KillContainers(_Payload):
    """The ``kill_containers`` socket event."""

    collaboration_id: int
    kill_list: list[KillTarget] | None = None
    node_id: int | None = None


class NewTask(_Payload):
    """The ``new_task`` socket event."""

    id: int
    parent_id: int | None = None
