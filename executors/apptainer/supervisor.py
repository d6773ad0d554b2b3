"""A run's supervisor: keeps one ``apptainer run`` going without the node, and records its end.

apptainer has no daemon that would outlive the node and remember how a container ended, so
each run gets this small process instead (stdlib only, run by path with ``python -I``, so
it does not depend on the node's packages staying importable). The node starts it as::

    python -I supervisor.py <task_dir>/run-<id>/apptainer

The first process (the *launcher*) forks the supervisor and exits as soon as the
supervisor reports, on stdout, ``{"pid", "starttime", "child_pid", "started_at"}`` or
``{"error"}``; so the supervisor is never the node's child (it is reparented, and the node
never has to reap it), in the same way whether the node started it or adopted it after a
restart. The supervisor:

1. starts its own session (``setsid``): the node's signals and exit do not reach it;
2. for runs that may reach the proxy in the ``relay`` arrangement, makes a private network
   namespace (with a user namespace when unprivileged: ``unshare(CLONE_NEWUSER |
   CLONE_NEWNET)``, mapping the node's uid to itself), brings ``lo`` up, and listens on
   the proxy's loopback address in it; each connection is relayed to the node's proxy,
   on its loopback TCP port, through a :class:`Dialer` left in the host's namespace.
   apptainer then runs in that namespace with ``--userns``: its only reachable endpoint
   is the relay. With peering (docs/networking.md) the same namespace also listens on the
   node's forwarder ports at the proxy's address (relayed the same way, each dialled from
   the run's own host-side loopback address, so the node can tell runs apart), and the
   host's namespace gets a listener on the run's address for each port the run declares,
   relayed into the namespace to ``127.0.0.1:<port>`` — for connections of the node's
   user only (the socket's owner, from ``/proc/net/tcp``, as the dialer sees it);
3. runs apptainer in a process group of its own, with its output in ``log``, and dying
   with the supervisor (``PR_SET_PDEATHSIG``);
4. records ``supervisor.json``; on SIGTERM (the node's kill or deadline) it sends SIGTERM
   to apptainer's process group and SIGKILL after the grace period;
5. when apptainer ends, writes ``exit.json`` (``exit_code`` or ``signal``) and exits. A
   launch that fails writes ``{"start_error"}`` instead.

The node waits for the supervisor's exit on a pidfd and then reads ``exit.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import ipaddress
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, Protocol

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_RELAY_CHUNK = 64 * 1024
#: Relayed connections one run may have open at once (all listeners together); more are
#: closed as they come, so a run cannot exhaust the supervisor's file descriptors.
MAX_CONNECTIONS = 256
#: The C library, from the symbols already loaded (``find_library`` would run ldconfig).
_LIBC = ctypes.CDLL(None, use_errno=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: supervisor.py <run state directory>\n")
        return 2
    state = Path(argv[1])
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        # The launcher: relay the supervisor's one report to the node, then leave.
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        if not report:
            report = json.dumps({"error": "the supervisor ended before it reported"}).encode()
        sys.stdout.buffer.write(report + b"\n")
        sys.stdout.flush()
        return 0
    os.close(read_end)
    os.setsid()
    _detach_stdio()
    code = 0
    try:
        code = supervise(state, report_fd=write_end)
    except BaseException as exc:  # never leave without a record
        _write_json(state / "exit.json", {"start_error": f"supervisor failed: {exc!r}"})
        _report(write_end, {"error": f"supervisor failed: {exc!r}"})
        code = 1
    os._exit(code)


def supervise(state: Path, *, report_fd: int) -> int:
    """Start apptainer as planned in ``run.json``; follow it to its end; record the end."""
    plan: dict[str, Any] = json.loads((state / "run.json").read_text())["plan"]
    network = plan.get("network")
    relayed: Relays | None = None
    try:
        if network:
            relayed = Relays.make(network, keep_closed=[report_fd])
    except OSError as exc:
        message = f"could not make the run's private network namespace: {exc}"
        _write_json(state / "exit.json", {"start_error": message})
        _report(report_fd, {"error": message})
        return 1
    return asyncio.run(_supervise(state, plan, relayed=relayed, report_fd=report_fd))


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


class Relays:
    """The listening sockets of one run and what each connection to them is relayed to.

    Made in this order, because a socket stays in the network namespace it was made in:
    the :class:`Dialer` (forked while this process is still in the host's namespace), the
    host-side listeners on the run's address for its declared ports, then the run's
    namespace with the proxy's and the forwarders' listeners.
    """

    def __init__(self) -> None:
        self.listeners: list[tuple[socket.socket, Handler]] = []
        self._open = 0

    @classmethod
    def make(cls, network: dict[str, Any], *, keep_closed: list[int]) -> Relays:
        relays = cls()
        proxy_host, proxy_port = str(network["upstream_host"]), int(network["upstream_port"])
        source = network.get("source_host")
        forward = [int(port) for port in network.get("forward_ports", ())]
        declared = [int(port) for port in network.get("declared_ports", ())]
        owner = int(network.get("owner_uid", os.geteuid()))
        _raise_file_limit(len(forward) + len(declared) + 2 * MAX_CONNECTIONS + 64)
        dialer = Dialer(
            proxy_host,
            proxy_port,
            keep_closed,
            source=str(source) if source else None,
            also=forward,
        )
        if declared:
            if not source:
                raise OSError(0, "declared ports need the run's host-side address")
            for port in declared:
                relays._add(
                    listen(str(source), port),
                    functools.partial(relay_inward, port=port, owners=dialer, owner_uid=owner),
                )
        relays._add(private_network(network), functools.partial(relay, upstream=dialer))
        for port in forward:
            relays._add(
                listen(str(network["listen_host"]), port),
                functools.partial(relay, upstream=dialer.to(port)),
            )
        return relays

    def _add(self, listener: socket.socket, handler: Handler) -> None:
        async def bounded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self._open >= MAX_CONNECTIONS:
                writer.close()
                return
            self._open += 1
            try:
                await handler(reader, writer)
            finally:
                self._open -= 1

        self.listeners.append((listener, bounded))

    async def serve(self) -> list[asyncio.Server]:
        return [
            await asyncio.start_server(handler, sock=listener)
            for listener, handler in self.listeners
        ]


async def _supervise(
    state: Path,
    plan: dict[str, Any],
    *,
    relayed: Relays | None,
    report_fd: int,
) -> int:
    loop = asyncio.get_running_loop()
    terminate = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, terminate.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    try:
        with (state / "log").open("ab") as log:
            child = await asyncio.create_subprocess_exec(
                *plan["argv"],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **plan.get("environment", {})},
                process_group=0,
                preexec_fn=_die_with_parent,
            )
    except OSError as exc:
        message = f"could not run {plan['argv'][0]}: {exc}"
        _write_json(state / "exit.json", {"start_error": message})
        _report(report_fd, {"error": message})
        return 1
    me = os.getpid()
    record = {
        "pid": me,
        "starttime": _starttime(me),
        "child_pid": child.pid,
        "started_at": time.time(),
    }
    _write_json(state / "supervisor.json", record)
    _report(report_fd, record)
    servers = await relayed.serve() if relayed is not None else []
    stopper = asyncio.create_task(_stop_on(terminate, child.pid, float(plan["grace_seconds"])))
    returncode = await child.wait()
    stopper.cancel()
    if returncode < 0:
        ended: dict[str, Any] = {"signal": -returncode}
    else:
        ended = {"exit_code": returncode}
    ended["ended_at"] = time.time()
    _write_json(state / "exit.json", ended)
    for server in servers:
        server.close()
    return 0


async def _stop_on(terminate: asyncio.Event, group: int, grace: float) -> None:
    """On the node's SIGTERM: SIGTERM to apptainer's process group, SIGKILL after ``grace``."""
    await terminate.wait()
    _signal_group(group, signal.SIGTERM)
    await asyncio.sleep(grace)
    _signal_group(group, signal.SIGKILL)


def _signal_group(group: int, number: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, number)


# -- the private network namespace and its relay ---------------------------------------------


def private_network(network: dict[str, Any]) -> socket.socket:
    """Move this process into a new network namespace with only ``lo``; listen there.

    Unprivileged, the network namespace needs a user namespace of its own, in which this
    process keeps its uid and gid (one-to-one maps, no other ids): files keep their owners,
    and apptainer, which runs in it as the same unprivileged user, makes its own nested user
    namespace (``--userns``). As root, only the network namespace is new.
    """
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET if uid == 0 else CLONE_NEWNET | CLONE_NEWUSER
    if _LIBC.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare: {os.strerror(error)}")
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n")
    _loopback_up()
    return listen(str(network["listen_host"]), int(network["listen_port"]))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket in this process's current network namespace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listener.setblocking(False)
    return listener


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(control, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(control, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


async def relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: Upstream
) -> None:
    """One connection from the run, relayed byte for byte to the proxy."""
    try:
        up_reader, up_writer = await upstream.connect()
    except OSError:
        writer.close()
        return
    try:
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
    finally:
        for end in (writer, up_writer):
            end.close()


async def relay_inward(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    port: int,
    owners: Dialer,
    owner_uid: int,
) -> None:
    """One connection to a declared port on the run's host-side address, relayed into the
    run's namespace to ``127.0.0.1:port`` if the node's user opened it (any local user
    can reach a loopback address; only the node connects peer streams to runs)."""
    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    try:
        uid = await owners.owner(peer, local)
        if uid != owner_uid:
            writer.close()
            return
        run_reader, run_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        writer.close()
        return
    try:
        await asyncio.gather(_pump(reader, run_writer), _pump(run_reader, writer))
    finally:
        for end in (writer, run_writer):
            end.close()


class Upstream(Protocol):
    """Where the relay sends a run's connections: the node's proxy (or a forwarder)."""

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


class Dialer:
    """The proxy on TCP in the host's namespace, which the run's namespace cannot reach.

    A process forked before the supervisor leaves the host's network namespace connects
    on request and hands the connected socket back over a socketpair (``SCM_RIGHTS``); a
    socket stays in the namespace it was made in, so the relay can use it from the run's.
    It dials only ``host`` on ``port`` (the proxy) or a port of ``also`` (the node's
    forwarders), from ``source`` when given (the run's host-side address); and it says who
    owns a TCP connection in the host's namespace (:meth:`owner`). The dialer ends when
    the supervisor does (end of file on the socketpair).
    """

    def __init__(
        self,
        host: str,
        port: int,
        keep_closed: list[int],
        *,
        source: str | None = None,
        also: Iterable[int] = (),
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.fork() == 0:
            ours.close()
            for fd in keep_closed:
                with contextlib.suppress(OSError):
                    os.close(fd)
            _dial_forever(theirs, host, frozenset({port, *also}), source)
            os._exit(0)
        theirs.close()
        ours.setblocking(False)
        self._channel = ours
        self._port = port
        self._lock: asyncio.Lock | None = None

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self.dial(self._port)

    def to(self, port: int) -> Upstream:
        """The same dialer, for another of its ports."""
        return _Port(self, port)

    async def dial(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        message, fds = await self._ask(f"dial {port}".encode(), fds=1)
        if not fds:
            raise OSError(message.decode(errors="replace") or "the dialer has ended")
        return await asyncio.open_connection(sock=socket.socket(fileno=fds[0]))

    async def owner(self, peer: Any, local: Any) -> int | None:
        """The uid owning the host-namespace TCP socket at ``peer`` connected to ``local``."""
        request = f"owner {peer[0]} {int(peer[1])} {local[0]} {int(local[1])}"
        answer, _fds = await self._ask(request.encode(), fds=0)
        words = answer.split()
        return int(words[1]) if len(words) == 2 and words[1].isdigit() else None

    async def _ask(self, request: bytes, *, fds: int) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:  # one request in flight: answers arrive in order
            await loop.sock_sendall(self._channel, request)
            await _readable(loop, self._channel)
            if not fds:
                return self._channel.recv(1024), []
            message, received, _flags, _address = socket.recv_fds(self._channel, 1024, fds)
            return message, received


class _Port:
    def __init__(self, dialer: Dialer, port: int) -> None:
        self._dialer, self._port = dialer, port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self._dialer.dial(self._port)


def _dial_forever(
    channel: socket.socket, host: str, ports: frozenset[int], source: str | None
) -> None:
    while request := channel.recv(256):
        words = request.decode(errors="replace").split()
        if words[:1] == ["owner"] and len(words) == 5:
            uid = tcp_owner((words[1], int(words[2])), (words[3], int(words[4])))
            channel.send(f"uid {'-' if uid is None else uid}".encode())
            continue
        if words[:1] != ["dial"] or len(words) != 2 or int(words[1]) not in ports:
            channel.send(b"refused: not a port of this run's relay")
            continue
        port = int(words[1])
        try:
            connection = socket.create_connection(
                (host, port), timeout=10, source_address=(source, 0) if source else None
            )
        except OSError as exc:
            channel.send(f"cannot reach the node at {host}:{port}: {exc}".encode())
            continue
        with connection:
            socket.send_fds(channel, [b"ok"], [connection.fileno()])


def tcp_owner(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid of the IPv4 TCP socket bound to ``peer`` and connected to ``local``, from
    ``/proc/net/tcp`` of this process's namespace (``None``: no such socket)."""
    wanted = (_proc_address(*peer), _proc_address(*local))
    try:
        with open("/proc/net/tcp") as table:  # noqa: PTH123 - read line by line
            next(table, None)
            for line in table:
                fields = line.split()
                if len(fields) > 7 and (fields[1], fields[2]) == wanted:
                    return int(fields[7])
    except (OSError, ValueError):
        return None
    return None


def _proc_address(host: str, port: int) -> str:
    """``/proc/net/tcp``'s spelling: the IPv4 address as a native-endian hex word, ``:`` port."""
    packed = ipaddress.IPv4Address(host).packed
    return f"{struct.unpack('=I', packed)[0]:08X}:{port:04X}"


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


# -- plumbing ----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In apptainer's process (before exec): SIGKILL it if the supervisor dies first, and
    give it back the file limit the supervisor started with."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if _INHERITED_FILE_LIMIT is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, _INHERITED_FILE_LIMIT)


_INHERITED_FILE_LIMIT: tuple[int, int] | None = None


def _raise_file_limit(needed: int) -> None:
    """Enough descriptors for every listener and relayed connection (up to the hard limit)."""
    global _INHERITED_FILE_LIMIT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    _INHERITED_FILE_LIMIT = (soft, hard)
    raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))


def _starttime(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2 :].split()[19])


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _report(fd: int, document: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(document).encode())
        os.close(fd)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document))
    temporary.replace(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
