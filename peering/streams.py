"""TCP streams between runs at two nodes, multiplexed over their end-to-end session.

One side (the node whose run connected to its local forwarder) **opens** a stream: it
sends ``OPEN {src_run, dst_run, port}`` and waits for ``ACCEPT`` or ``REFUSE``. The other
side asks its :class:`Admission` (the node: is ``dst_run`` mine and running, does it
declare ``port``, is ``src_run`` of the same job, at the organization the session
authenticated?) and connects to the run. From then on bytes flow both ways as ``DATA``
frames; ``EOF`` half-closes; ``RESET`` ends the stream at once, with a reason.

Bounded everywhere, with no unbounded buffer:

* **Credit-based flow control.** Each side may have at most ``window`` bytes of a
  stream in flight; the receiver returns ``CREDIT`` as it writes bytes into the local
  socket. A sender that exceeds its credit is reset (a peer cannot make us buffer). So a
  slow run slows its own stream only, never the relay link or other streams.
* **Caps**: streams per local run, streams in all; an idle timeout; a time limit to be
  accepted.

The end of each stream is reported to an observer with its byte counts, duration,
peer and outcome (the node turns it into a span under the run's trace and a log line).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from common.logging import get_logger
from peering.frames import (
    MAX_DATA,
    Frame,
    FrameError,
    FrameKind,
    credit_frame,
    decode_frame,
    json_frame,
)
from peering.session import SessionError, Sessions

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    window: int = 256 * 1024
    streams_per_run: int = 64
    streams: int = 2048
    idle_seconds: float = 600.0
    open_seconds: float = 20.0


async def connect_patiently(
    host: str, port: int, *, within: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    """A TCP connection to a run's port, tried again while the run does not listen yet.

    The opener's connection to its forwarder is already established (the forwarder
    accepted it), so a refusal here would reach the algorithm as a connection closed after
    it was made — which frameworks that retry only failed connects (MPyC) take as fatal.
    Waiting up to ``within`` seconds for the peer to listen keeps the semantics of a
    connect to a port that opens a moment later; the last error is raised after that.
    The third value says whether it had to wait (then the opener drops a connection its
    algorithm closed meanwhile: :func:`gave_up`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pause = 0.05
    waited = False
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            return reader, writer, waited
        except ConnectionRefusedError:
            waited = True
            if loop.time() + pause > deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


#: The body of an ACCEPT sent after waiting for the run to listen.
_LATE = b"late"


def gave_up(reader: asyncio.StreamReader) -> bool:
    """Whether the local end has already closed (EOF received), bytes still buffered or not.

    ``at_eof()`` is false while bytes are buffered, and asyncio has no public accessor for
    the EOF alone, so its reader's flag is read. A client that half-closes after sending
    counts too: it is then treated as one whose connect failed, and tries again."""
    return bool(getattr(reader, "_eof", False))


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """A peer's request: its run ``src_run`` wants our run ``dst_run``'s ``port``.

    ``peer_organization`` is the organization whose key signed the session the request
    came in (0 for a run on this node, where there is no session)."""

    peer_node: int
    src_run: int
    dst_run: int
    port: int
    peer_organization: int = 0


class Refused(Exception):
    """A stream that may not be opened; the message is sent to the peer and logged."""


class Admission(Protocol):
    async def admit(self, request: OpenRequest) -> tuple[str, int]:
        """Where to connect (host, port) for an admitted stream; raises :class:`Refused`."""


@dataclass(slots=True)
class StreamReport:
    """How one stream went: handed to the observer when it ends."""

    peer_node: int
    src_run: int
    dst_run: int
    port: int
    opened_here: bool
    outcome: str = "closed"
    reason: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0


Observer = Callable[[StreamReport], None]
_Key = tuple[int, bool, int]  # (peer node, opened here?, stream id)


_SESSION_ENDED = "the session with"
#: Reasons that need no RESET to the peer: it sent one, or the link to it is gone.
_NO_RESET = ("reset by", "the relay link broke", "the node is stopping")


@dataclass(eq=False)
class _Stream:
    key: _Key
    local_run: int
    report: StreamReport
    window: int
    credit: int
    credit_changed: asyncio.Event = field(default_factory=asyncio.Event)
    inbound: deque[bytes] = field(default_factory=deque)
    inbound_bytes: int = 0
    inbound_changed: asyncio.Event = field(default_factory=asyncio.Event)
    eof_in: bool = False
    reset: str | None = None
    answer: asyncio.Future[str | None] | None = None  # opener: None = accepted, else refusal
    #: Opener: the peer accepted only after waiting for its run to listen.
    accepted_late: bool = False
    last_activity: float = field(default_factory=time.monotonic)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, reason: str) -> None:
        if self.reset is None:
            self.reset = reason
        self.ended.set()
        self.inbound_changed.set()
        self.credit_changed.set()
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(reason)


