"""The testbed's processes: start one detached, wait until it is healthy, find it, stop it.

A ``Component`` is one long-running process (etcd, an apiserver, kubelet, ...) with its
log under ``RUN_DIR/logs`` and its pid under ``RUN_DIR/pids``. Processes run in their own
session so they outlive the command (or pytest run) that started them; a pid file also
records the executable, so a reused pid is never taken for ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.apiclient import http_get, tls_context
from testbed.console import fail
from testbed.layout import RUN_DIR
from testbed.records import write_json


@dataclass
class Component:
    """One process of the testbed: how to start it and how to tell it is healthy."""

    name: str
    argv: list[str]
    health_url: str
    tls: bool = False
    timeout: float = 60
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return RUN_DIR / "logs" / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return RUN_DIR / "pids" / f"{self.name}.pid"

    def healthy(self) -> tuple[bool, str]:
        try:
            ctx = tls_context() if self.tls else None
            body = http_get(self.health_url, ctx=ctx)
        except (OSError, ValueError) as error:  # URLError, HTTPError, ssl errors, refused
            return False, str(getattr(error, "reason", error))
        if self.name == "etcd":
            return ('"health":"true"' in body.replace(" ", "")), body.strip()
        return body.strip() == "ok", body.strip()[:200]


def read_pid(component: Component) -> int | None:
    """The recorded pid, if that process is still ours (guards against pid reuse)."""
    try:
        record = json.loads(component.pid_file.read_text())
        pid = int(record["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError):
        return None
    if not cmdline or cmdline[0].decode(errors="replace") != record.get("exe"):
        return None
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return None
    return pid


def start(component: Component) -> subprocess.Popen[bytes]:
    for directory in (component.log_file.parent, component.pid_file.parent):
        directory.mkdir(parents=True, exist_ok=True)
    with component.log_file.open("ab") as out:
        proc = subprocess.Popen(
            component.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=RUN_DIR,
            env={**os.environ, **component.env},
            start_new_session=True,  # outlives this script and the pytest run that started it
        )
    write_json(component.pid_file, {"pid": proc.pid, "exe": component.argv[0]})
    return proc


def wait_healthy(component: Component, proc: subprocess.Popen[bytes]) -> None:
    limit = time.monotonic() + component.timeout
    reason = ""
    while time.monotonic() < limit:
        if proc.poll() is not None:
            raise fail(
                f"{component.name} exited during start-up (exit {proc.returncode})",
                log_file=component.log_file,
            )
        ok, reason = component.healthy()
        if ok:
            return
        time.sleep(0.2)
    raise fail(
        f"{component.name} did not become healthy within {component.timeout:.0f}s "
        f"(last answer: {reason})",
        log_file=component.log_file,
    )


def start_healthy(component: Component) -> None:
    """Start ``component`` and return once it answers healthy (or exit naming its log)."""
    wait_healthy(component, start(component))


def stop(component: Component, *, grace: float = 10) -> None:
    pid = read_pid(component)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        limit = time.monotonic() + grace
        while time.monotonic() < limit and read_pid(component) is not None:
            time.sleep(0.1)
        if read_pid(component) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    component.pid_file.unlink(missing_ok=True)


def health_report(components: list[Component]) -> list[tuple[str, bool, str]]:
    """(name, healthy, detail) of each component; one not running is "not running"."""
    report = []
    for component in components:
        if read_pid(component) is None:
            report.append((component.name, False, "not running"))
            continue
        ok, detail = component.healthy()
        report.append((component.name, ok, "healthy" if ok else f"unhealthy: {detail}"))
    return report
