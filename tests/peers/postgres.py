"""The real PostgreSQL peer: Debian's server, on a free port, holding one table.

``postgres_database`` (session scope) copies the cluster template that
``scripts/postgres-setup`` initialised (``~/.cache/fednode/postgres/template``) into the
session's temporary directory, starts ``postgres`` on it on a free port of every address (as root,
in a user namespace as the ``postgres`` account's id: the server refuses to run as root),
creates database ``clinic`` with table ``patients`` (:data:`PATIENTS`), and stops the
server at the end of the session. Nothing is shared between sessions.

When the template or the server programs are missing the tests fail with that command,
never skip.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def postgres_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresDatabase]:
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
    base = tmp_path_factory.mktemp("postgres")
    data = base / "data"
    shutil.copytree(template, data, symlinks=True)
    data.chmod(0o700)
    port = _free_port()
    log_path = base / "postgres.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            _as_server(
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
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    peer = PostgresDatabase(
        host="127.0.0.1",
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