class Streams:
    """This node's peer streams: opening, accepting, pumping, ending."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        admission: Admission,
        observer: Observer,
        limits: StreamLimits | None = None,
    ) -> None:
        self._sessions = sessions
        self._admission = admission
        self._observer = observer
        self.limits = limits or StreamLimits()
        self._streams: dict[_Key, _Stream] = {}
        self._per_run: dict[int, int] = {}
        self._next_id: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        sessions.on_peer_lost = lambda peer, reason: self.reset_peer(
            peer, f"{_SESSION_ENDED} node {peer} ended: {reason}"
        )

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- opening (our run connected to a forwarder) ------------------------------------

    async def open(
        self,
        *,
        peer: int,
        src_run: int,
        dst_run: int,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> StreamReport:
        """Carry one local connection to ``dst_run``'s ``port`` at node ``peer``.

        Returns when the stream has ended, with its report; the local socket is closed.
        """
        report = StreamReport(peer, src_run, dst_run, port, opened_here=True)
        refusal = self._over_cap(src_run)
        if refusal is not None:
            return await self._end_unopened(report, writer, "refused", refusal)
        for attempt in (1, 2):
            stream = self._register((peer, True, self._new_id(peer)), src_run, report)
            refusal = await self._request_open(stream, src_run=src_run, dst_run=dst_run, port=port)
            if refusal is None:
                break
            self._unregister(stream)
            # The peer lost our session (it restarted): the OPEN went unread; once more,
            # on the fresh session the refusal made us agree on.
            if attempt == 1 and refusal.startswith(_SESSION_ENDED):
                stream.reset = None
                continue
            return await self._end_unopened(report, writer, "refused", refusal)
        if stream.accepted_late and gave_up(reader):
            # The algorithm closed its connection while the peer's run was not listening
            # yet (it timed out and will try again): deliver none of its bytes late, as a
            # connect that never completed would not.
            self._unregister(stream)
            reason = "the connection was closed before the peer run accepted it"
            await self._send_reset(stream, reason)
            return await self._end_unopened(report, writer, "abandoned", reason)
        await self._pump(stream, reader, writer)
        return report

    def _new_id(self, peer: int) -> int:
        stream_id = self._next_id.get(peer, 0) % (2**32 - 1) + 1
        self._next_id[peer] = stream_id
        return stream_id

    async def _request_open(
        self, stream: _Stream, *, src_run: int, dst_run: int, port: int
    ) -> str | None:
        """Send OPEN and wait for the answer: ``None`` if accepted, else why not."""
        peer, _, stream_id = stream.key
        stream.answer = asyncio.get_running_loop().create_future()
        body = {"src_run": src_run, "dst_run": dst_run, "port": port}
        try:
            await self._send(stream, json_frame(FrameKind.OPEN, True, stream_id, body))
            async with asyncio.timeout(self.limits.open_seconds):
                return await stream.answer
        except TimeoutError:
            return f"node {peer} did not answer within {self.limits.open_seconds:g} s"
        except (SessionError, ConnectionError) as exc:
            return str(exc)

    def _over_cap(self, run_id: int) -> str | None:
        if len(self._streams) >= self.limits.streams:
            return f"this node carries its maximum of {self.limits.streams} peer streams"
        if self._per_run.get(run_id, 0) >= self.limits.streams_per_run:
            return f"run {run_id} has its maximum of {self.limits.streams_per_run} peer streams"
        return None

    async def _end_unopened(
        self, report: StreamReport, writer: asyncio.StreamWriter, outcome: str, reason: str
    ) -> StreamReport:
        report.outcome, report.reason = outcome, reason
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        self._finish_report(report)
        return report

    # -- receiving ----------------------------------------------------------------------

    async def receive(self, peer: int, payload: bytes) -> None:
        """One message from ``peer`` through the relay (never blocks on a local socket)."""
        try:
            opened = await self._sessions.receive(peer, payload)
        except (SessionError, FrameError) as exc:
            log.warning("peering.message_refused", peer=peer, error=str(exc))
            return
        if opened is None:
            return
        plaintext, organization = opened
        try:
            frame = decode_frame(plaintext)
        except FrameError as exc:
            log.warning("peering.bad_frame", peer=peer, error=str(exc))
            return
        key: _Key = (peer, not frame.from_opener, frame.stream_id)
        if frame.kind is FrameKind.OPEN and frame.from_opener:
            await self._on_open(peer, organization, frame)
            return
        stream = self._streams.get(key)
        if stream is None:
            return  # a late frame of a stream that ended here
        stream.last_activity = time.monotonic()
        try:
            self._on_frame(stream, frame)
        except FrameError as exc:
            stream.fail(f"protocol error: {exc}")
            await self._send_reset(stream, f"protocol error: {exc}")

    def _on_frame(self, stream: _Stream, frame: Frame) -> None:
        kind = frame.kind
        if kind is FrameKind.DATA:
            if stream.inbound_bytes + len(frame.body) > stream.window:
                raise FrameError("the peer sent more than its credit")
            stream.inbound.append(frame.body)
            stream.inbound_bytes += len(frame.body)
            stream.report.bytes_received += len(frame.body)
            stream.inbound_changed.set()
        elif kind is FrameKind.CREDIT:
            stream.credit = min(stream.credit + frame.credit(), stream.window)
            stream.credit_changed.set()
        elif kind is FrameKind.EOF:
            stream.eof_in = True
            stream.inbound_changed.set()
        elif kind is FrameKind.RESET:
            stream.fail(f"reset by node {stream.key[0]}: {str(frame.json().get('reason'))[:200]}")
        elif kind is FrameKind.ACCEPT and stream.answer is not None:
            if not stream.answer.done():
                stream.accepted_late = frame.body == _LATE
                stream.answer.set_result(None)
        elif kind is FrameKind.REFUSE and stream.answer is not None:
            reason = str(frame.json().get("reason", "refused"))[:300]
            stream.fail(f"node {stream.key[0]} refused: {reason}")
        else:
            raise FrameError(f"unexpected {kind.name}")

    async def _on_open(self, peer: int, organization: int, frame: Frame) -> None:
        key: _Key = (peer, False, frame.stream_id)
        try:
            body = frame.json()
            request = OpenRequest(
                peer,
                _positive(body, "src_run"),
                _positive(body, "dst_run"),
                _port(body),
                organization,
            )
        except FrameError as exc:
            await self._send_frame(
                peer,
                json_frame(
                    FrameKind.REFUSE, False, frame.stream_id, {"reason": f"bad OPEN: {exc}"}
                ),
            )
            return
        if key in self._streams:
            return  # a duplicate OPEN: the first one is being handled
        report = StreamReport(peer, request.src_run, request.dst_run, request.port, False)
        refusal = self._over_cap(request.dst_run)
        if refusal is not None:
            report.outcome, report.reason = "refused", refusal
            self._finish_report(report)
            await self._send_frame(
                peer, json_frame(FrameKind.REFUSE, False, frame.stream_id, {"reason": refusal})
            )
            return
        stream = self._register(key, request.dst_run, report)
        task = asyncio.create_task(self._accept(stream, request), name=f"peer-stream-{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, stream: _Stream, request: OpenRequest) -> None:
        _peer, _, stream_id = stream.key
        try:
            async with asyncio.timeout(self.limits.open_seconds):
                host, port = await self._admission.admit(request)
                reader, writer, late = await connect_patiently(
                    host, port, within=self.limits.open_seconds * 0.75
                )
        except Refused as exc:
            await self._refuse(stream, str(exc))
            return
        except (OSError, TimeoutError) as exc:
            await self._refuse(
                stream, f"run {request.dst_run} does not answer on its port: {type(exc).__name__}"
            )
            return
        try:
            await self._send(
                stream, Frame(FrameKind.ACCEPT, False, stream_id, _LATE if late else b"")
            )
        except (SessionError, ConnectionError) as exc:
            stream.fail(str(exc))
        await self._pump(stream, reader, writer)

    async def _refuse(self, stream: _Stream, reason: str) -> None:
        self._unregister(stream)
        stream.report.outcome, stream.report.reason = "refused", reason
        self._finish_report(stream.report)
        peer, _, stream_id = stream.key
        await self._send_frame(
            peer, json_frame(FrameKind.REFUSE, False, stream_id, {"reason": reason})
        )

    # -- pumping ------------------------------------------------------------------------

    async def _pump(
        self, stream: _Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        outbound = asyncio.create_task(self._outbound(stream, reader))
        inbound = asyncio.create_task(self._inbound(stream, writer))
        ended = asyncio.create_task(stream.ended.wait())
        pending: set[asyncio.Task[None]] = {outbound, inbound}
        try:
            while pending and stream.reset is None:
                done, _ = await asyncio.wait(
                    pending | {ended},
                    timeout=min(30.0, self.limits.idle_seconds),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                pending -= done
                for task in done - {ended}:
                    error = task.exception()
                    if error is not None:
                        stream.fail(f"{type(error).__name__}: {error}")
                idle = time.monotonic() - stream.last_activity
                if pending and idle >= self.limits.idle_seconds:
                    stream.fail(f"idle for {idle:.0f} s")
                    stream.report.outcome = "idle"
        finally:
            ended.cancel()
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            self._unregister(stream)
            reason = stream.reset
            if reason is not None:
                if stream.report.outcome == "closed":
                    stream.report.outcome = "reset"
                stream.report.reason = reason
            self._finish_report(stream.report)
            if reason is not None and not reason.startswith(_NO_RESET):
                await self._send_reset(stream, reason)

    async def _outbound(self, stream: _Stream, reader: asyncio.StreamReader) -> None:
        _peer, opened_here, stream_id = stream.key
        while stream.reset is None:
            while stream.credit <= 0 and stream.reset is None:
                stream.credit_changed.clear()
                await stream.credit_changed.wait()
            if stream.reset is not None:
                return
            chunk = await reader.read(min(MAX_DATA, stream.credit))
            if not chunk:
                await self._send(stream, Frame(FrameKind.EOF, opened_here, stream_id))
                return
            stream.credit -= len(chunk)
            stream.report.bytes_sent += len(chunk)
            stream.last_activity = time.monotonic()
            await self._send(stream, Frame(FrameKind.DATA, opened_here, stream_id, chunk))

    async def _inbound(self, stream: _Stream, writer: asyncio.StreamWriter) -> None:
        _, opened_here, stream_id = stream.key
        unacknowledged = 0
        while stream.reset is None:
            if not stream.inbound:
                if unacknowledged:
                    await self._send(stream, credit_frame(opened_here, stream_id, unacknowledged))
                    unacknowledged = 0
                if stream.eof_in:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                stream.inbound_changed.clear()
                await stream.inbound_changed.wait()
                continue
            chunk = stream.inbound.popleft()
            writer.write(chunk)
            await writer.drain()
            stream.inbound_bytes -= len(chunk)
            unacknowledged += len(chunk)
            if unacknowledged >= stream.window // 4:
                await self._send(stream, credit_frame(opened_here, stream_id, unacknowledged))
                unacknowledged = 0

    # -- bookkeeping --------------------------------------------------------------------

    def _register(self, key: _Key, local_run: int, report: StreamReport) -> _Stream:
        window = self.limits.window
        stream = _Stream(key, local_run, report, window=window, credit=window)
        self._streams[key] = stream
        self._per_run[local_run] = self._per_run.get(local_run, 0) + 1
        return stream

    def _unregister(self, stream: _Stream) -> None:
        if self._streams.pop(stream.key, None) is stream:
            left = self._per_run.get(stream.local_run, 1) - 1
            if left > 0:
                self._per_run[stream.local_run] = left
            else:
                self._per_run.pop(stream.local_run, None)

    def _finish_report(self, report: StreamReport) -> None:
        report.seconds = time.monotonic() - report.started
        try:
            self._observer(report)
        except Exception:  # an observer's bug must not break streams
            log.exception("peering.observer_failed")

    async def _send(self, stream: _Stream, frame: Frame) -> None:
        await self._sessions.seal_to(stream.key[0], frame.encode())

    async def _send_frame(self, peer: int, frame: Frame) -> None:
        try:
            await self._sessions.seal_to(peer, frame.encode())
        except (SessionError, ConnectionError) as exc:
            log.info("peering.frame_not_sent", peer=peer, kind=frame.kind.name, error=str(exc))

    async def _send_reset(self, stream: _Stream, reason: str) -> None:
        peer, opened_here, stream_id = stream.key
        frame = json_frame(FrameKind.RESET, opened_here, stream_id, {"reason": reason[:300]})
        await self._send_frame(peer, frame)

    def reset_peer(self, peer: int, reason: str) -> None:
        """End every stream with ``peer`` (its session is gone)."""
        for stream in [s for k, s in self._streams.items() if k[0] == peer]:
            stream.fail(reason)

    def link_lost(self) -> None:
        """The relay link broke: nothing in flight can be recovered; end every stream."""
        self.reset_all("the relay link broke")

    def reset_all(self, reason: str) -> None:
        """End every stream."""
        for stream in list(self._streams.values()):
            stream.fail(reason)

    def reset_run(self, run_id: int, reason: str) -> None:
        """End every stream of a local run (it ended)."""
        for stream in [s for s in self._streams.values() if s.local_run == run_id]:
            stream.fail(reason)

    async def close(self) -> None:
        self.reset_all("the node is stopping")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _positive(body: dict[str, object], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FrameError(f"{name} must be a positive integer")
    return value


def _port(body: dict[str, object]) -> int:
    value = body.get("port")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise FrameError("port must be 1-65535")
    return value
