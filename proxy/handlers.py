"""The handlers: small, one per kind of allowed call (see ``proxy.routes``).

By the time a handler runs, the guard (``proxy.middlewares.door``) has authenticated the
container token and checked the method and path. The token goes on to the server unchanged, as the
algorithm's own credential: the server decides what that container may see or create.

What the proxy adds with the node's own key — decrypting results — is narrower than what
the token may see: only results of the run's own subtasks. The run table remembers the
tasks each run created (from the server's answers to its ``POST /task``); a task it does
not know (the node restarted, say) is looked up once with the run's token, and counts as
the run's when the server names the run's task as its ``parent``. Parsing, encrypting and
decrypting bodies share ``max_body_work`` permits, and large JSON is handled in a worker
thread, so no body stalls the event loop or multiplies memory without bound.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from common.logging import get_logger
from proxy.context import CONTEXT, CREATED_TASK, RUN, TOKEN, UPSTREAM_MS, ProxyContext
from proxy.errors import ProxyError
from proxy.http1 import Answer, UpstreamError
from proxy.payloads import (
    decrypt_results,
    encrypt_inputs,
    parse_json,
    parse_results,
    task_organizations,
)
from proxy.upstream import relayed_headers

log = get_logger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")
#: Bodies larger than this are parsed and serialized in a worker thread.
_THREAD_AT = 256 * 1024
#: Tasks a single results answer may name that the proxy does not know yet.
_MAX_TASK_LOOKUPS = 16


async def healthz(request: web.Request) -> web.Response:
    """Liveness of the proxy itself (no token; says nothing about the server)."""
    return web.json_response({"status": "ok"})


async def forward(request: web.Request) -> web.StreamResponse:
    """A read the proxy does not look into: the server's answer, status and body as is."""
    context = request.app[CONTEXT]
    started = time.perf_counter()
    async with context.upstream.exchange(
        "GET", request.raw_path, headers=_upstream_headers(request)
    ) as upstream:
        length = upstream.length
        if length is not None and length > context.limits.max_response_bytes:
            raise context.upstream.too_large(length)
        if length is not None and length <= context.limits.stream_threshold:
            body = await context.upstream.read(upstream)
            request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
            return web.Response(
                status=upstream.status, body=body, headers=relayed_headers(upstream.headers)
            )
        request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
        return await _stream(request, upstream)


async def peer_addresses(request: web.Request) -> web.StreamResponse:
    """``GET /vpn/algorithm/addresses``: the server's answer, each address pointed at a
    forwarder of the node's (docs/networking.md); as is when peering is off."""
    context = request.app[CONTEXT]
    if context.peers is None:
        return await forward(request)
    started = time.perf_counter()
    reply = await context.upstream.call("GET", request.raw_path, headers=_upstream_headers(request))
    request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
    if reply.status != 200:
        return reply.response()
    try:
        body = json.loads(reply.body)
        addresses = body["addresses"]
        if not isinstance(addresses, list):
            raise TypeError("addresses is not a list")
    except (ValueError, KeyError, TypeError):
        raise ProxyError(502, "the server's address list is malformed") from None
    rewritten = await context.peers.rewrite(request[RUN].run_id, addresses)
    return web.json_response({**body, "addresses": rewritten})


async def create_task(request: web.Request) -> web.Response:
    """``POST /task``: a subtask; its input encrypted per organization when required."""
    context = request.app[CONTEXT]
    raw = await request.read()
    async with context.body_work:
        body = await _in_thread_if_large(len(raw), parse_json, raw)
        organizations = task_organizations(body, limit=context.limits.max_task_organizations)
        if context.crypto.encrypted:
            await encrypt_inputs(organizations, context.crypto)
            raw = await _in_thread_if_large(len(raw), _dump, body)
    started = time.perf_counter()
    reply = await context.upstream.call(
        "POST",
        "/task",
        headers=_upstream_headers(request, content_type="application/json"),
        body=raw,
    )
    request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
    if reply.status < 300:
        task_id = _created_task_id(reply.body)
        if task_id is not None:
            context.runs.note_subtask(request[TOKEN], task_id)
            request[CREATED_TASK] = task_id
    return reply.response()


