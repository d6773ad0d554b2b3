"""The vantage6 4.x algorithm container contract: the environment a run's container gets.

An algorithm written with ``vantage6-algorithm-tools`` 4.x reads its input, output and token
files, the proxy address and its databases from environment variables, exactly as the
vantage6 4.x node sets them:

* ``INPUT_FILE``, ``OUTPUT_FILE``, ``TOKEN_FILE``, ``TEMPORARY_FOLDER`` — paths in the container;
* ``HOST``, ``PORT``, ``API_PATH`` — the node proxy (``AlgorithmClient`` joins them);
* ``USER_REQUESTED_DATABASE_LABELS``, ``DB_LABELS``, ``<LABEL>_DATABASE_URI``,
  ``<LABEL>_DATABASE_TYPE``, and ``<LABEL>_QUERY``/``_SHEET_NAME``/``_PREPROCESSING`` from the
  task's database parameters;
* ``<LABEL>_DB_PARAM_<KEY>`` from a database's ``env`` in the node configuration — only for
  the databases the task asked for (the 4.x node gives every run all of them, passwords
  included; its documentation says only those asked for, and that is what fednode does);
* the node's ``algorithm_env``, which may not name any of the variables above
  (:func:`is_contract_name`; the configuration refuses it).

Like the 4.x node, values are base32-encoded with ``=`` written as ``!``, which keeps
special characters from being interpreted on their way into the container; the algorithm
tools decode every variable and leave undecodable ones (``PATH``, ``TRACEPARENT``) as they
are. The W3C trace context is passed plainly as ``TRACEPARENT``/``TRACESTATE``
(OpenTelemetry's environment-carrier convention).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any

from executors.spec import (
    CONTAINER_SCRATCH_DIR,
    CONTAINER_TASK_DIR,
    INPUT_FILE_NAME,
    OUTPUT_FILE_NAME,
    TOKEN_FILE_NAME,
    DatabaseMount,
    ProxyEndpoint,
)

DATABASE_PARAMETERS = ("query", "sheet_name", "preprocessing")
#: The variables every run gets, whatever its databases.
FIXED_NAMES = frozenset(
    {
        "INPUT_FILE",
        "OUTPUT_FILE",
        "TOKEN_FILE",
        "TEMPORARY_FOLDER",
        "HOST",
        "PORT",
        "API_PATH",
        "USER_REQUESTED_DATABASE_LABELS",
        "DB_LABELS",
        "TRACEPARENT",
        "TRACESTATE",
    }
)
DB_PARAM_INFIX = "_DB_PARAM_"


def is_contract_name(name: str, labels: Iterable[str]) -> bool:
    """Whether the contract sets ``name`` for some run of a node with these database labels."""
    if name in FIXED_NAMES or DB_PARAM_INFIX in name:
        return True
    if name.endswith(("_DATABASE_URI", "_DATABASE_TYPE")):
        return True
    return any(
        name == f"{label.upper()}_{parameter.upper()}"
        for label in labels
        for parameter in DATABASE_PARAMETERS
    )


def encode_value(value: str) -> str:
    """vantage6's env encoding: base32 of the UTF-8 bytes, ``=`` padding written as ``!``."""
    return base64.b32encode(value.encode("utf-8")).decode("ascii").replace("=", "!")


def decode_value(value: str) -> str:
    """The inverse of :func:`encode_value` (as ``vantage6-algorithm-tools`` does it)."""
    return base64.b32decode(value.replace("!", "=").encode("ascii")).decode("utf-8")


def container_environment(
    *,
    databases: Iterable[DatabaseMount],
    requested: Iterable[Mapping[str, Any]],
    proxy: ProxyEndpoint | None,
    trace_context: Mapping[str, str] | None = None,
    database_env: Mapping[str, Mapping[str, str]] | None = None,
    algorithm_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The complete environment of one run's container.

    ``databases`` are all the node's databases (every one is described, as vantage6 does);
    ``requested`` are the task's ``databases`` entries (``label`` and optional JSON
    ``parameters``), in the order the user gave them. ``database_env`` holds each
    database's ``env`` by label, ``algorithm_env`` the node's extra variables; where one
    of those names a contract variable the contract's value wins.
    """
    plain: dict[str, str] = dict(algorithm_env or {})
    plain |= {
        "INPUT_FILE": f"{CONTAINER_TASK_DIR}/{INPUT_FILE_NAME}",
        "OUTPUT_FILE": f"{CONTAINER_TASK_DIR}/{OUTPUT_FILE_NAME}",
        "TOKEN_FILE": f"{CONTAINER_TASK_DIR}/{TOKEN_FILE_NAME}",
        "TEMPORARY_FOLDER": CONTAINER_SCRATCH_DIR,
        "HOST": f"http://{_url_host(proxy.host)}" if proxy else "http://localhost",
        "PORT": str(proxy.port) if proxy else "0",
        "API_PATH": "",
    }
    labels: list[str] = []
    for entry in requested:
        label = str(entry.get("label", ""))
        labels.append(label)
        for key, value in _parameters(entry.get("parameters")).items():
            if key in DATABASE_PARAMETERS:
                text = json.dumps(value) if key == "preprocessing" else str(value)
                plain[f"{label.upper()}_{key.upper()}"] = text
    plain["USER_REQUESTED_DATABASE_LABELS"] = ",".join(labels)
    for label in dict.fromkeys(labels):  # each asked-for database once, in the task's order
        for key, value in (database_env or {}).get(label, {}).items():
            plain[f"{label.upper()}{DB_PARAM_INFIX}{key.upper()}"] = value
    node_labels = []
    for db in databases:
        plain[f"{db.label.upper()}_DATABASE_URI"] = db.container_uri
        plain[f"{db.label.upper()}_DATABASE_TYPE"] = db.type
        node_labels.append(db.label)
    plain["DB_LABELS"] = ",".join(node_labels)

    environment = {key: encode_value(value) for key, value in plain.items()}
    for key in ("traceparent", "tracestate"):
        if trace_context and key in trace_context:
            environment[key.upper()] = trace_context[key]
    return environment


def _parameters(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str) and raw.strip():
        try:
            parsed = json.loads(raw)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address (an IPv6 cluster's ClusterIP) in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
