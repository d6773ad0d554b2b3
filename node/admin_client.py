"""The CLI's side of the admin socket: one HTTP request over a unix socket, no event loop.

``fednode runs``/``logs``/``kill`` are short-lived commands; the standard library's
``http.client`` on a connected unix socket is all they need (see :mod:`node.admin` for the
server and why it is a socket).
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

#: How long the CLI waits for the node (a log is read from the runtime: allow for that).
TIMEOUT_SECONDS = 60.0


class AdminUnavailable(Exception):
    """No node answers on the admin socket (the message says why and what to check)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("fednode", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def call(
    path: Path, method: str, route: str, *, timeout: float = TIMEOUT_SECONDS
) -> tuple[int, bytes]:
    """``method route`` on the admin socket at ``path``: the status and the body."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request(method, route)
        response = connection.getresponse()
        return response.status, response.read()
    except PermissionError:
        raise AdminUnavailable(
            f"may not use the admin socket {path}: run this as the node's user (or root)"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise AdminUnavailable(
            f"no node is running with admin socket {path} (admin.socket in the configuration)"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise AdminUnavailable(f"the node at {path} did not answer: {exc}") from None
    finally:
        connection.close()
