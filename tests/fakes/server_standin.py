"""An in-process STAND-IN for the vantage6 server, as :class:`ServerClient` presents it.

Not the server: the real vantage6 4.15.2 server (``tests/peers/v6server.py``) proves the
protocol. This stand-in answers the few calls the run lifecycle makes (``request`` and
``list_pages`` over runs, tasks, organizations and container tokens) from a dictionary, so
lifecycle unit tests run in milliseconds. It keeps the server's rules that the lifecycle
depends on: a finished run refuses another PATCH (400 "... finished ..."), an unknown run
is a 404. ``unreachable`` makes the next N calls fail as an unreachable server does after
the client's own retries (:class:`ServerUnavailable`). Every PATCH is recorded.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from node.server.models import RunStatus
from node.server.rest import ServerError, ServerUnavailable


@dataclass
class Emitted:
    event: str
    data: dict[str, Any]


@dataclass
class NotifierStandIn:
    """The socket link's ``emit``, recorded."""

    emitted: list[Emitted] = field(default_factory=list)

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        self.emitted.append(Emitted(event, data))

    def statuses(self, run_id: int) -> list[str]:
        return [
            e.data["status"]
            for e in self.emitted
            if e.event == "algorithm_status_change" and e.data["run_id"] == run_id
        ]


class ServerStandIn:
    """The server's runs of one node, in a dictionary; see the module docstring."""

    def __init__(self, *, node_id: int = 1) -> None:
        self.node_id = node_id
        self.runs: dict[int, dict[str, Any]] = {}
        self.public_keys: dict[int, str | None] = {}
        self.patches: list[tuple[int, dict[str, Any]]] = []
        self.calls: list[tuple[str, str]] = []
        self.unreachable = 0
        #: How many container-token requests fail as if the server were away.
        self.token_unreachable = 0
        #: How many PATCHes setting status ``active`` fail as if the server were away.
        self.active_unreachable = 0
        self._tokens = itertools.count(1)

    def add_run(
        self,
        run_id: int,
        *,
        task_id: int | None = None,
        image: str = "localhost/fednode/behaviour:in-memory",
        input_: str = "",
        init_org_id: int = 1,
        started: bool = False,
    ) -> dict[str, Any]:
        run = {
            "id": run_id,
            "status": RunStatus.ACTIVE.value if started else RunStatus.PENDING.value,
            "input": input_,
            "started_at": "2026-01-01T00:00:00+00:00" if started else None,
            "finished_at": None,
            "task": {
                "id": task_id or 1000 + run_id,
                "image": image,
                "init_org": {"id": init_org_id},
                "databases": [],
            },
        }
        self.runs[run_id] = run
        return run

    def status(self, run_id: int) -> str:
        return str(self.runs[run_id]["status"])

    def finished(self, run_id: int) -> bool:
        return RunStatus(self.status(run_id)).is_finished

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> Any:
        self.calls.append((method, path))
        if self.unreachable > 0:
            self.unreachable -= 1
            raise ServerUnavailable("cannot reach the server: stand-in", method=method, path=path)
        parts = path.strip("/").split("/")
        if method == "GET" and parts[0] == "run" and len(parts) == 2:
            return dict(self._run(int(parts[1]), method, path))
        if method == "PATCH" and parts[0] == "run":
            return self._patch(int(parts[1]), dict(json_body or {}), path)
        if method == "POST" and path == "token/container":
            if self.token_unreachable > 0:
                self.token_unreachable -= 1
                raise ServerUnavailable(
                    "cannot reach the server: stand-in", method=method, path=path
                )
            return {"container_token": f"container-token-{next(self._tokens)}"}
        if method == "GET" and parts[0] == "organization":
            return {"id": int(parts[1]), "public_key": self.public_keys.get(int(parts[1]))}
        raise ServerError(404, f"the stand-in does not serve {method} {path}")

    async def list_pages(
        self, path: str, *, params: Mapping[str, str | int] | None = None
    ) -> list[Any]:
        if self.unreachable > 0:
            self.unreachable -= 1
            raise ServerUnavailable("cannot reach the server: stand-in", method="GET", path=path)
        task_id = (params or {}).get("task_id")
        return [
            dict(run)
            for run in self.runs.values()
            if not RunStatus(run["status"]).is_finished
            and (task_id is None or run["task"]["id"] == task_id)
        ]

    def _run(self, run_id: int, method: str, path: str) -> dict[str, Any]:
        run = self.runs.get(run_id)
        if run is None:
            raise ServerError(404, f"run {run_id} not found", method=method, path=path)
        return run

    def _patch(self, run_id: int, body: dict[str, Any], path: str) -> None:
        if body.get("status") == RunStatus.ACTIVE.value and self.active_unreachable > 0:
            self.active_unreachable -= 1
            raise ServerUnavailable("cannot reach the server: stand-in", method="PATCH", path=path)
        run = self._run(run_id, "PATCH", path)
        if RunStatus(run["status"]).is_finished and "status" in body:
            raise ServerError(400, "run is already finished", method="PATCH", path=path)
        self.patches.append((run_id, body))
        run.update(body)
