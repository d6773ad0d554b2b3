"""A thin async client for podman's libpod REST API over its unix socket.

One :class:`aiohttp.ClientSession` per executor, bound to the socket with a
``UnixConnector``: every call is an HTTP request on a pooled connection, never a podman
subprocess. The client knows podman's endpoints and error shapes, not runs: the executor
(:mod:`executors.podman.executor`) gives the calls their meaning.

Errors are split the way the executor needs them: :class:`LibpodError` is podman
answering "no" (a status and podman's own message), :class:`executors.base.ExecutorError`
is podman not answering at all (socket missing, service down, timeout).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from executors.base import ExecutorError
from executors.credentials import RegistryCredential
from executors.outputs import LogTail

#: podman 4.0 is the oldest libpod API with the endpoints and fields used here; a newer
#: service answers this prefix the same way.
API_PREFIX = "/v4.0.0/libpod"
MIN_API_VERSION = (4, 0)
_BASE_URL = "http://podman"
#: The stream header of multiplexed (non-terminal) logs: stream id, 3 zero bytes, length.
_FRAME = struct.Struct(">BxxxI")
_LOG_CHUNK = 64 * 1024


class LibpodError(Exception):
    """podman refused a request: its status code and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"podman answered {status}: {message}")
        self.status = status
        self.message = message


def demultiplex(data: bytes) -> bytes:
    """The payload of a whole multiplexed log (see :class:`Demultiplexer`)."""
    demultiplexer = Demultiplexer()
    return demultiplexer.feed(data) + demultiplexer.end()


