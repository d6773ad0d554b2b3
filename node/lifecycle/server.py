"""The lifecycle's conversation with the server about runs, in the server's own terms.

Every REST call and socket event the lifecycle makes goes through :class:`RunServer`:
listing this node's open runs, looking one run up, asking for a container token, PATCHing
a run's status and result, and telling the collaboration (``algorithm_status_change``)
that a run's status changed. :meth:`RunServer.upload` is the finishing PATCH: it retries
with backoff while the server cannot be reached or answers 5xx (the server client already
retried each request a few times), so a result waits for the server rather than for the
next ``sync``; it returns only when the server has the result, or raises on an answer that
repeating cannot change (4xx). A PATCH refused because the run is already finished — a
repeated upload after a restart — counts as done.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from node.lifecycle.inflight import RunInFlight
from node.logging import get_logger
from node.server.models import NodeIdentity, Run, RunStatus
from node.server.rest import Backoff, ServerClient, ServerError

log = get_logger(__name__)

#: Upload retries wait at most this long between two attempts.
UPLOAD_BACKOFF_CAP_SECONDS = 60.0


class StatusNotifier(Protocol):
    """Tells the collaboration about status changes (the socket link's ``emit``)."""

    async def emit(self, event: str, data: dict[str, Any]) -> None: ...


class RunServer:
    """This node's runs on the server: list, look up, token, PATCH, announce."""

    def __init__(
        self,
        *,
        server: ServerClient,
        notifier: StatusNotifier,
        identity: NodeIdentity,
        upload_backoff: float = 1.0,
    ) -> None:
        self._server = server
        self._notifier = notifier
        self._identity = identity
        self._upload_backoff = upload_backoff

    async def open_runs(self, *, task_id: int | None = None) -> list[Run]:
        """This node's open runs (of one task, if given); malformed ones are logged, skipped."""
        params: dict[str, str | int] = {
            "state": "open",
            "node_id": self._identity.id,
            "include": "task",
        }
        if task_id is not None:
            params["task_id"] = task_id
        runs = []
        for item in await self._server.list_pages("run", params=params):
            try:
                runs.append(Run.model_validate(item))
            except ValidationError as exc:
                log.error("runs.bad_run_payload", error=str(exc), run_id=item.get("id"))
        return runs

    async def run(self, run_id: int) -> Run:
        """The server's view of one run, with its task; :class:`ServerError` if it has none."""
        body = await self._server.request("GET", f"run/{run_id}")
        task = body.get("task") or {}
        if "image" not in task:
            body["task"] = await self._server.request("GET", f"task/{task.get('id')}")
        return Run.model_validate(body)

    async def container_token(self, run: Run) -> str | None:
        """A new container token for the run's task and image; ``None`` if refused."""
        try:
            body = await self._server.request(
                "POST",
                "token/container",
                json_body={"task_id": run.task.id, "image": run.task.image},
            )
        except ServerError as exc:
            log.warning("run.no_container_token", error=str(exc))
            return None
        token = body.get("container_token") if isinstance(body, dict) else None
        return str(token) if token else None

    async def mark_started(self, run_id: int) -> None:
        await self._patch(run_id, {"started_at": now()})

    async def mark_active(self, run_id: int) -> None:
        """Status ``active``; a no-op if the run's end was uploaded first (a fast run)."""
        try:
            await self._patch(run_id, {"status": RunStatus.ACTIVE.value})
        except ServerError as exc:
            if not _already_finished(exc):
                raise
            log.info("run.finished_before_active", run_id=run_id)

    async def upload(self, run_id: int, body: dict[str, Any]) -> None:
        """The run's final PATCH, retried with backoff while the server is unreachable."""
        backoff = Backoff(base=self._upload_backoff, cap=UPLOAD_BACKOFF_CAP_SECONDS)
        while True:
            try:
                await self._patch(run_id, body)
                return
            except ServerError as exc:
                if _already_finished(exc):
                    log.info("run.already_finished_on_server", run_id=run_id)
                    return
                if not _worth_repeating(exc):
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "run.upload_retrying",
                    error=str(exc),
                    attempt=backoff.attempt,
                    delay=round(delay, 2),
                )
                await asyncio.sleep(delay)

    async def end(self, run_id: int, status: RunStatus, message: str) -> None:
        """End a run with ``status`` and a log line saying why (no result)."""
        await self.upload(
            run_id, {"status": status.value, "log": f"fednode: {message}", "finished_at": now()}
        )

    async def announce(self, record: RunInFlight, status: RunStatus) -> None:
        """Tell the collaboration that the run's status changed."""
        me = self._identity
        await self._notifier.emit(
            "algorithm_status_change",
            {
                "node_id": me.id,
                "status": status.value,
                "run_id": record.run_id,
                "task_id": record.task_id,
                "collaboration_id": me.collaboration_id,
                "organization_id": me.organization_id,
                "parent_id": record.parent_id,
            },
        )

    async def emit_node_info(self, info: dict[str, Any]) -> None:
        await self._notifier.emit("node_info_update", info)

    async def _patch(self, run_id: int, body: dict[str, Any]) -> None:
        await self._server.request("PATCH", f"run/{run_id}", json_body=body)


def _already_finished(error: ServerError) -> bool:
    """The server refuses to change a finished run: a repeated upload, done before."""
    return error.status == 400 and "finished" in error.message


def _worth_repeating(error: ServerError) -> bool:
    """Unreachable (status 0) or a server error (5xx): the same request may succeed later."""
    return error.status == 0 or error.status >= 500


def now() -> str:
    return datetime.now(UTC).isoformat()
