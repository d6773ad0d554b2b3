#!/usr/bin/env python3
"""A FAKE ``apptainer`` executable for tests: apptainer cannot be installed on this machine.

It is not apptainer and isolates nothing. It stands in for the real CLI so the apptainer
executor can be tested end to end: it records every call, checks its arguments the way
apptainer 1.3 does (flag names, bind specifications, env files, network rules, image
references), and then behaves like a real run for everything the executor can observe:
output and log, exit codes, dying by SIGTERM/SIGKILL. The messages and exit codes of its
errors are apptainer's own (from apptainer's source: cobra's flag errors exit 1,
``sylog.Fatalf`` prints ``FATAL:   …`` and exits 255).

Its contract, through its own environment (the container's is separate, see ``--cleanenv``):

``FAKE_APPTAINER_CALLS``
    a file; each call appends one JSON line ``{"argv": [...], "pid", "euid", "cwd",
    "docker_username", "docker_password_set"}`` (the password itself is never written).
``FAKE_APPTAINER_REGISTRY``
    a JSON file ``{"<docker://|oras://|library:// reference>": {"program": "<name>"}}``:
    the images that "exist". Any other reference fails to pull with apptainer's message.
``FAKE_APPTAINER_VERSION``
    what ``--version`` reports (default ``1.3.4``).

Commands: ``version``/``--version``; ``pull [--force] <dest.sif> <reference>`` (writes a
fake SIF naming the program); ``run``/``exec [flags] <image> [args]`` where the image is a
fake SIF path or a registry reference. The "container" is a program of this file, run in
this process with the container's environment, seeing only bound paths:

``behave``
    the conformance suite's probe: reads the JSON of ``behaviour/behave.py`` from
    ``$INPUT_FILE`` (exit_code, sleep, allocate_mb, output, log, output_size,
    output_link) and does what it says; replacing a path that is itself a bind target
    fails as the kernel makes it fail (``EBUSY``), a path inside a bound folder works;
    one key of the fake's own, ``ignore_sigterm``, makes it outlive SIGTERM (SIGKILL only).
``probe-network``
    for the relay tests: GETs ``$HOST:$PORT/probe`` and tries the address in its input's
    ``outside`` key; writes what it reached, and the interfaces it sees, as JSON output.
``peer``
    for the peering tests, an algorithm of a peer-to-peer job: with ``{"listen": port}``
    it listens on ``0.0.0.0:port`` and answers the first connection that sends bytes
    with ``"B got: " + bytes``; with ``{"connect": port, "send": text}`` it connects to
    ``$HOST:port`` until a connection is answered (a peer that does not listen yet, or a
    forwarder not yet opened, closes it empty) or ``seconds`` (20) pass. Either writes
    what it got as JSON output.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

VERSION = os.environ.get("FAKE_APPTAINER_VERSION", "1.3.4")
SIF_MAGIC = b"FAKE-APPTAINER-SIF\n"
SCHEMES = ("docker://", "oras://", "library://")

GLOBAL_FLAGS = {"-q", "--quiet", "-s", "--silent", "-d", "--debug", "-v", "--verbose", "--nocolor"}
# apptainer 1.3 action flags (cmd/internal/cli/action_flags.go), by whether they take a value.
BOOL_FLAGS = {
    "allow-setuid",
    "boot",
    "cleanenv",
    "compat",
    "contain",
    "containall",
    "disable-cache",
    "fakeroot",
    "ignore-fakeroot-command",
    "ignore-subuid",
    "ignore-userns",
    "ipc",
    "keep-privs",
    "net",
    "no-eval",
    "no-home",
    "no-init",
    "no-nv",
    "no-pid",
    "no-privs",
    "no-rocm",
    "no-umask",
    "nv",
    "nvccli",
    "pid",
    "rocm",
    "sharens",
    "underlay",
    "unsquash",
    "userns",
    "uts",
    "writable",
    "writable-tmpfs",
    "compat32",
    "intel-hpu",
}
VALUE_FLAGS = {
    "add-caps",
    "app",
    "apply-cgroups",
    "authfile",
    "bind",
    "blkio-weight",
    "blkio-weight-device",
    "cdi-dirs",
    "containlibs",
    "cpu-shares",
    "cpus",
    "cpuset-cpus",
    "cpuset-mems",
    "cwd",
    "device",
    "dns",
    "drop-caps",
    "env",
    "env-file",
    "fusemount",
    "home",
    "hostname",
    "memory",
    "memory-reservation",
    "memory-swap",
    "mount",
    "netns-path",
    "network",
    "network-args",
    "no-env",
    "no-mount",
    "overlay",
    "pids-limit",
    "pwd",
    "runscript-timeout",
    "scratch",
    "security",
    "shell",
    "tmpdir",
    "workdir",
}
SHORT = {
    "C": "containall",
    "c": "contain",
    "e": "cleanenv",
    "n": "net",
    "u": "userns",
    "w": "writable",
    "p": "pid",
    "i": "ipc",
    "f": "fakeroot",
    "B": "bind",
    "H": "home",
    "o": "overlay",
    "S": "scratch",
    "W": "workdir",
    "s": "shell",
}
REPEATABLE = {"bind", "env", "env-file", "mount", "overlay", "scratch", "device", "fusemount"}
INTEGER_FLAGS = {"memory", "memory-swap", "pids-limit", "memory-reservation"}


def fatal(message: str) -> NoReturn:
    """apptainer's ``sylog.Fatalf``: ``FATAL:`` padded to 8 columns, then exit 255."""
    sys.stderr.write(f"{'FATAL:':<8} {message}\n")
    sys.stderr.flush()
    sys.exit(255)


