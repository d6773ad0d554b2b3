"""Building Go binaries into the testbed's cache: the toolchain, the targets, their stamps.

A ``Target`` is one binary and the key that says whether the cached copy is current: the
stamp file beside it holds ``"<name> <version> recipe=<RECIPE>"``. Changing a key (or the
stamp's path) makes every warm cache, CI's included, rebuild it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.console import fail, human, log
from testbed.layout import BIN_DIR, GO_CACHE, RECIPE, WRAPPER_DIR


def go_binary() -> str:
    found = os.environ.get("GO") or shutil.which("go")
    if found:
        return found
    if Path("/usr/local/go/bin/go").exists():
        return "/usr/local/go/bin/go"
    raise fail("no `go` found (set GO=/path/to/go or put it on PATH); Go >= 1.24 is needed")


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOTOOLCHAIN="local",  # a newer `go` line anywhere must fail, not download a toolchain
        GOMODCACHE=str(GO_CACHE / "mod"),
        GOCACHE=str(GO_CACHE / "build"),
        GOWORK="off",
        GOFLAGS="-buildvcs=false",
        CGO_ENABLED="0",  # the upstream configuration for the control plane (static binaries)
    )
    return env


@dataclass(frozen=True)
class Target:
    """One binary to build: how, and the key that says whether a cached copy is current."""

    name: str
    version: str
    args: tuple[str, ...]  # go sub-command and arguments, without the output flag
    install: bool = False  # `go install pkg@version` (kwok) instead of building in the wrapper
    wrapper: Path = WRAPPER_DIR  # the module it is built in (the real worker adds two more)

    @property
    def key(self) -> str:
        return f"{self.name} {self.version} recipe={RECIPE}"

    @property
    def stamp(self) -> Path:
        return BIN_DIR / f".{self.name}.stamp"

    def is_current(self) -> bool:
        binary = BIN_DIR / self.name
        return (
            binary.is_file()
            and os.access(binary, os.X_OK)
            and self.stamp.is_file()
            and self.stamp.read_text().strip() == self.key
        )


def run_logged(
    argv: Sequence[str], *, cwd: Path, env: dict[str, str], log_file: Path, what: str
) -> None:
    """Run a (long) go command into a log file, printing progress every 30 s."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_file.open("a") as out:
        out.write(f"\n$ (cd {cwd} && {' '.join(argv)})\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while True:
            try:
                code = proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                log(f"  ... {what}: {human(time.monotonic() - started)}")
    if code != 0:
        raise fail(f"{what} failed (exit {code})", log_file=log_file)
