"""The per-run files on the node's side: ``<task_dir>/run-<id>/{input,output,token}``.

Every executor that shares a file system with its containers (podman, apptainer, and
Kubernetes through the task-directory volume) lays the files out the same way, so the node
and the proxy never need to know which runtime ran the run. The decrypted input lives here
only while the run exists: :meth:`RunFiles.remove` deletes it with the rest.

The directory also keeps the node's own record that it asked for a run to be killed
(``killed``, never mounted into the container): runtimes that keep no such record of their
own (podman) tell "killed on request" from "crashed" with it, also after a restart.

The files are small and local; they are written directly rather than through a thread.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from executors.spec import INPUT_FILE_NAME, OUTPUT_FILE_NAME, TOKEN_FILE_NAME, RunSpec

#: The node's record of a kill request; not one of the files the container sees.
KILL_MARKER_NAME = "killed"


class RunFiles:
    """Paths and preparation of one run's directory."""

    def __init__(self, task_dir: Path, run_id: int) -> None:
        self.run_id = run_id
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

        The directory is private (0700) to whoever runs the container, so other local users
        cannot read the decrypted input. ``write_token=False`` leaves the token file empty,
        for runtimes that mount the token over it from elsewhere (a Kubernetes Secret), so
        the token never rests on the shared volume.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.input.write_bytes(spec.input)
        token = spec.token.get_secret_value() if spec.token and write_token else ""
        self.token.write_text(token)
        self.output.write_bytes(b"")
        if owner is not None and os.geteuid() == 0:
            for path in (self.directory, self.input, self.token, self.output):
                os.chown(path, *owner)

    def read_output(self) -> bytes:
        try:
            return self.output.read_bytes()
        except FileNotFoundError:
            return b""

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