def flag_error(command: str, message: str) -> NoReturn:
    """cobra's flag errors as apptainer prints them: exit code 1, not 255."""
    sys.stderr.write(f'Error for command "{command}": {message}\n\n')
    sys.stderr.write(f"Options for {command} command:\n\n  (the fake lists none)\n\n")
    sys.stderr.write("Run 'apptainer --help' for more detailed usage information.\n")
    sys.exit(1)


def record(argv: list[str]) -> None:
    path = os.environ.get("FAKE_APPTAINER_CALLS")
    if not path:
        return
    call = {
        "argv": argv,
        "pid": os.getpid(),
        "euid": os.geteuid(),
        "cwd": str(Path.cwd()),
        # Registry credentials reach apptainer in its environment: say whether they did.
        "docker_username": os.environ.get("APPTAINER_DOCKER_USERNAME"),
        "docker_password_set": "APPTAINER_DOCKER_PASSWORD" in os.environ,
    }
    line = json.dumps(call)
    with open(path, "a") as calls:  # noqa: PTH123 - one short append, like a shell's >>
        calls.write(line + "\n")


def registry() -> dict[str, Any]:
    path = os.environ.get("FAKE_APPTAINER_REGISTRY")
    if not path:
        return {}
    loaded = json.loads(Path(path).read_text())
    return loaded if isinstance(loaded, dict) else {}


def manifest_error(reference: str) -> str:
    """What apptainer's OCI client says about a reference the registry does not have."""
    name = reference.split("://", 1)[1]
    repository, _, tag = (
        name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    )
    return (
        f"failed to get checksum for {reference}: reading manifest {tag} in {repository}: "
        "manifest unknown: manifest unknown"
    )


# -- commands --------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    record(argv)
    args = list(argv)
    while args and args[0] in GLOBAL_FLAGS:
        args.pop(0)
    if not args:
        sys.stderr.write("Usage: apptainer [global options...] <command>\n")
        return 1
    if args[0] in ("--version", "version"):
        print(f"apptainer version {VERSION}")
        return 0
    command, rest = args[0], args[1:]
    if command == "pull":
        return pull(rest)
    if command in ("run", "exec"):
        return action(command, rest)
    sys.stderr.write(f'Error: unknown command "{command}" for "apptainer"\n')
    return 1


