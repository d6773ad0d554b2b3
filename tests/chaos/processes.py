"""The processes the harness kills and restarts: the node, and the podman API service.

The node is ``fednode start -c node.yaml`` exactly as an operator runs it, in its own process
group, its output appended to one log across all its lives. ``kill()`` is SIGKILL: no
shutdown code of the node runs, which is the point. The podman service is restarted on the
same socket; the containers it started live on under conmon, as they do in production.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.peers import podman as podman_peer

REPO = Path(__file__).resolve().parents[2]


class NodeProcess:
    """One node configuration, started and killed as a real process, any number of times."""

    def __init__(self, *, config: Path, log_path: Path, health_port: int) -> None:
        self.config = config
        self.log_path = log_path
        self.health_port = health_port
        self.lives = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.lives += 1
        with self.log_path.open("ab") as log:
            log.write(f'{{"event": "chaos.node_start", "life": {self.lives}}}\n'.encode())
            log.flush()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "node", "start", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to stop anything."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait: the node's own clean shutdown. Its exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def status(self) -> dict[str, object] | None:
        """The node's ``/status`` (None while it does not answer)."""
        url = f"http://127.0.0.1:{self.health_port}/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None


class PodmanServiceProcess:
    """``podman system service`` on a private socket, restartable."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        self._proc = podman_peer._start_service(self.socket_path)

    def stop(self) -> None:
        if self._proc is not None:
            podman_peer._stop_service(self._proc)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
