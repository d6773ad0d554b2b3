"""Reading what a run leaves behind — its output file and its log — as hostile input.

An algorithm is untrusted code, and its output file and log are what it writes: nothing
here follows a link it may have put in their place, trusts a size, or reads without a
bound. Every executor collects through these functions, so the rules are the same on
every runtime:

* the run's folder is opened relative to the task directory with ``O_DIRECTORY |
  O_NOFOLLOW`` and the output relative to that folder with ``O_NOFOLLOW | O_NONBLOCK``
  (a FIFO cannot block the node); the open file must be a regular file with one link
  (no symbolic link to ``/proc/self/environ``, the node's key or another run's input; no
  hard link; no device or pipe);
* its size is checked with ``fstat`` before a byte is read, and at most ``limit + 1``
  bytes are ever read (a file still growing is caught too): an output over
  :attr:`OutputLimits.max_output_bytes` is *refused* — the run fails with a reason that
  names the size, the limit and the setting, and nothing of it is uploaded;
* a log keeps only its last :attr:`OutputLimits.max_log_bytes` (the end of a log says why
  a run failed), with a note saying how much was left out: a long log never fails a run.

A refusal is a value (:class:`OutputRead` with ``refused`` set), not an exception: the
executor passes it on in :class:`~executors.spec.RunOutput` and the node turns it into the
run's status. Reads are chunked and give the event loop a turn between chunks, so a
large (but allowed) output never stalls it; no thread is used for file I/O (the project's
convention: local files are read on the loop, see :mod:`executors.runfiles`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

MIB = 1024 * 1024
#: How much is read between two turns of the event loop.
CHUNK_BYTES = MIB
#: The node settings that hold the limits (named in what a refused run's log says).
OUTPUT_SETTING = "max_output_bytes"
LOG_SETTING = "max_log_bytes"
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputLimits(BaseModel):
    """How much of a run's output and log the node accepts (the node's settings)."""

    model_config = ConfigDict(frozen=True)

    #: An output file larger than this fails the run (nothing of it is uploaded).
    max_output_bytes: Annotated[int, Field(gt=0)] = 64 * MIB
    #: A log longer than this keeps only its end (with a note saying so).
    max_log_bytes: Annotated[int, Field(ge=1024)] = 1 * MIB


class OutputRead(NamedTuple):
    """The output file's bytes, or why the node refused them (then ``data`` is empty)."""

    data: bytes = b""
    refused: str = ""


def too_large(size: int, limit: int) -> str:
    return (
        f"the run's output is {size} bytes, over the node's limit of {limit} "
        f"(setting {OUTPUT_SETTING})"
    )


@contextmanager
def open_run_directory(task_dir: Path, name: str) -> Iterator[int]:
    """A descriptor of ``task_dir/name``, refused (``OSError``) if that is a link.

    ``task_dir`` is the operator's (its path may well contain links); the run's folder in
    it is what a run could have swapped, so it is never followed.
    """
    parent = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        folder = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        yield folder
    finally:
        os.close(folder)


@contextmanager
def open_regular_file(directory: int, name: str) -> Iterator[tuple[int, os.stat_result]]:
    """``name`` in the folder ``directory``, opened for reading without following a link.

    Raises :class:`UnsafeFile` when it is not a plain file the run may hand back, and
    ``FileNotFoundError`` when it is not there.
    """
    try:
        fd = os.open(
            name,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
            dir_fd=directory,
        )
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeFile(f"the run's {name} file is a symbolic link") from error
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"the run's {name} file is not a regular file ({_kind(info)})")
        if info.st_nlink != 1:
            raise UnsafeFile(f"the run's {name} file has {info.st_nlink} hard links")
        yield fd, info
    finally:
        os.close(fd)


class UnsafeFile(Exception):
    """A run's file is something the node will not read (a link, a pipe, a device...)."""


async def read_output(task_dir: Path, folder: str, name: str, *, limit: int) -> OutputRead:
    """The run's output file, at most ``limit`` bytes; refused when unsafe or larger.

    A missing folder or file is an empty output (a run that never started wrote none).
    """
    try:
        with open_in_run_folder(task_dir, folder, name) as (fd, info):
            if info.st_size > limit:
                return OutputRead(refused=too_large(info.st_size, limit))
            data = await _read_at_most(fd, limit + 1)
    except FileNotFoundError:
        return OutputRead()
    except UnsafeFile as error:
        return OutputRead(refused=f"{error}; the node does not read it")
    if len(data) > limit:  # it grew after fstat
        return OutputRead(refused=too_large(len(data), limit))
    return OutputRead(data)


async def read_log_tail(task_dir: Path, folder: str, name: str, *, limit: int) -> str:
    """The last ``limit`` bytes of a log file in the run's folder, with a note when its
    start was left out; a missing log is empty, an unreadable one says why."""
    try:
        with open_in_run_folder(task_dir, folder, name) as (fd, info):
            skipped = max(0, info.st_size - limit)
            os.lseek(fd, skipped, os.SEEK_SET)
            data = await _read_at_most(fd, limit)
    except FileNotFoundError:
        return ""
    except (UnsafeFile, OSError) as error:
        return f"(the log was not read: {error})"
    return _with_note(data, total=skipped + len(data), skipped=skipped, limit=limit)


@contextmanager
def open_in_run_folder(
    task_dir: Path, folder: str, name: str
) -> Iterator[tuple[int, os.stat_result]]:
    """``task_dir/folder/name`` opened as :func:`open_regular_file` does; ``folder`` is a
    relative path (``run-7`` or ``run-7/apptainer``) of which no part may be a link.

    Raises :class:`UnsafeFile` for a link, or anything else the node will not read.
    """
    parts = Path(folder).parts
    with ExitStack() as stack:
        try:
            directory = stack.enter_context(open_run_directory(task_dir, parts[0]))
            for part in parts[1:]:
                directory = os.open(part, _DIRECTORY_FLAGS, dir_fd=directory)
                stack.callback(os.close, directory)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFile(f"the run's folder {folder} is not a plain directory") from error
            raise
        yield stack.enter_context(open_regular_file(directory, name))


class LogTail:
    """The last ``limit`` bytes of a log that arrives in pieces (a runtime's log stream).

    Memory stays within about twice ``limit`` however long the log is.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._kept = bytearray()

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        self._kept += data
        if len(self._kept) > 2 * self.limit:
            del self._kept[: len(self._kept) - self.limit]

    def text(self) -> str:
        kept = bytes(self._kept[-self.limit :])
        return _with_note(kept, total=self.total, skipped=self.total - len(kept), limit=self.limit)


def _with_note(data: bytes, *, total: int, skipped: int, limit: int) -> str:
    text = data.decode(errors="replace")
    if not skipped:
        return text
    return (
        f"fednode: the log is {total} bytes; its first {skipped} bytes are left out "
        f"(the node keeps the last {limit}, setting {LOG_SETTING})\n{text}"
    )


async def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd``, a chunk at a time, the loop served in between."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(CHUNK_BYTES, left))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
        if left > 0:
            await asyncio.sleep(0)
    return b"".join(chunks)


def _kind(info: os.stat_result) -> str:
    mode = info.st_mode
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file"
