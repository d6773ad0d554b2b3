"""Reads a network database through the URI the node hands it, and tries other addresses.

A vantage6 4.x file-contract algorithm: input (JSON) from ``INPUT_FILE``, one JSON object
to ``OUTPUT_FILE``. Input keys, all optional:

- ``label``: the database label to read (default: the first of
  ``USER_REQUESTED_DATABASE_LABELS``);
- ``query``: SQL to run (default ``<LABEL>_QUERY``, else ``select 1``);
- ``targets``: ``["host:port", ...]`` other addresses to try TCP connects to;
- ``timeout``: seconds per attempt (default 3).

Output: ``uri_host`` and ``uri_port`` (where the URI points; the password is never
written), ``rows`` (the query's rows) or ``error``, and ``attempts`` (one per target).
Environment values are base32-decoded the way ``vantage6-algorithm-tools`` does.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
import urllib.parse
from typing import Any

import pg8000.native


def env(name: str, default: str = "") -> str:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return base64.b32decode(raw.replace("!", "=").encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        return raw


def read(label: str, query: str, timeout: float) -> dict[str, Any]:
    uri = env(f"{label.upper()}_DATABASE_URI")
    parts = urllib.parse.urlsplit(uri)
    out: dict[str, Any] = {"label": label, "uri_host": parts.hostname, "uri_port": parts.port}
    try:
        connection = pg8000.native.Connection(
            user=urllib.parse.unquote(parts.username or ""),
            password=urllib.parse.unquote(parts.password or ""),
            host=parts.hostname or "",
            port=parts.port or 5432,
            database=parts.path.lstrip("/") or None,
            timeout=timeout,
        )
        try:
            out["rows"] = connection.run(query)
        finally:
            connection.close()
    except Exception as exc:  # reported, not raised: this is a probe
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def tcp_connect(target: str, timeout: float) -> dict[str, Any]:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            error = None
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"target": target, "reachable": error is None, "error": error}


def main() -> None:
    raw = open(env("INPUT_FILE"), "rb").read()
    try:
        given = json.loads(raw) if raw.strip() else {}
    except ValueError:
        given = {}
    kwargs = given.get("kwargs", given) if isinstance(given, dict) else {}
    requested = [x for x in env("USER_REQUESTED_DATABASE_LABELS").split(",") if x]
    label = kwargs.get("label") or (requested[0] if requested else "")
    timeout = float(kwargs.get("timeout", 3))
    query = kwargs.get("query") or env(f"{label.upper()}_QUERY") or "select 1"
    report = read(label, query, timeout) if label else {"error": "no database label"}
    report["attempts"] = [tcp_connect(t, timeout) for t in kwargs.get("targets", [])]
    with open(env("OUTPUT_FILE"), "w") as output:
        json.dump(report, output, default=str)


if __name__ == "__main__":
    main()
