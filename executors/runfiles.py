"""The per-run files on the node's side: ``<task_dir>/run-<id>/{input,output,token}``.

Every executor that shares a file system with its containers (podman, apptainer, and
Kubernetes through the task-directory volume) lays the files out the same way, so the node
and the proxy never need to know which runtime ran the run. The decrypted input lives here
only while the run exists: :meth:`RunFiles.remove` deletes it with the rest.

The directory also keeps the node's own record that it asked for a run to be killed
(``killed``, never mounted into the container): runtimes that keep no such record of their
own (podman) tell "killed on request" from "crashed" with it, also after a restart.

The directory and its files are opened without following links
(:func:`~executors.outputs.open_run_directory`): the node writes the decrypted input only
into a file it created itself, and reads the output back through
:mod:`executors.outputs`, bounded and refused when it is not a plain file. The input and
token files are small and local; they are written directly rather than through a thread.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from executors.base import TokenUnavailable
from executors.outputs import OutputRead, open_run_directory, read_output
from executors.spec import INPUT_FILE_NAME, OUTPUT_FILE_NAME, TOKEN_FILE_NAME, RunSpec

#: The node's record of a kill request; not one of the files the container sees.
KILL_MARKER_NAME = "killed"
#: A container token is a JWT of a few hundred bytes; read no more than this.
_TOKEN_MAX_BYTES = 64 * 1024


class RunFiles:
    """Paths and preparation of one run's directory."""

    def __init__(self, task_dir: Path, run_id: int) -> None:
        self.run_id = run_id
        self.task_dir = task_dir
        self.directory = task_dir / f"run-{run_id}"

    @property
    def input(self) -> Path:
        return self.directory / INPUT_FILE_NAME

    @property
    def output(self) -> Path:
        return self.directory / OUTPUT_FILE_NAME

    @property
    def token(self) -> Path:
        return self.directory / TOKEN_FILE_NAME

    def read_token(self) -> str:
        """The token the node wrote for the run (raises ``TokenUnavailable`` if none)."""
        try:
            fd = os.open(self.token, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                data = os.read(fd, _TOKEN_MAX_BYTES)
            finally:
                os.close(fd)
        except OSError as exc:
            raise TokenUnavailable(f"token file: {exc.strerror or exc}") from None
        token = data.decode("ascii", "replace").strip()
        if not token:
            raise TokenUnavailable("token file: empty")
        return token

    @property
    def kill_marker(self) -> Path:
        return self.directory / KILL_MARKER_NAME

    @property
    def killed(self) -> bool:
        """Whether the node asked for this run to be killed (see :meth:`mark_killed`)."""
        return self.kill_marker.exists()

    def mark_killed(self) -> None:
        """Record that the node asked for this run to be killed."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.kill_marker.touch()

    def prepare(
        self, spec: RunSpec, *, owner: tuple[int, int] | None = None, write_token: bool = True
    ) -> None:
        """Write input and token, create an empty output; hand them to ``owner`` (uid, gid).

        The directory is private (0700) and stays the node's: the container sees its three
        files one by one (bind or subPath mounts), never the directory, so it cannot put a
        link in their place. ``owner`` gets the files, so the container's user can read
        the input and write the output. ``write_token=False`` leaves the token file empty,
        for runtimes that mount the token over it from elsewhere (a Kubernetes Secret), so
        the token never rests on the shared volume.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = spec.token.get_secret_value() if spec.token and write_token else ""
        chown = owner if owner is not None and os.geteuid() == 0 else None
        with open_run_directory(self.task_dir, self.directory.name) as folder:
            for name, data in (
                (INPUT_FILE_NAME, spec.input),
                (TOKEN_FILE_NAME, token.encode()),
                (OUTPUT_FILE_NAME, b""),
            ):
                _write_new(folder, name, data, owner=chown)

    async def read_output(self, *, limit: int) -> OutputRead:
        """The output file, at most ``limit`` bytes, or why it is refused
        (:func:`executors.outputs.read_output`)."""
        return await read_output(self.task_dir, self.directory.name, OUTPUT_FILE_NAME, limit=limit)

    def remove(self) -> bool:
        """Remove the run's folder; whether it is gone. What the node may not remove (made
        by another user, e.g. kubelet's ``subPath`` directories, owned by root) stays."""
        shutil.rmtree(self.directory, ignore_errors=True)
        return not os.path.lexists(self.directory)


def _write_new(folder: int, name: str, data: bytes, *, owner: tuple[int, int] | None) -> None:
    """Make ``name`` in ``folder`` a plain file holding ``data``, never through a link.

    A plain file already there is rewritten in place (a repeated start keeps the inode a
    container may have mounted); a link, or anything else, is removed and replaced.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o666, dir_fd=folder)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        fd = -1
    if fd >= 0:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            fd = -1
    if fd < 0:
        _remove_entry(folder, name)
        fd = os.open(name, flags | os.O_EXCL, 0o666, dir_fd=folder)
    try:
        os.ftruncate(fd, 0)
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _remove_entry(folder: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=folder)
    except IsADirectoryError:
        os.rmdir(name, dir_fd=folder)
    except FileNotFoundError:
        pass
