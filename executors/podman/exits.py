"""Container exits the moment they happen: inotify on conmon's exit directory.

conmon, the monitor podman puts beside every container, writes ``<exits dir>/<container
id>`` (the exit code) as soon as the container's process ends; its source says the
directory is there for "a daemon process [that] wants to monitor all container exits using
inotify". podman 4.3's own event stream reports the same exit later: with the ``file``
events backend (the only one on hosts without journald) the API service tails the events
file by polling it every 250 ms. The executor follows both; :class:`RunEventStream`
keeps whichever report comes first and drops the other.

This module only turns kernel notifications into container ids on the event loop (one
file descriptor, one reader callback, no thread, no polling); what an exit means is the
executor's business. Linux only; where inotify or the directory is unavailable,
:meth:`ExitWatch.start` returns ``False`` and the event stream alone carries exits.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable
from pathlib import Path

from common.logging import get_logger

log = get_logger(__name__)

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_SIZE = 64 * 1024


class ExitWatch:
    """Calls ``on_exit(container_id)`` for every exit file conmon writes in ``directory``.

    ``on_overflow()`` is called when the kernel dropped notifications (queue overflow), so
    the owner can re-list instead.
    """

    def __init__(
        self,
        directory: Path,
        *,
        on_exit: Callable[[str], None],
        on_overflow: Callable[[], None],
    ) -> None:
        self._directory = directory
        self._on_exit = on_exit
        self._on_overflow = on_overflow
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """Begin watching; ``False`` (and a log line) when the directory cannot be watched."""
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            init1 = libc.inotify_init1
            add_watch = libc.inotify_add_watch
        except (OSError, AttributeError) as exc:
            log.info("podman.exit_watch.unavailable", reason=str(exc))
            return False
        fd = int(init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            log.info("podman.exit_watch.unavailable", reason=os.strerror(ctypes.get_errno()))
            return False
        path = os.fsencode(self._directory)
        if int(add_watch(fd, path, _IN_CLOSE_WRITE | _IN_MOVED_TO)) < 0:
            reason = os.strerror(ctypes.get_errno())
            os.close(fd)
            log.info("podman.exit_watch.unavailable", directory=str(self._directory), reason=reason)
            return False
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        log.debug("podman.exit_watch.started", directory=str(self._directory))
        return True

    def close(self) -> None:
        if self._fd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = None

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + size]
            offset += _EVENT.size + size
            if mask & _IN_Q_OVERFLOW:
                self._on_overflow()
                continue
            name = raw.rstrip(b"\0").decode(errors="replace")
            if name:
                self._on_exit(name)
