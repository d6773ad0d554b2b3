"""The handlers: small, one per kind of allowed call (see ``proxy.routes``).

By the time a handler runs, the guard middleware has authenticated the container token
and checked the method and path. The token goes on to the server unchanged, as the
algorithm's own credential: the server decides what that container may see or create.
"""

from __future__ import annotations

import json
import time

import aiohttp
import structlog
from aiohttp import web

from proxy.context import CONTEXT, UPSTREAM_MS
from proxy.errors import ProxyError
from proxy.payloads import decrypt_results, encrypt_inputs, parse_json, task_organizations
from proxy.upstream import relayed_headers

log = structlog.stdlib.get_logger(__name__)

_CHUNK = 64 * 1024


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
        length = upstream.content_length
        if length is not None and length <= context.limits.stream_threshold:
            body = await upstream.read()
            request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
            return web.Response(
                status=upstream.status, body=body, headers=relayed_headers(upstream.headers)
            )
        request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
        return await _stream(request, upstream)


async def create_task(request: web.Request) -> web.Response:
    """``POST /task``: a subtask; its input encrypted per organization when required."""
    context = request.app[CONTEXT]
    raw = await request.read()
    body = parse_json(raw)
    organizations = task_organizations(body)
    if context.crypto.encrypted:
        await encrypt_inputs(organizations, context.crypto)
        raw = json.dumps(body).encode()
    started = time.perf_counter()
    reply = await context.upstream.call(
        "POST",
        "/task",
        headers=_upstream_headers(request, content_type="application/json"),
        body=raw,
    )
    request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
    return reply.response()


async def read_results(request: web.Request) -> web.Response:
    """``GET /result[/<id>]``, ``/run[/<id>]``: results decrypted for the algorithm."""
    context = request.app[CONTEXT]
    started = time.perf_counter()
    reply = await context.upstream.call("GET", request.raw_path, headers=_upstream_headers(request))
    request[UPSTREAM_MS] = (time.perf_counter() - started) * 1e3
    if reply.status == 200 and context.crypto.encrypted:
        return reply.response(await decrypt_results(reply.body, context.crypto))
    return reply.response()


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


async def _stream(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, headers=relayed_headers(upstream.headers))
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            await response.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # The status line is gone already: cut the connection so the algorithm sees a
        # truncated answer, never a complete-looking one.
        log.warning("proxy.stream_broken", path=request.path, error=repr(exc))
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