class Demultiplexer:
    """The payload of a multiplexed log stream (stdout and stderr, in order), chunk by chunk.

    Bytes that do not start with a valid frame header are passed on as they are (a terminal
    container's log is not multiplexed). It holds at most one partial header between
    chunks, so a log of any length streams through in bounded memory.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._left = 0  # payload bytes of the current frame still to come
        self._raw = False

    def feed(self, data: bytes) -> bytes:
        if self._raw:
            return data
        buffer = self._pending + data if self._pending else data
        self._pending = b""
        payload: list[bytes] = []
        offset = 0
        while offset < len(buffer):
            if self._left:
                piece = buffer[offset : offset + self._left]
                payload.append(piece)
                self._left -= len(piece)
                offset += len(piece)
                continue
            if len(buffer) - offset < _FRAME.size:
                self._pending = buffer[offset:]
                break
            stream, size = _FRAME.unpack_from(buffer, offset)
            if stream > 2:
                self._raw = True
                payload.append(buffer[offset:])
                break
            offset += _FRAME.size
            self._left = size
        return b"".join(payload)

    def end(self) -> bytes:
        """What is left at the end of the stream (a partial header, passed on as it is)."""
        pending, self._pending = self._pending, b""
        return pending


def registry_auth(credential: RegistryCredential) -> str:
    """The ``X-Registry-Auth`` header value for a pull from ``credential.registry`` only.

    libpod takes either one bare credential, which it offers to whatever registry the pull
    ends up at, or a map from registry to credential, which it offers only to that
    registry. fednode always sends the map (base64url of its JSON), with one entry.
    """
    entry = {"username": credential.username, "password": credential.password.get_secret_value()}
    raw = json.dumps({credential.registry: entry}).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


class LibpodClient:
    """The libpod endpoints fednode uses; open with :meth:`open`, release with :meth:`close`."""

    def __init__(self, socket_path: str, *, timeout: float) -> None:
        self._socket_path = socket_path
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.UnixConnector(path=self._socket_path)
        self._session = aiohttp.ClientSession(
            base_url=_BASE_URL, connector=connector, timeout=self._timeout
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ExecutorError("the podman API client is not open")
        return self._session

    # -- plumbing ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        limits: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            async with self.session.request(
                method,
                API_PREFIX + path,
                params=params,
                json=json_body,
                headers=headers,
                timeout=limits or self._timeout,
            ) as response:
                if response.status >= 400:
                    raise LibpodError(response.status, await _message_of(response))
                yield response
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ExecutorError(
                f"podman API at {self._socket_path} did not answer {method} {path}: "
                f"{exc.__class__.__name__}: {exc}"
            ) from exc

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._request(method, path, **kwargs) as response:
            if response.status == 204:
                return None
            return await response.json(content_type=None)

    # -- service ----------------------------------------------------------------------------

    async def version(self) -> tuple[int, ...]:
        """The libpod API version the service speaks (e.g. ``(4, 3, 1)``).

        From ``/libpod/_ping``'s ``Libpod-Api-Version`` header: ``/version`` would do the
        same in a third of a second, because podman asks conmon and the OCI runtime theirs.
        """
        try:
            async with self.session.get("/libpod/_ping") as response:
                text = response.headers.get("Libpod-Api-Version", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ExecutorError(
                f"cannot reach the podman API at {self._socket_path}: {exc}; is "
                "`podman system service` running there?"
            ) from exc
        try:
            return tuple(int(part) for part in text.split("-")[0].split("."))
        except ValueError:
            raise ExecutorError(
                f"{self._socket_path} does not look like podman's API (no libpod version)"
            ) from None

    # -- containers -------------------------------------------------------------------------

    async def create_container(self, body: Mapping[str, Any]) -> str:
        created = await self._json("POST", "/containers/create", json_body=body)
        return str(created["Id"])

    async def start_container(self, name: str) -> None:
        """Start; a container that is already running (304) is left alone."""
        async with self._request("POST", f"/containers/{name}/start"):
            pass

    async def init_container(self, name: str) -> None:
        """Set the container up (network namespace and address included) without starting
        its process; one already set up (304) is left alone."""
        async with self._request("POST", f"/containers/{name}/init"):
            pass

    async def kill_container(self, name: str, *, signal: str = "SIGKILL") -> None:
        async with self._request("POST", f"/containers/{name}/kill", params={"signal": signal}):
            pass

    async def inspect_container(self, name: str) -> dict[str, Any] | None:
        """The container's inspect document, or ``None`` if there is no such container."""
        try:
            body = await self._json("GET", f"/containers/{name}/json")
        except LibpodError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(body)

    async def list_containers(self, *, labels: list[str]) -> list[dict[str, Any]]:
        filters = json.dumps({"label": labels})
        body = await self._json(
            "GET", "/containers/json", params={"all": "true", "filters": filters}
        )
        return list(body or [])

    async def remove_container(self, name: str) -> bool:
        """Remove (forcibly, with anonymous volumes); ``False`` if it did not exist."""
        try:
            async with self._request(
                "DELETE", f"/containers/{name}", params={"force": "true", "v": "true"}
            ):
                return True
        except LibpodError as exc:
            if exc.status == 404:
                return False
            raise

    async def container_logs(self, name: str, *, limit: int) -> str:
        """The last ``limit`` bytes of the container's stdout and stderr, in order.

        The log is streamed through a :class:`~executors.outputs.LogTail`: a run that logs
        gigabytes costs the node ``limit`` bytes of memory, not the log's size.
        """
        tail = LogTail(limit)
        demultiplexer = Demultiplexer()
        async with self._request(
            "GET", f"/containers/{name}/logs", params={"stdout": "true", "stderr": "true"}
        ) as response:
            async for chunk in response.content.iter_chunked(_LOG_CHUNK):
                tail.feed(demultiplexer.feed(chunk))
        tail.feed(demultiplexer.end())
        return tail.text()

    @asynccontextmanager
    async def events(
        self, *, filters: Mapping[str, list[str]]
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Subscribe to podman's event stream; the body yields one decoded event per line.

        Entering the context returns once podman has answered (the subscription exists);
        the stream has no read timeout, so it lasts until podman or the caller ends it.
        """
        unlimited = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)
        async with self._request(
            "GET",
            "/events",
            params={"stream": "true", "filters": json.dumps(dict(filters))},
            limits=unlimited,
        ) as response:
            yield _event_lines(response)

    # -- images -----------------------------------------------------------------------------

    async def image_exists(self, reference: str) -> bool:
        try:
            async with self._request("GET", f"/images/{reference}/exists"):
                return True
        except LibpodError as exc:
            if exc.status == 404:
                return False
            raise

    async def inspect_image(self, reference: str) -> dict[str, Any] | None:
        try:
            return dict(await self._json("GET", f"/images/{reference}/json"))
        except LibpodError as exc:
            if exc.status == 404:
                return None
            raise

    async def pull_image(self, reference: str, *, auth: str | None, seconds: float) -> None:
        """Pull ``reference`` within ``seconds``; :class:`LibpodError` says why it failed.

        libpod answers 200 and reports a failed pull inside the streamed body
        (``{"error": ...}``), so the whole body is read.
        """
        headers = {"X-Registry-Auth": auth} if auth else None
        async with self._request(
            "POST",
            "/images/pull",
            params={"reference": reference, "quiet": "true", "policy": "always"},
            headers=headers,
            limits=aiohttp.ClientTimeout(total=seconds),
        ) as response:
            async for raw in response.content:
                line = raw.strip()
                if not line:
                    continue
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                if isinstance(report, dict) and report.get("error"):
                    raise LibpodError(response.status, str(report["error"]))

    # -- networks ---------------------------------------------------------------------------

    async def inspect_network(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(await self._json("GET", f"/networks/{name}/json"))
        except LibpodError as exc:
            if exc.status == 404:
                return None
            raise

    async def create_network(self, body: Mapping[str, Any]) -> None:
        await self._json("POST", "/networks/create", json_body=body)


async def _message_of(response: aiohttp.ClientResponse) -> str:
    text = await response.text(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip() or response.reason or ""
    if isinstance(body, dict):
        return str(body.get("message") or body.get("cause") or text)
    return text


async def _event_lines(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for raw in response.content:
        line = raw.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event
