"""The two places where the proxy looks inside a body: subtask input and results.

Both follow vantage6-node 4.15.2's proxy (``vantage6/node/proxy_server.py``) so that
``vantage6-algorithm-tools`` algorithms work unchanged:

* ``POST /task``: the ``AlgorithmClient`` sends each organization's ``input`` as base64 of
  the serialized input. In an encrypted collaboration the proxy base64-decodes it and
  replaces it with the input encrypted for that organization. Unencrypted, the body goes to
  the server as it came (it is only checked to be JSON with ``organizations``, which the
  v4 proxy also requires).
* ``GET /result``, ``/result/<id>``, ``/run``, ``/run/<id>``: each ``result`` (unless it
  lives in blob storage) was encrypted for this node's organization — the subtask's
  initiator — and is handed back as base64 of the plain bytes, which is what the client
  decodes. A result that cannot be decrypted is passed on unchanged with a warning, as
  the v4 proxy does. Inputs are never decrypted (they are for the organization that
  runs them). Unencrypted, decrypting is base64 in and out, so nothing is touched.

Unlike the v4 proxy, fednode's decrypts only results of the calling run's own subtasks:
:class:`ResultsBody` names the task of every result it would decrypt (``task.id`` of
each record), and the handler refuses the answer unless all of them are the run's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

from common.logging import get_logger
from proxy.errors import ProxyError
from proxy.protocols import ProxyCrypto, ProxyCryptoError

log = get_logger(__name__)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProxyError(400, f"the request body is not valid JSON: {exc}") from None


def task_organizations(body: Any, *, limit: int) -> list[dict[str, Any]]:
    """The ``organizations`` of a task-creation body, checked enough to be encrypted."""
    if not isinstance(body, dict):
        raise ProxyError(400, "the request body must be a JSON object")
    organizations = body.get("organizations")
    if not isinstance(organizations, list) or not organizations:
        raise ProxyError(400, "Organizations missing from input")
    if len(organizations) > limit:
        raise ProxyError(
            400,
            f"a subtask may name at most {limit} organizations "
            f"(proxy.max_task_organizations); this one names {len(organizations)}",
        )
    for index, org in enumerate(organizations):
        if not isinstance(org, dict) or type(org.get("id")) is not int:
            raise ProxyError(400, f"organizations[{index}] must be an object with an integer id")
    return organizations


async def encrypt_inputs(organizations: list[dict[str, Any]], crypto: ProxyCrypto) -> None:
    """Replace each organization's base64 ``input`` with the input encrypted for it."""

    async def one(index: int, org: dict[str, Any]) -> None:
        text = org.get("input")
        if not isinstance(text, str):
            raise ProxyError(400, f"organizations[{index}].input must be a base64 string")
        try:
            plain = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ProxyError(
                400,
                f"organizations[{index}].input is not base64 (blob-store inputs are not "
                "supported through this proxy)",
            ) from None
        try:
            org["input"] = await crypto.encrypt_for(org["id"], plain)
        except ProxyCryptoError as exc:
            raise ProxyError(
                400, f"cannot encrypt the input for organization {org['id']}: {exc}"
            ) from None

    await asyncio.gather(*(one(i, org) for i, org in enumerate(organizations)))


class ResultsBody:
    """A run/result answer of the server (one record or a ``{"data": [...]}`` page), parsed,
    with the records whose ``result`` the proxy would decrypt."""

    __slots__ = ("body", "records")

    def __init__(self, body: Any, records: list[dict[str, Any]]) -> None:
        self.body = body
        self.records = records

    @property
    def task_ids(self) -> set[int | None]:
        """The task of each result to decrypt (``None``: a record that names none)."""
        return {_task_id(record) for record in self.records}


def parse_results(raw: bytes) -> ResultsBody | None:
    """``None`` when there is nothing to decrypt (not JSON, no results)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    records = body.get("data") if isinstance(body, dict) and "data" in body else [body]
    if not isinstance(records, list):
        return None
    wanted = [r for r in records if isinstance(r, dict) and _encrypted_result(r) is not None]
    return ResultsBody(body, wanted) if wanted else None


def decrypt_results(parsed: ResultsBody, crypto: ProxyCrypto) -> bytes:
    """The answer with each result decrypted; CPU work: call it in a worker thread."""
    for record in parsed.records:
        _decrypt_record(record, crypto)
    return json.dumps(parsed.body).encode()


def _encrypted_result(record: dict[str, Any]) -> str | None:
    result = record.get("result")
    if not result or not isinstance(result, str) or record.get("blob_storage_used"):
        return None
    return result


def _task_id(record: dict[str, Any]) -> int | None:
    task = record.get("task")
    task_id = task.get("id") if isinstance(task, dict) else None
    return task_id if type(task_id) is int else None


def _decrypt_record(record: dict[str, Any], crypto: ProxyCrypto) -> None:
    result = _encrypted_result(record)
    if result is None:
        return
    try:
        plain = crypto.decrypt(result)
    except Exception as exc:  # the algorithm gets it as it is, like the v4 proxy does
        log.warning("proxy.result_not_decrypted", record_id=record.get("id"), error=str(exc))
        return
    record["result"] = base64.b64encode(plain).decode("ascii")