def pull(args: list[str]) -> int:
    force = False
    positional = []
    for arg in args:
        if arg in ("-F", "--force"):
            force = True
        elif arg in ("--disable-cache",):
            continue
        elif arg.startswith("-"):
            flag_error("pull", f"unknown flag: {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        flag_error("pull", f"accepts between 1 and 2 arg(s), received {len(positional)}")
    destination, reference = Path(positional[0]), positional[1]
    if not reference.startswith(SCHEMES):
        fatal(f"Unsupported transport type: {reference.split('://')[0]}")
    if destination.exists() and not force:
        fatal(f'Image file already exists: "{destination}" - will not overwrite')
    image = registry().get(reference)
    if image is None:
        verb = (
            "making image from oci registry"
            if reference.startswith("docker://")
            else (
                "pulling image from oci registry"
                if reference.startswith("oras://")
                else "pulling library image"
            )
        )
        fatal(f"While {verb}: {manifest_error(reference)}")
    header = json.dumps({"source": reference, "program": image.get("program", "behave")})
    destination.write_bytes(SIF_MAGIC + header.encode() + b"\n")
    return 0


class Options:
    """The parsed flags of ``run``/``exec``."""

    def __init__(self) -> None:
        self.bools: set[str] = set()
        self.values: dict[str, list[str]] = {}

    def value(self, name: str) -> str | None:
        found = self.values.get(name)
        return found[-1] if found else None


def parse_flags(command: str, args: list[str]) -> tuple[Options, list[str]]:
    """cobra with interspersed flags off: flags up to the first positional argument."""
    options = Options()
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            return options, args[index + 1 :]
        if not arg.startswith("-") or arg == "-":
            return options, args[index:]
        if arg.startswith("--"):
            name, has_value, inline = arg[2:].partition("=")
        else:
            short = arg[1:2]
            if short not in SHORT:
                flag_error(command, f"unknown shorthand flag: '{short}' in {arg}")
            name, inline = SHORT[short], arg[2:]
            has_value = "=" if inline else ""
        if name in BOOL_FLAGS:
            if has_value and inline not in ("true", "false"):
                flag_error(command, f'invalid argument "{inline}" for "--{name}" flag')
            if inline != "false":
                options.bools.add(name)
        elif name in VALUE_FLAGS:
            if not has_value:
                index += 1
                if index >= len(args):
                    flag_error(command, f"flag needs an argument: --{name}")
                inline = args[index]
            if name in INTEGER_FLAGS and not inline.lstrip("-").isdigit():
                flag_error(command, f'invalid argument "{inline}" for "--{name}" flag')
            if name in REPEATABLE:
                options.values.setdefault(name, []).extend(
                    inline.split(",") if name == "bind" else [inline]
                )
            else:
                options.values[name] = [inline]
        else:
            flag_error(command, f"unknown flag: --{name}")
        index += 1
    return options, []


class Binds:
    """The container's view of the host: bound paths only, read-only where asked."""

    def __init__(self, specs: list[str]) -> None:
        self.mounts: list[tuple[str, Path, bool]] = []
        for spec in specs:
            parts = spec.split(":")
            if len(parts) > 3 or not parts[0]:
                fatal(f"wrong bind specification {spec!r}")
            source = Path(parts[0])
            destination = parts[1] if len(parts) > 1 and parts[1] else parts[0]
            options = parts[2] if len(parts) > 2 else "rw"
            if options not in ("ro", "rw"):
                fatal(f"wrong bind option {options!r} in {spec!r}")
            if not source.exists():
                fatal(
                    f"container creation failed: mount hook function failure: mount "
                    f"{source}->{destination} error: while mounting {source}: mount source "
                    f"{source} doesn't exist"
                )
            self.mounts.append((destination.rstrip("/") or "/", source, options == "ro"))
        self.mounts.sort(key=lambda mount: len(mount[0]), reverse=True)

    def host(self, container_path: str, *, write: bool = False) -> Path:
        for destination, source, read_only in self.mounts:
            if container_path == destination or container_path.startswith(destination + "/"):
                if write and read_only:
                    raise OSError(30, "Read-only file system", container_path)
                return source / container_path[len(destination) :].lstrip("/")
        raise FileNotFoundError(2, "No such file or directory (not bound)", container_path)


def env_file(path: str) -> dict[str, str]:
    """apptainer shell-evaluates env files; the fake takes ``[export] NAME=VALUE`` lines."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        fatal(f"while processing {path}: could not read environment file {path!r}: {exc}")
    found: dict[str, str] = {}
    for words in (shlex.split(line, comments=True) for line in text.splitlines()):
        if not words:
            continue
        if words[0] == "export":
            words = words[1:]
        for word in words:
            name, equals, value = word.partition("=")
            if not equals:
                fatal(f"while processing {path}: unsupported line {word!r} (the fake)")
            found[name] = value
    return found


def open_image(reference: str) -> dict[str, Any]:
    if reference.startswith(SCHEMES):
        image = registry().get(reference)
        if image is None:
            fatal(f"Unable to handle {reference} uri: {manifest_error(reference)}")
        return dict(image)
    path = Path(reference)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        fatal(
            f"could not open image {path}: failed to retrieve path for {path}: "
            f"lstat {path}: no such file or directory"
        )
    if not data.startswith(SIF_MAGIC):
        fatal(f"could not open image {path}: image format not recognized")
    return dict(json.loads(data[len(SIF_MAGIC) :]))


def action(command: str, args: list[str]) -> int:
    options, positional = parse_flags(command, args)
    if not positional:
        flag_error(command, "requires at least 1 arg(s), only received 0")
    image = open_image(positional[0])
    network = options.value("network")
    if network is not None and network != "none" and os.geteuid() != 0:
        fatal(
            "container creation failed: network requires root or a suid installation with "
            "/etc/subuid --fakeroot; non-root users can only use --network=none unless "
            "permitted by the administrator"
        )
    binds = Binds(options.values.get("bind", []))
    environment: dict[str, str] = (
        {}
        if "cleanenv" in options.bools or "containall" in options.bools
        else {k: v for k, v in os.environ.items() if not k.startswith("FAKE_APPTAINER_")}
    )
    environment["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for path in options.values.get("env-file", []):
        environment.update(env_file(path))
    for pair in options.values.get("env", []):
        name, _, value = pair.partition("=")
        environment[name] = value
    program = PROGRAMS.get(str(image.get("program")))
    if program is None:
        fatal(f"the fake has no program {image.get('program')!r}")
    return program(Container(environment, binds))


# -- the "container" programs ----------------------------------------------------------------


class Container:
    def __init__(self, environment: dict[str, str], binds: Binds) -> None:
        self.environment = environment
        self.binds = binds

    def env(self, name: str) -> str:
        """vantage6's encoding, as the algorithm tools decode it."""
        value = self.environment[name]
        try:
            return base64.b32decode(value.replace("!", "=")).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return value

    def read(self, container_path: str) -> bytes:
        return self.binds.host(container_path).read_bytes()

    def write(self, container_path: str, data: bytes) -> None:
        self.binds.host(container_path, write=True).write_bytes(data)

    def truncate(self, container_path: str, size: int) -> None:
        os.truncate(self.binds.host(container_path, write=True), size)

    def replace_with_link(self, container_path: str, target: str) -> None:
        """``ln -sf target container_path``: a mount point cannot be unlinked (EBUSY)."""
        if any(container_path == destination for destination, _, _ in self.binds.mounts):
            raise OSError(16, "Device or resource busy", container_path)
        host = self.binds.host(container_path, write=True)
        host.unlink(missing_ok=True)
        host.symlink_to(target)


def behave(container: Container) -> int:
    raw = container.read(container.env("INPUT_FILE"))
    behaviour = json.loads(raw) if raw.strip() else {}
    if behaviour.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(behaviour.get("log", "behave: started"), flush=True)
    print("behave: on stderr", file=sys.stderr, flush=True)
    held = [b"\x01" * (1024 * 1024) for _ in range(int(behaviour.get("allocate_mb", 0)))]
    time.sleep(float(behaviour.get("sleep", 0)))
    output = container.env("OUTPUT_FILE")
    text = str(behaviour.get("output", ""))
    asked = behaviour.get("describe") or {}
    if asked:  # the variables only: the fake has no devices to show
        names = asked.get("env", [])
        text = json.dumps({"env": {name: container.environment.get(name) for name in names}})
    container.write(output, text.encode())
    del held
    if behaviour.get("output_size"):
        container.truncate(output, int(behaviour["output_size"]))
    if behaviour.get("output_link"):
        try:
            container.replace_with_link(output, str(behaviour["output_link"]))
        except OSError as error:
            print(f"behave: cannot replace the output with a link: {error}", flush=True)
            return 17
    return int(behaviour.get("exit_code", 0))


def probe_network(container: Container) -> int:
    raw = container.read(container.env("INPUT_FILE"))
    wanted = json.loads(raw) if raw.strip() else {}
    report: dict[str, Any] = {"interfaces": interfaces()}
    host = container.env("HOST").removeprefix("http://")
    port = int(container.env("PORT"))
    try:
        with socket.create_connection((host, port), timeout=5) as connection:
            connection.sendall(f"GET /probe HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        report["proxy"] = {"reached": True, "answer": answer.decode(errors="replace")}
    except OSError as exc:
        report["proxy"] = {"reached": False, "error": str(exc)}
    outside = wanted.get("outside")
    if outside:
        try:
            with socket.create_connection((outside[0], int(outside[1])), timeout=2):
                report["outside"] = {"reached": True}
        except OSError as exc:
            report["outside"] = {"reached": False, "error": str(exc)}
    container.write(container.env("OUTPUT_FILE"), json.dumps(report).encode())
    print("probe-network: done", flush=True)
    return 0


def peer(container: Container) -> int:
    raw = container.read(container.env("INPUT_FILE"))
    wanted = json.loads(raw) if raw.strip() else {}
    deadline = time.monotonic() + float(wanted.get("seconds", 20))
    report: dict[str, Any] = {}
    if "listen" in wanted:
        with socket.create_server(("0.0.0.0", int(wanted["listen"]))) as server:
            server.settimeout(max(0.1, deadline - time.monotonic()))
            while "received" not in report:
                connection, _ = server.accept()
                with connection:
                    data = connection.recv(65536)
                    if data:
                        connection.sendall(b"B got: " + data)
                        report["received"] = data.decode(errors="replace")
    else:
        host = container.env("HOST").removeprefix("http://")
        while "answer" not in report and time.monotonic() < deadline:
            try:
                with socket.create_connection((host, int(wanted["connect"])), timeout=5) as c:
                    c.sendall(str(wanted["send"]).encode())
                    c.shutdown(socket.SHUT_WR)
                    answer = b""
                    while chunk := c.recv(65536):
                        answer += chunk
                if answer:
                    report["answer"] = answer.decode(errors="replace")
            except OSError as exc:
                report["last_error"] = str(exc)
            time.sleep(0.2)
    container.write(container.env("OUTPUT_FILE"), json.dumps(report).encode())
    print(f"peer: done {sorted(report)}", flush=True)
    return 0


def interfaces() -> list[str]:
    """The network interfaces of this process's network namespace."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


PROGRAMS = {"behave": behave, "probe-network": probe_network, "peer": peer}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
