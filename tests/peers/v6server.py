"""The real vantage6-server 4.15.2 as a test peer (pytest plugin).

The server runs from its own venv (``scripts/v6server-setup``; fednode's venv never
contains vantage6) as a subprocess of ``scripts/v6server/launch.py``: sqlite in a temp
dir, 127.0.0.1 on a free port, a known root password, a fixed JWT secret (so tokens
survive ``restart()``). The researcher is the real ``vantage6-client`` behind an RPC
worker (``tests/peers/v6client.py``).

Fixtures (all session-scoped; a peer that cannot start fails the test, never skips):

- ``v6_server``   -> ``V6Server``: ``url``, ``api_url``, ``port``, ``restart()``, ...
- ``v6_user``     -> ``V6UserClient`` logged in as root (root org, id 1)
- ``v6_plain``    -> ``V6Collaboration``: unencrypted; orgs A, B each with one node
- ``v6_encrypted``-> ``V6Collaboration``: encrypted; orgs A, B with RSA keys and a node
  each, the root org's key set up in the user client (results are encrypted for it)

Nodes are few on purpose: the server bcrypt-checks a node's api key against every node
row in turn (~0.2 s each), so each extra node slows every node login.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.peers.v6client import V6RpcError, V6UserClient

__all__ = ["V6Collaboration", "V6Org", "V6RpcError", "V6Server", "V6UserClient"]

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "scripts" / "v6server" / "launch.py"
USERCLIENT = REPO / "scripts" / "v6server" / "userclient.py"
VENV = Path(os.environ.get("V6SERVER_VENV", Path.home() / ".cache/fednode/v6server-venv"))
V6_VERSION = "4.15.2"

ROOT_USER = "root"
ROOT_PASSWORD = "fednode-root-password"  # a throwaway test server's
START_TIMEOUT = 180.0  # a loaded 2-core machine has needed more than 60 s
#: The server signs its JWTs (HS256) with this; fixed, so tokens survive ``restart()``
#: and a test can sign a token the server verifies (one that has expired, say).
JWT_SECRET = "fednode-test-jwt-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"the vantage6-server venv is missing ({VENV}); run scripts/v6server-setup",
            pytrace=False,
        )
    return python


@dataclass
class V6Server:
    """One vantage6-server process on 127.0.0.1:``port`` with its database in ``workdir``."""

    workdir: Path
    port: int
    host: str = "127.0.0.1"
    api_path: str = "/api"
    root_username: str = ROOT_USER
    root_password: str = ROOT_PASSWORD
    last_start_seconds: float = 0.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: socket.io connects here (engine.io path /socket.io)."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """``http://127.0.0.1:PORT/api``: REST base."""
        return self.url + self.api_path

    @property
    def log_path(self) -> Path:
        """stdout+stderr of the server process (console logging is on), all starts."""
        return self.workdir / "server-console.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "server.yaml"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        (self.workdir / "log").mkdir(exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        config = {  # every key is needed; logging.* is read unconditionally
            "description": "fednode test peer",
            "ip": self.host,
            "port": self.port,
            "api_path": self.api_path,
            "uri": f"sqlite:///{self.workdir / 'v6.sqlite'}",
            "allow_drop_all": False,
            "jwt_secret_key": JWT_SECRET,
            "directories": {"log": str(self.workdir / "log"), "data": str(self.workdir / "data")},
            "logging": {
                "level": "INFO",
                "file": "server.log",
                "use_console": True,
                "backup_count": 2,
                "max_size": 1024,
                "format": "%(asctime)s - %(name)-14s - %(levelname)-8s - %(message)s",
                "datefmt": "%Y-%m-%d %H:%M:%S",
            },
        }
        # JSON is YAML; no YAML writer needed in this venv.
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        """Start the server and wait for ``/api/health``; fail the test with the log tail."""
        if self.running:
            return
        env = dict(os.environ, V6_INIT_SUPER_PASS=self.root_password)  # used on 1st start
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start on port {self.port} ====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [
                    str(_venv_python()),
                    str(LAUNCH),
                    "--config",
                    str(self.config_path),
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
            )
        while time.monotonic() - began < START_TIMEOUT:
            if self._proc.poll() is not None:
                self._fail(f"vantage6-server exited with {self._proc.returncode}")
            if self._healthy():
                self.last_start_seconds = time.monotonic() - began
                return
            time.sleep(0.1)
        self.stop()
        self._fail(f"vantage6-server not healthy within {START_TIMEOUT} s")

    def stop(self) -> None:
        """SIGTERM the server (SIGKILL after 10 s); the database stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again: same port, same database, same JWT secret."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no server log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.api_url + "/health", timeout=2) as response:
                return bool(response.status == 200 and json.load(response).get("database"))
        except (OSError, ValueError):
            return False

    def _fail(self, reason: str) -> None:
        pytest.fail(f"{reason}; {self.log_path} ends with:\n{self.log_tail()}", pytrace=False)


@dataclass(frozen=True)
class V6Org:
    """An organization of a collaboration with its one node."""

    id: int
    name: str
    node_id: int
    node_name: str
    api_key: str
    private_key: Path | None = None  # PEM file (encrypted collaborations only)
    public_key: str | None = None  # as the server stores it: base64 of the PEM


@dataclass(frozen=True)
class V6Collaboration:
    """Orgs root (the researcher's, no node), A and B (one node each) in one collaboration."""

    id: int
    name: str
    encrypted: bool
    root_org_id: int
    org_a: V6Org
    org_b: V6Org
    user: V6UserClient
    server: V6Server
    root_private_key: Path | None = None  # the researcher's org key (results are for it)
    more: tuple[V6Org, ...] = ()  # organizations C, D, ... where a test asked for them

    @property
    def orgs(self) -> tuple[V6Org, V6Org]:
        return (self.org_a, self.org_b)

    @property
    def all_orgs(self) -> tuple[V6Org, ...]:
        return (self.org_a, self.org_b, *self.more)

    def create_task(
        self,
        *,
        input_: dict[str, Any],
        image: str,
        organizations: list[int] | None = None,
        name: str = "fednode-test",
        databases: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """``user.create_task`` in this collaboration, for orgs A and B unless told."""
        return self.user.create_task(
            collaboration=self.id,
            organizations=organizations or [self.org_a.id, self.org_b.id],
            input_=input_,
            image=image,
            name=name,
            databases=databases,
        )


def _make_collaboration(
    user: V6UserClient,
    server: V6Server,
    *,
    prefix: str,
    encrypted: bool,
    keydir: Path | None,
    members: tuple[str, ...] = ("a", "b"),
) -> V6Collaboration:
    root_org_id = int(user.whoami["organization_id"])
    keys: dict[str, tuple[Path, str]] = {}
    root_key: Path | None = None
    if encrypted:
        assert keydir is not None
        for who in ("root", *members):
            path = keydir / f"{prefix}-{who}.pem"
            keys[who] = (path, user.generate_key(path))
        root_key = keys["root"][0]
        user.setup_encryption(root_key)  # uploads the root org's public key
    orgs = {}
    for who in members:
        public_key = keys[who][1] if encrypted else None
        orgs[who] = user.create_organization(f"{prefix}-org-{who}", public_key=public_key)
    collab = user.create_collaboration(
        f"{prefix}-collaboration",
        [root_org_id, *(orgs[who]["id"] for who in members)],
        encrypted=encrypted,
    )
    nodes = {}
    for who in members:
        node_name = f"{prefix}-node-{who}"
        node = user.create_node(
            collaboration=collab["id"], organization=orgs[who]["id"], name=node_name
        )
        nodes[who] = V6Org(
            id=orgs[who]["id"],
            name=orgs[who]["name"],
            node_id=node["id"],
            node_name=node_name,
            api_key=node["api_key"],
            private_key=keys[who][0] if encrypted else None,
            public_key=keys[who][1] if encrypted else None,
        )
    return V6Collaboration(
        id=collab["id"],
        name=collab["name"],
        encrypted=encrypted,
        root_org_id=root_org_id,
        org_a=nodes["a"],
        org_b=nodes["b"],
        user=user,
        server=server,
        root_private_key=root_key,
        more=tuple(nodes[who] for who in members[2:]),
    )


@pytest.fixture(scope="session")
def v6_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[V6Server]:
    """The running vantage6-server 4.15.2 (fresh sqlite per test session)."""
    server = V6Server(workdir=tmp_path_factory.mktemp("v6server"), port=_free_port())
    server.write_config()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def v6_user(v6_server: V6Server) -> Iterator[V6UserClient]:
    """The real vantage6 ``UserClient``, logged in as root, behind the RPC worker."""
    client = V6UserClient(
        python=_venv_python(),
        script=USERCLIENT,
        log_path=v6_server.workdir / "userclient.log",
    )
    try:
        client.login(
            url=f"http://{v6_server.host}",
            port=v6_server.port,
            api_path=v6_server.api_path,
            username=v6_server.root_username,
            password=v6_server.root_password,
        )
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def v6_plain(v6_server: V6Server, v6_user: V6UserClient) -> V6Collaboration:
    """An unencrypted collaboration (input and results are base64 JSON)."""
    v6_server.start()  # a no-op unless an earlier test left it stopped
    return _make_collaboration(v6_user, v6_server, prefix="plain", encrypted=False, keydir=None)


@pytest.fixture(scope="session")
def v6_encrypted(
    v6_server: V6Server, v6_user: V6UserClient, tmp_path_factory: pytest.TempPathFactory
) -> V6Collaboration:
    """An encrypted collaboration: RSA-4096 keys made by vantage6 for root, A and B."""
    keydir = tmp_path_factory.mktemp("v6keys")
    v6_server.start()
    return _make_collaboration(v6_user, v6_server, prefix="enc", encrypted=True, keydir=keydir)


@pytest.fixture(scope="session")
def v6_encrypted_three(
    v6_server: V6Server, v6_user: V6UserClient, tmp_path_factory: pytest.TempPathFactory
) -> V6Collaboration:
    """An encrypted collaboration of three organizations with a node each (A, B, C)."""
    keydir = tmp_path_factory.mktemp("v6keys3")
    v6_server.start()
    return _make_collaboration(
        v6_user, v6_server, prefix="enc3", encrypted=True, keydir=keydir, members=("a", "b", "c")
    )
