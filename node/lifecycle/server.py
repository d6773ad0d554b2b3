"""The lifecycle's conversation with the server about runs, in the server's own terms.

Every REST call and socket event the lifecycle makes goes through :class:`RunServer`:
listing this node's open runs, looking one run up, asking for a container token, PATCHing
a run's status and result, and telling the collaboration (``algorithm_status_change``)
that a run's status changed. :meth:`RunServer.upload` is the finishing PATCH: it retries
with backoff while the server cannot be reached or answers 5xx (the server client already
retried each request a few times), so a result waits for the server rather than for the
next ``sync``; it returns only when the server has the result, or raises on an answer that
repeating cannot change (4xx). A PATCH the server refuses for a run whose status it already
holds as final — a repeated upload after a restart, or a run its user killed — counts as
done: the run's status says so (:meth:`RunServer.ended`), not the words of the refusal.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from common.backoff import Backoff
from node.lifecycle.inflight import RunInFlight
from node.logging import get_logger
from node.server.models import NodeIdentity, Run, RunStatus
from node.server.rest import ServerClient, ServerError, ServerUnavailable

log = get_logger(__name__)

#: Open runs asked for per page when the node catches up with the server.
OPEN_RUNS_PAGE_SIZE = 200

#: How long a start or an output collection waits, in all, for a runtime that cannot be
#: reached (its service restarting) before the run ends ``start failed`` / without output.
RUNTIME_PATIENCE_SECONDS = 90.0

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
            # The server's default page is 10 runs: a node with hundreds open (after an
            # outage) would spend a request per ten of them before taking the first one.
            "per_page": OPEN_RUNS_PAGE_SIZE,
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
        """A new container token for the run's task and image; ``None`` if refused.

        A server that cannot be reached refuses nothing: :class:`ServerUnavailable` is
        raised, and the run is taken again at the next sync instead of failing.
        """
        try:
            body = await self._server.request(
                "POST",
                "token/container",
                json_body={"task_id": run.task.id, "image": run.task.image},
            )
        except ServerUnavailable:
            raise
        except ServerError as exc:
            log.warning("run.no_container_token", error=str(exc))
            return None
        token = body.get("container_token") if isinstance(body, dict) else None
        return str(token) if token else None

    async def mark_started(self, run_id: int) -> None:
        await self._patch(run_id, {"started_at": now()})

    async def mark_active(self, run_id: int) -> bool:
        """Status ``active``; ``False`` (nothing told) if the server had already ended the
        run — its end uploaded first (a fast run), or its user killed it meanwhile."""
        try:
            await self._patch(run_id, {"status": RunStatus.ACTIVE.value})
        except ServerError as exc:
            if not await self.refused_as_ended(run_id, exc):
                raise
            log.info("run.ended_before_active", run_id=run_id)
            return False
        return True

    async def ended(self, run_id: int) -> bool:
        """Whether the server holds a final status for the run (``finished_at`` set)."""
        run = await self.run(run_id)
        return run.finished_at is not None or finished_status(run.status)

    async def refused_as_ended(self, run_id: int, error: ServerError) -> bool:
        """Whether ``error`` refused a PATCH because the run had already ended at the server.

        Decided from the run's status, looked up again, never from the refusal's words.
        """
        if error.status != 400:
            return False
        try:
            return await self.ended(run_id)
        except ServerError:
            return False

    async def upload(self, run_id: int, body: dict[str, Any]) -> bool:
        """The run's final PATCH, retried with backoff while the server is unreachable.

        ``False`` when the server already held the run's end (another upload of it came
        first, e.g. by the node's next life): nothing of this one was stored.
        """
        backoff = Backoff(first=self._upload_backoff, cap=UPLOAD_BACKOFF_CAP_SECONDS)
        while True:
            try:
                await self._patch(run_id, body)
                return True
            except ServerError as exc:
                if await self.refused_as_ended(run_id, exc):
                    log.info("run.already_finished_on_server", run_id=run_id)
                    return False
                if not _worth_repeating(exc):
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "run.upload_retrying",
                    error=str(exc),
                    attempt=backoff.failures,
                    delay=round(delay, 2),
                )
                await asyncio.sleep(delay)

    async def end(self, run_id: int, status: RunStatus, message: str) -> bool:
        """End a run with ``status`` and a log line saying why (no result); ``False`` if the
        server already held its end."""
        return await self.upload(
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


def finished_status(status: str) -> bool:
    """Whether ``status`` is one of the final vantage6 run statuses."""
    try:
        return RunStatus(status).is_finished
    except ValueError:
        return False


def _worth_repeating(error: ServerError) -> bool:
    """Unreachable (status 0) or a server error (5xx): the same request may succeed later."""
    return error.status == 0 or error.status >= 500


def now() -> str:
    return datetime.now(UTC).isoformat()
