"""What can an algorithm container see and do? A probe run under the vantage6 4.x contract.

It reads its input from ``INPUT_FILE`` and writes one JSON object to ``OUTPUT_FILE``, as any
vantage6 algorithm does, so the node runs it like any other task. It needs nothing but the
Python standard library and works with no network at all.

Input (JSON): either vantage6 4.x style ``{"method": "diagnose", "kwargs": {...}}`` or the
kwargs object itself; all keys are optional:

- ``targets``: ``["host:port", ...]`` outside addresses to try TCP connects to
  (default: a few well-known public resolvers, by IP, so no DNS is needed);
- ``dns_name``: a name to resolve (default ``deb.debian.org``);
- ``timeout``: seconds per network attempt (default 2).

Output keys: ``internet`` (any target reachable, and each attempt), ``proxy`` (the node
proxy at ``HOST``:``PORT``: TCP connect and ``GET /healthz``), ``dns``, ``root_fs``
(read-only flag of ``/`` and write attempts), ``identity`` (uid, gid, groups, effective
capabilities, no_new_privs, seccomp), ``scratch`` (whether the scratch dir is writable),
``network_interfaces`` and ``env`` (the vantage6 variables, decoded).

Like the vantage6 4.x node, a node may base32-encode the environment values (``=``
written as ``!``); they are decoded the way ``vantage6.algorithm.tools.util.get_env_var``
does, falling back to the raw value.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_TARGETS = ["1.1.1.1:443", "8.8.8.8:53", "9.9.9.9:443"]
DEFAULT_DNS_NAME = "deb.debian.org"
DEFAULT_TIMEOUT = 2.0
CONTRACT_VARS = [
    "INPUT_FILE",
    "OUTPUT_FILE",
    "TOKEN_FILE",
    "TEMPORARY_FOLDER",
    "HOST",
    "PORT",
    "API_PATH",
    "USER_REQUESTED_DATABASE_LABELS",
    "DB_LABELS",
]


def env(name: str, default: str | None = None) -> str | None:
    """An environment value, base32-decoded when the node encoded it."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return base64.b32decode(raw.replace("!", "=").encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        return raw


def with_timeout(fn: Any, timeout: float) -> tuple[Any, str | None]:
    """Run ``fn()`` in a daemon thread; (result, error) with error "timeout" if it hangs."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:  # reported, not raised: this is a probe
            box["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, "timeout"
    return box.get("result"), box.get("error")


def tcp_connect(host: str, port: int, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            error = None
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {
        "target": f"{host}:{port}",
        "reachable": error is None,
        "error": error,
        "seconds": round(time.monotonic() - started, 3),
    }


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def check_internet(targets: list[str], timeout: float) -> dict[str, Any]:
    attempts = [tcp_connect(*split_target(t), timeout) for t in targets]
    return {"reachable": any(a["reachable"] for a in attempts), "attempts": attempts}


def check_dns(name: str, timeout: float) -> dict[str, Any]:
    result, error = with_timeout(
        lambda: sorted({info[4][0] for info in socket.getaddrinfo(name, None)}), timeout
    )
    return {
        "name": name,
        "resolves": error is None and bool(result),
        "addresses": result,
        "error": error,
    }


def check_proxy(timeout: float) -> dict[str, Any]:
    host, port, api_path = env("HOST"), env("PORT"), env("API_PATH", "")
    if not host or not port:
        return {"configured": False, "reachable": False}
    parsed = urllib.parse.urlsplit(host if "://" in host else f"http://{host}")
    hostname = parsed.hostname or ""
    out: dict[str, Any] = {"configured": True, "url": f"{host}:{port}{api_path}"}
    out["tcp"] = tcp_connect(hostname, int(port), timeout)
    url = f"{parsed.scheme}://{hostname}:{port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP_PROXY
    try:
        with opener.open(url, timeout=timeout) as response:
            out["healthz"] = {"url": url, "status": response.status}
    except urllib.error.HTTPError as exc:
        out["healthz"] = {"url": url, "status": exc.code}
    except (OSError, ValueError) as exc:
        out["healthz"] = {"url": url, "status": None, "error": f"{type(exc).__name__}: {exc}"}
    out["reachable"] = out["tcp"]["reachable"]
    return out


def try_write(directory: str) -> dict[str, Any]:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".diagnostics-"):
            pass
        return {"path": directory, "writable": True, "error": None}
    except OSError as exc:
        return {"path": directory, "writable": False, "error": f"{type(exc).__name__}: {exc}"}


def check_root_fs() -> dict[str, Any]:
    """Is ``/`` mounted read-only, and can this user write anywhere on it?

    Only directories on the root mount itself count: podman's ``--read-only`` still puts
    writable tmpfs mounts on /tmp, /var/tmp and /run.
    """
    root_dev = Path("/").stat().st_dev
    on_root = [
        d
        for d in ("/", "/etc", "/opt", "/usr/local", "/var")
        if Path(d).is_dir() and Path(d).stat().st_dev == root_dev
    ]
    attempts = [try_write(d) for d in on_root]
    return {
        "read_only": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
        "writable": any(a["writable"] for a in attempts),
        "attempts": attempts,
    }


def proc_status() -> dict[str, str]:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def check_identity() -> dict[str, Any]:
    status = proc_status()
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "euid": os.geteuid(),
        "groups": os.getgroups(),
        "root": os.geteuid() == 0,
        "cap_eff": status.get("CapEff"),
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "seccomp": status.get("Seccomp"),
    }


def check_scratch() -> dict[str, Any]:
    directory = env("TEMPORARY_FOLDER") or tempfile.gettempdir()
    return try_write(directory)


def load_kwargs(path: str | None) -> dict[str, Any]:
    if not path or not Path(path).is_file():
        return {}
    text = Path(path).read_text().strip()
    data = json.loads(text) if text else {}
    if isinstance(data, dict) and "kwargs" in data:
        data = data["kwargs"] or {}
    if not isinstance(data, dict):
        raise ValueError("the input must be a JSON object")
    return data


def diagnose(kwargs: dict[str, Any]) -> dict[str, Any]:
    timeout = float(kwargs.get("timeout", DEFAULT_TIMEOUT))
    return {
        "internet": check_internet(list(kwargs.get("targets", DEFAULT_TARGETS)), timeout),
        "proxy": check_proxy(timeout),
        "dns": check_dns(str(kwargs.get("dns_name", DEFAULT_DNS_NAME)), timeout),
        "root_fs": check_root_fs(),
        "identity": check_identity(),
        "scratch": check_scratch(),
        "network_interfaces": sorted(name for _, name in socket.if_nameindex()),
        "env": {name: env(name) for name in CONTRACT_VARS if name in os.environ},
    }


def main() -> int:
    try:
        kwargs = load_kwargs(env("INPUT_FILE"))
    except (OSError, ValueError) as exc:
        print(f"error > cannot read the input: {exc}", file=sys.stderr)
        return 1
    report = diagnose(kwargs)
    text = json.dumps(report, indent=2)
    print(text)
    output_file = env("OUTPUT_FILE")
    if output_file:
        Path(output_file).write_text(text)
    return 0


if __name__ == "__main__":
    # os._exit: a DNS lookup left hanging in its thread must not keep the container alive.
    sys.stdout.flush()
    code = main()
    sys.stdout.flush()
    os._exit(code)
