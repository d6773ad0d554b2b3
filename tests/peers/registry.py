"""The real registry peer: two distribution registries (Debian's ``docker-registry``).

``registries`` (session scope) starts two instances on free loopback ports, each with its
own temporary storage, htpasswd (bcrypt) authentication and a log file:

* ``trusted``: the registry the node has credentials for;
* ``other``: a registry a task may name that the node has NO credentials for. It accepts
  the same username and password, so a node that leaked its credentials to it would
  succeed in pulling, and its log would name the user — the attack, made visible.

Both are plain HTTP. ``registry_podman`` (session scope) is a podman API service of its
own whose ``registries.conf`` (``CONTAINERS_REGISTRIES_CONF``, in the session's temporary
directory) marks exactly these two addresses insecure; nothing on the host is changed.
It pushes the conformance behaviour image into both registries.

The programs come from ``scripts/registry-setup``; when they are missing the tests fail
with that command, never skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.conformance.podman_harness import build_behaviour_image
from tests.peers.podman import PodmanService, _start_service, _stop_service

SETUP_COMMAND = "scripts/registry-setup"
USERNAME = "fednode-robot"
START_TIMEOUT = 30.0
REPOSITORY = "fednode/behaviour"


@dataclass(frozen=True)
class Registry:
    """One running registry: its ``host:port``, the credential it accepts, its log."""

    name: str
    host: str
    username: str
    password: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass(frozen=True)
class Registries:
    trusted: Registry
    other: Registry


@dataclass(frozen=True)
class RegistryPodman:
    """A podman service that trusts the test registries, and the image pushed to both."""

    service: PodmanService
    #: ``<registry host>/fednode/behaviour:<tag>``: the same image in either registry.
    tag: str

    def image(self, registry: Registry) -> str:
        return f"{registry.host}/{REPOSITORY}:{self.tag}"


def _fail(reason: str) -> NoReturn:
    pytest.fail(f"registry peer: {reason}. Run `{SETUP_COMMAND}` first.", pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _v2_status(host: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{host}/v2/", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _start_registry(
    name: str, *, workdir: Path, password: str, binary: str, htpasswd: str
) -> tuple[Registry, subprocess.Popen[bytes]]:
    workdir.mkdir(parents=True)
    users = workdir / "htpasswd"
    made = subprocess.run(
        [htpasswd, "-Bbn", USERNAME, password], check=True, capture_output=True, text=True
    )
    users.write_text(made.stdout)
    port = _free_port()
    host = f"127.0.0.1:{port}"
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: info, formatter: text}\n"
        f"storage: {{filesystem: {{rootdirectory: {workdir / 'storage'}}}}}\n"
        f"http: {{addr: '{host}', secret: {secrets.token_hex(16)}}}\n"
        f"auth: {{htpasswd: {{realm: fednode-{name}, path: {users}}}}}\n"
    )
    log_path = workdir / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=workdir,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while _v2_status(host) != 401:
        if process.poll() is not None:
            _fail(
                f"docker-registry exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            _stop_service(process)
            _fail(f"docker-registry did not answer on {host} within {START_TIMEOUT:.0f} s")
        time.sleep(0.05)
    return Registry(name, host, USERNAME, password, log_path), process


@pytest.fixture(scope="session")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    """Two real registries with htpasswd auth; fails (never skips) when unavailable."""
    binary = shutil.which("docker-registry") or shutil.which("registry")
    htpasswd = shutil.which("htpasswd")
    if binary is None or htpasswd is None:
        _fail("docker-registry or htpasswd is not installed")
    root = tmp_path_factory.mktemp("registries")
    password = secrets.token_urlsafe(18)
    started: list[subprocess.Popen[bytes]] = []
    try:
        made = {}
        for name in ("trusted", "other"):
            registry, process = _start_registry(
                name, workdir=root / name, password=password, binary=binary, htpasswd=htpasswd
            )
            started.append(process)
            made[name] = registry
        yield Registries(trusted=made["trusted"], other=made["other"])
    finally:
        for process in started:
            _stop_service(process)


@pytest.fixture(scope="session")
def registry_podman(
    registries: Registries, podman_service: PodmanService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryPodman]:
    """A podman service for which the test registries are insecure (HTTP) registries."""
    root = tmp_path_factory.mktemp("registry-podman")
    conf = root / "registries.conf"
    conf.write_text(
        "unqualified-search-registries = []\n"
        + "".join(
            f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
            for registry in (registries.trusted, registries.other)
        )
    )
    socket_path = root / "podman.sock"
    process = _start_service(
        socket_path, env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
    )
    service = PodmanService(
        socket_path=socket_path,
        base_image=podman_service.base_image,
        average_image=podman_service.average_image,
        diagnostics_image=podman_service.diagnostics_image,
        data_dir=podman_service.data_dir,
    )
    local = build_behaviour_image(service)
    tag = local.rsplit(":", 1)[1]
    pushed: list[str] = []
    try:
        for registry in (registries.trusted, registries.other):
            target = f"{registry.host}/{REPOSITORY}:{tag}"
            push = subprocess.run(
                service.cli(
                    "push",
                    "--tls-verify=false",
                    "--creds",
                    f"{registry.username}:{registry.password}",
                    local,
                    target,
                ),
                check=False,
                capture_output=True,
                text=True,
            )
            if push.returncode != 0:
                _fail(f"pushing {local} to {target} failed: {push.stderr[-2000:]}")
            pushed.append(target)
        yield RegistryPodman(service=service, tag=tag)
    finally:
        for target in pushed:  # what the tests pulled into the (shared) image storage
            with contextlib.suppress(OSError):
                subprocess.run(
                    service.cli("rmi", "--force", target), check=False, capture_output=True
                )
        _stop_service(process)
