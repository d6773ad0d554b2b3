"""The real PostgreSQL peer: Debian's server, on a free port, holding one table.

``postgres_database`` (session scope; ``postgres_elsewhere``: the same in a network
namespace of its own, standing for another host) copies the cluster template that
``scripts/postgres-setup`` initialised (``~/.cache/fednode/postgres/template``) into the
session's temporary directory, starts ``postgres`` on it on a free port of every address (as root,
in a user namespace as the ``postgres`` account's id: the server refuses to run as root),
creates database ``clinic`` with table ``patients`` (:data:`PATIENTS`), and stops the
server at the end of the session. Nothing is shared between sessions.

When the template or the server programs are missing the tests fail with that command,
never skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

SETUP_COMMAND = "scripts/postgres-setup"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fednode" / "postgres"
START_TIMEOUT = 60.0
DATABASE = "clinic"
#: The rows of ``patients`` (id, age, department).
PATIENTS = ((1, 34, "cardiology"), (2, 51, "oncology"), (3, 47, "cardiology"))


@dataclass(frozen=True)
class PostgresDatabase:
    """A running PostgreSQL with database ``clinic``; ``uri`` as a node's config gives it."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def psql(self, sql: str, *, database: str | None = None) -> str:
        """Run ``sql`` with psql over TCP; its output (unaligned, tuples only)."""
        done = subprocess.run(
            [
                "psql",
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database or self.database,
                "-c",
                sql,
            ],
            env={**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"},
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise AssertionError(f"psql failed: {done.stderr.strip()}")
        return done.stdout


def _fail(reason: str) -> NoReturn:
    pytest.fail(f"postgres peer: {reason}. Run `{SETUP_COMMAND}` first.", pytrace=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    ns_id = _account_id("postgres")
    return ["unshare", "--user", f"--map-user={ns_id}", f"--map-group={ns_id}", *command]


def _account_id(name: str) -> int:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return pwd.getpwnam("nobody").pw_uid


@contextlib.contextmanager
def running_postgres(
    base: Path, *, host: str = "127.0.0.1", netns: str | None = None
) -> Iterator[PostgresDatabase]:
    """A server on a copy of the template in ``base``, listening on every address (of
    network namespace ``netns``, if given), with database ``clinic`` and its table; the
    peer is reached at ``host``."""
    template, password_file, bin_file = (
        CACHE / "template",
        CACHE / "password",
        CACHE / "bin",
    )
    if not (template / "PG_VERSION").is_file() or not password_file.is_file():
        _fail(f"no cluster template in {template}")
    server = Path(bin_file.read_text().strip()) / "postgres"
    if not server.is_file():
        _fail(f"the server program {server} is missing")
    data = base / "data"
    shutil.copytree(template, data, symlinks=True)
    data.chmod(0o700)
    port = _free_port()
    log_path = base / "postgres.log"
    command = _as_server(
        [
            str(server),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=*",
            "-c",
            "unix_socket_directories=",
            "-c",
            "fsync=off",
            "-c",
            "shared_buffers=16MB",
        ]
    )
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    peer = PostgresDatabase(
        host=host,
        port=port,
        user="fednode",
        password=password_file.read_text().strip(),
        database=DATABASE,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                peer.psql("select 1", database="postgres")
                break
            except AssertionError:
                if process.poll() is not None:
                    _fail(f"postgres exited: {log_path.read_text(errors='replace')[-2000:]}")
                if time.monotonic() > deadline:
                    _fail(f"postgres did not answer within {START_TIMEOUT:.0f} s")
                time.sleep(0.2)
        peer.psql(f"create database {DATABASE}", database="postgres")
        rows = ", ".join(f"({i}, {age}, '{dept}')" for i, age, dept in PATIENTS)
        peer.psql(
            "create table patients (id int primary key, age int, department text); "
            f"insert into patients values {rows}"
        )
        yield peer
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def postgres_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresDatabase]:
    with running_postgres(tmp_path_factory.mktemp("postgres")) as peer:
        yield peer


@pytest.fixture(scope="session")
def postgres_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresDatabase]:
    """The same server as if on another host: in a network namespace of its own, joined to
    this host by a veth pair and routed (``10.217.<n>.2``), so that to a CNI it is an
    outside address, not one of the host's (Cilium applies no CIDR rule to its nodes' own
    addresses). Needs root; the namespace and the pair go with the session."""
    if os.geteuid() != 0:
        _fail("a database in a network namespace of its own needs root")
    suffix = secrets.token_hex(3)
    netns, host_end, db_end = f"fednode-db-{suffix}", f"fdb{suffix}h", f"fdb{suffix}n"
    subnet = 100 + secrets.randbelow(150)
    host_ip, db_ip = f"10.217.{subnet}.1", f"10.217.{subnet}.2"
    steps = [
        ["ip", "netns", "add", netns],
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", db_end],
        ["ip", "link", "set", db_end, "netns", netns],
        ["ip", "addr", "add", f"{host_ip}/30", "dev", host_end],
        ["ip", "link", "set", host_end, "up"],
        ["ip", "-n", netns, "addr", "add", f"{db_ip}/30", "dev", db_end],
        ["ip", "-n", netns, "link", "set", db_end, "up"],
        ["ip", "-n", netns, "link", "set", "lo", "up"],
        ["ip", "-n", netns, "route", "add", "default", "via", host_ip],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                _fail(f"`{' '.join(step)}` failed: {done.stderr.strip()}")
        with running_postgres(
            tmp_path_factory.mktemp("postgres-elsewhere"), host=db_ip, netns=netns
        ) as peer:
            yield peer
    finally:
        subprocess.run(["ip", "link", "del", host_end], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