async def read_results(request: web.Request) -> web.Response:
    """``GET /result[/<id>]``, ``/run[/<id>]``: results of the run's own subtasks decrypted
    for the algorithm; an answer with any other task's result is refused (403)."""
    context = request.app[CONTEXT]
    started = time.perf_counter()
    reply = await context.upstream.call("GET", request.raw_path, headers=_upstream_headers(request))
    request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
    if reply.status != 200 or not context.crypto.encrypted:
        return reply.response()
    async with context.body_work:
        parsed = await asyncio.to_thread(parse_results, reply.body)
    if parsed is None:
        return reply.response()
    await _require_own_tasks(request, context, parsed.task_ids)
    async with context.body_work:
        body = await asyncio.to_thread(decrypt_results, parsed, context.crypto)
    return reply.response(body)


async def _require_own_tasks(
    request: web.Request, context: ProxyContext, task_ids: set[int | None]
) -> None:
    run, token = request[RUN], request[TOKEN]
    unknown = {t for t in task_ids if t is None or not context.runs.owns_subtask(token, t)}
    if not unknown:
        return
    if None in unknown:
        raise ProxyError(403, "the answer holds a result that names no task; not decrypted")
    if len(unknown) > _MAX_TASK_LOOKUPS:
        raise ProxyError(
            403,
            f"the answer holds results of {len(unknown)} tasks; ask for one subtask's "
            "results at a time (result?task_id=<id>)",
        )
    ids = sorted(t for t in unknown if t is not None)
    checked = await asyncio.gather(*(_is_own(request, context, t) for t in ids))
    foreign = [t for t, own in zip(ids, checked, strict=True) if not own]
    if foreign:
        raise ProxyError(
            403,
            f"results of task(s) {', '.join(map(str, foreign))} are not decrypted for run "
            f"{run.run_id}: the proxy decrypts only the results of subtasks this run created",
        )


async def _is_own(request: web.Request, context: ProxyContext, task_id: int) -> bool:
    """Ask the server whether ``task_id`` is a subtask of the run's task (its parent)."""
    reply = await context.upstream.call(
        "GET", f"/task/{task_id}", headers=_upstream_headers(request)
    )
    if reply.status != 200:
        return False
    try:
        task = json.loads(reply.body)
    except ValueError:
        return False
    parent = task.get("parent") if isinstance(task, dict) else None
    own = isinstance(parent, dict) and parent.get("id") == request[RUN].task_id
    if own:
        context.runs.note_subtask(request[TOKEN], task_id)
    return own


def _created_task_id(raw: bytes) -> int | None:
    try:
        task = json.loads(raw)
    except ValueError:
        return None
    task_id = task.get("id") if isinstance(task, dict) else None
    return task_id if type(task_id) is int else None


def _dump(body: Any) -> bytes:
    return json.dumps(body).encode()


async def _in_thread_if_large(size: int, work: Callable[[_T], _R], arg: _T) -> _R:
    if size > _THREAD_AT:
        return await asyncio.to_thread(work, arg)
    return work(arg)


async def blob_storage(request: web.Request) -> web.Response:
    """Blob-store streams would need chunked encryption; refused clearly instead."""
    raise ProxyError(
        501,
        "blob storage is not supported through fednode's proxy; configure the server "
        "without a blob store (results and inputs then travel inline)",
    )


def _upstream_headers(request: web.Request, *, content_type: str | None = None) -> dict[str, str]:
    headers = {"Authorization": request.headers["Authorization"]}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


async def _stream(request: web.Request, upstream: Answer) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, headers=relayed_headers(upstream.headers))
    if upstream.length is not None:
        response.content_length = upstream.length
    limit = request.app[CONTEXT].limits.max_response_bytes
    await response.prepare(request)
    try:
        async for chunk in upstream.chunks(limit):
            await response.write(chunk)
    except UpstreamError as exc:
        # The status line is gone already: cut the connection so the algorithm sees a
        # truncated answer, never a complete-looking one.
        log.warning("proxy.stream_broken", path=request.path, error=repr(exc))
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
