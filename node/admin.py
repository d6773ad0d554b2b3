"""The node's local admin endpoint: what ``fednode runs``, ``logs`` and ``kill`` talk to.

It is HTTP on a unix socket in the node's task directory (``admin.socket``, default
``<task_dir>/admin.sock``), never on a TCP port. Why a socket and not loopback with a
token: on a TCP port every local user (and every process in the node's network namespace —
on podman the runs reach the host's addresses through the gateway) could try it, and a
token would have to be stored, handed to the CLI and rotated; a socket file is guarded by
the kernel with the file system's own rules. Three locks, each enough alone:

* the socket is created with mode 0600 (bound under a umask of 0177, so there is no moment
  at which it is more open) — only its owner, the node's user, may connect;
* every connection's peer credentials (``SO_PEERCRED``) are checked: only the node's own
  uid, or root, is served; anyone else gets 403 and a log line;
* runs never see it: podman and apptainer bind each run's own files, not the task
  directory, and on Kubernetes it is inside the node's pod.

Routes (JSON unless said): ``GET /runs`` — the runs in flight and those that ended lately,
with status and age; ``GET /runs/{id}/log`` — the run's container log (text);
``POST /runs/{id}/kill`` — kill one run (it ends ``killed`` and the server is told).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from executors.base import UnknownRun
from node.logging import get_logger

log = get_logger(__name__)

#: ``struct ucred`` (pid, uid, gid) as ``SO_PEERCRED`` returns it.
_UCRED = struct.Struct("3i")
#: The longest path a unix socket address holds (``sun_path`` less its terminating NUL).
MAX_SOCKET_PATH = 107


class AdminTarget(Protocol):
    """What the admin endpoint asks of the running node (its run lifecycle)."""

    def overview(self) -> list[dict[str, Any]]: ...

    async def kill_run(self, run_id: int) -> bool: ...

    async def log_of(self, run_id: int) -> str: ...


class AdminServer:
    """Serves the admin routes on a 0600 unix socket; see the module docstring."""

    def __init__(self, path: Path, *, target: Callable[[], AdminTarget | None]) -> None:
        self.path = path
        self._target = target
        self._runner: web.AppRunner | None = None
        self._inode: tuple[int, int] | None = None  # the socket file this server made

    async def start(self) -> None:
        """Bind the socket (replacing a stale one this user left) and serve."""
        path = self.path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise OSError(
                f"admin.socket {path} is longer than {MAX_SOCKET_PATH} bytes; give a shorter path"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket() or path.is_symlink():
            # Left by a node that died, or by one still shutting down as this one starts
            # (a restart): the newest node serves; the older one leaves this file alone.
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(previous)
        path.chmod(0o600)
        made = path.stat()
        self._inode = (made.st_dev, made.st_ino)
        app = web.Application(middlewares=[_only_the_node_user])
        app.router.add_get("/runs", self._runs)
        app.router.add_get("/runs/{run_id:\\d+}/log", self._log)
        app.router.add_post("/runs/{run_id:\\d+}/kill", self._kill)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        log.info("node.admin_serving", socket=str(path))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # Only the file this server made: a node started after it (a restart that overlapped
        # this one's shutdown) may have put its own socket there since.
        with contextlib.suppress(FileNotFoundError):
            now = self.path.stat()
            if (now.st_dev, now.st_ino) == self._inode:
                self.path.unlink()

    def _lifecycle(self) -> AdminTarget:
        target = self._target()
        if target is None:
            raise web.HTTPServiceUnavailable(
                text='{"error": "the node is still starting"}', content_type="application/json"
            )
        return target

    async def _runs(self, request: web.Request) -> web.Response:
        return web.json_response({"runs": self._lifecycle().overview()})

    async def _log(self, request: web.Request) -> web.Response:
        run_id = int(request.match_info["run_id"])
        try:
            text = await self._lifecycle().log_of(run_id)
        except UnknownRun:
            raise _not_found(run_id) from None
        return web.Response(text=text)

    async def _kill(self, request: web.Request) -> web.Response:
        run_id = int(request.match_info["run_id"])
        if not await self._lifecycle().kill_run(run_id):
            raise _not_found(run_id)
        return web.json_response({"run_id": run_id, "kill_requested": True}, status=202)


def _not_found(run_id: int) -> web.HTTPNotFound:
    return web.HTTPNotFound(
        text=f'{{"error": "run {run_id} is not in flight on this node"}}',
        content_type="application/json",
    )


@web.middleware
async def _only_the_node_user(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    uid = peer_uid(request)
    if uid is None or uid not in (0, os.geteuid()):
        log.warning("node.admin_refused", peer_uid=uid)
        raise web.HTTPForbidden(
            text='{"error": "only the node\'s own user may use its admin socket"}',
            content_type="application/json",
        )
    return await handler(request)


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of the request's unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    _, uid, _ = _UCRED.unpack(raw)
    return int(uid)
