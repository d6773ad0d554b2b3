"""The cross-cutting concerns of every request, outermost first, in one middleware.

:func:`door` does the three below in one coroutine: as three aiohttp middlewares each
cost a coroutine and an await per request, a measurable share of the proxy's CPU.

``observe``
    One structured access-log line per request (run id, method, route, status, total and
    upstream milliseconds), one observation for the metrics (route, status, seconds) and,
    for an authenticated request, one span in the run's trace (its parent is the run's W3C
    context; a ``POST /task`` that created a task reports its span to the node, for the
    link from the subtask's runs). The span is recorded when the answer is known,
    with the request's real start time, so rejected and failed requests cost no more
    than successful ones.
``errors``
    Every failure becomes a vantage6-style JSON error (``{"msg": ...}``): the proxy's own
    :class:`~proxy.errors.ProxyError`, aiohttp's HTTP errors (413 from an oversized
    chunked body), and — logged with its traceback — anything unexpected (500).
``guard``
    The door. In order: a request target that is not a plain path (absolute URL, ``..``,
    ``.``, percent-encoding, backslashes, empty segments) → 400; a declared body over the
    limit → 413; no ``Authorization: Bearer`` token, or one no run holds → 401 (right after a
    node restart, an unknown token waits up to ``restore_wait`` until the node has
    registered its runs again, then 401, or 503 if it is still at it); a request on a
    connection beyond the run's ``max_connections_per_run`` → 429 and that connection is
    closed; the run has finished → 403; a method and path outside the allow-list
    (``proxy.routes``) → 403; more than ``max_requests_per_run`` of the run's requests in
    flight → 429. Only ``/healthz`` needs no token.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from functools import lru_cache

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.logging import get_logger
from proxy.context import CONTEXT, CREATED_TASK, RUN, TOKEN, UPSTREAM_MS, ProxyContext
from proxy.errors import ProxyError, error_response
from proxy.protocols import ProxyRun
from proxy.routes import PUBLIC_ROUTES

log = get_logger("proxy.access")

#: Every path an algorithm may call is made of these; anything else is malformed.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_-]+)+|/")
_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="fednode-proxy"'}
#: Runs with connections on record past which the record is swept of closed connections.
_SWEEP_AT = 256
_propagator = TraceContextTextMapPropagator()


@web.middleware
async def door(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``observe`` around ``errors`` around ``guard`` around the handler."""
    started_ns = time.time_ns()
    started = time.perf_counter()
    public = _is_public(request)
    status = 499  # the algorithm went away before an answer (nginx's convention)
    try:
        try:
            if public:
                _check_target(request)
                response = await handler(request)
            else:
                context = request.app[CONTEXT]
                token, run = _authenticate(request, context)
                if run is None and not context.runs.restored:
                    run = await _after_restore(context, token)
                run = _admit(request, context, token, run)
                try:
                    response = await handler(request)
                finally:
                    _done(context, run.run_id)
        except ProxyError as exc:
            response = exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(exc.status, exc.reason)
        except Exception:
            log.exception("proxy.internal_error", method=request.method, path=request.path)
            response = error_response(500, "internal error in the node's proxy; see the node's log")
        status = response.status
        return response
    finally:
        if not public:
            elapsed = time.perf_counter() - started
            route = _route_of(request)
            metrics = request.app[CONTEXT].metrics
            if metrics is not None:
                metrics.observe(route, status, elapsed)
            _record(request, route, status, started_ns, elapsed * 1e3)


def _record(
    request: web.Request, route: str, status: int, started_ns: int, duration_ms: float
) -> None:
    run = request.get(RUN)
    upstream_ms = request.get(UPSTREAM_MS)
    context = request.app[CONTEXT]
    if run is None:  # who knocked without a valid token
        context.access_log.info(
            "proxy.request",
            run_id=None,
            method=request.method,
            route=route,
            status=status,
            duration_ms=round(duration_ms, 3),
            peer=request.remote,
        )
        return
    context.access_log.info(
        "proxy.request",
        run_id=run.run_id,
        task_id=run.task_id,
        method=request.method,
        route=route,
        status=status,
        duration_ms=round(duration_ms, 3),
        upstream_ms=None if upstream_ms is None else round(upstream_ms, 3),
    )
    tracer = context.tracer
    if tracer is None:
        return
    attributes: dict[str, str | int | float] = {
        "http.request.method": request.method,
        "http.route": route,
        "http.response.status_code": status,
        "fednode.run_id": run.run_id,
        "fednode.task_id": run.task_id,
    }
    if upstream_ms is not None:
        attributes["fednode.proxy.upstream_ms"] = upstream_ms
    span = tracer.start_span(
        f"proxy {request.method} {route}",
        context=_parent_context(run.trace_context),
        kind=SpanKind.SERVER,
        attributes=attributes,
        start_time=started_ns,
    )
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    created = request.get(CREATED_TASK)
    if created is not None and context.task_creations is not None:
        context.task_creations.task_created(created, span.get_span_context())


def _parent_context(carrier: Mapping[str, str]) -> Context | None:
    traceparent = carrier.get("traceparent")
    if not traceparent:
        return None
    return _extract(traceparent, carrier.get("tracestate", ""))


@lru_cache(maxsize=4096)
def _extract(traceparent: str, tracestate: str) -> Context:
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _propagator.extract(carrier)


def _is_public(request: web.Request) -> bool:
    info = request.match_info
    return info.http_exception is None and info.route.name in PUBLIC_ROUTES


def _route_of(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None:
        return "(not allowed)"
    return info.route.resource.canonical if info.route.resource is not None else "(none)"


def _check_target(request: web.Request) -> None:
    target = request.raw_path
    if not target.startswith("/"):
        raise ProxyError(400, "absolute-form request targets are not accepted")
    if _PLAIN_PATH.fullmatch(target.partition("?")[0]) is None:
        raise ProxyError(400, "malformed path: only plain /segment/segment paths are accepted")


def _authenticate(request: web.Request, context: ProxyContext) -> tuple[str, ProxyRun | None]:
    """The guard up to the token: its run, or None for a token not known (yet)."""
    _check_target(request)
    length = request.content_length
    if length is not None and length > context.limits.max_body_bytes:
        raise ProxyError(
            413, f"request body over the limit of {context.limits.max_body_bytes} bytes"
        )
    token = _bearer(request.headers.get("Authorization"))
    if token is None:
        raise ProxyError(401, "missing bearer token", headers=_WWW_AUTHENTICATE)
    return token, context.runs.lookup(token)


async def _after_restore(context: ProxyContext, token: str) -> ProxyRun | None:
    """The node has just restarted and is still registering the runs that kept going:
    hold the request for a moment rather than refuse a token it is about to know."""
    try:
        async with asyncio.timeout(context.limits.restore_wait):
            await context.runs.wait_restored()
    except TimeoutError:
        raise ProxyError(
            503, "the node is restarting; try again shortly", headers={"Retry-After": "2"}
        ) from None
    return context.runs.lookup(token)


def _admit(
    request: web.Request, context: ProxyContext, token: str, run: ProxyRun | None
) -> ProxyRun:
    """The rest of the guard; counts the request in the run's requests in flight."""
    if run is None:
        raise ProxyError(401, "unknown token", headers=_WWW_AUTHENTICATE)
    request[RUN] = run
    request[TOKEN] = token
    _claim_connection(context, token, run.run_id, request.transport)
    if not run.active:
        raise ProxyError(403, f"run {run.run_id} has finished; its token is no longer accepted")
    if request.match_info.http_exception is not None:
        raise ProxyError(
            403, f"{request.method} {request.path} is not an endpoint algorithms may call"
        )
    in_flight = context.in_flight
    count = in_flight.get(run.run_id, 0)
    if count >= context.limits.max_requests_per_run:
        raise ProxyError(
            429,
            f"run {run.run_id} has {count} requests in flight already "
            f"(limit {context.limits.max_requests_per_run})",
        )
    in_flight[run.run_id] = count + 1
    return run


def _done(context: ProxyContext, run_id: int) -> None:
    in_flight = context.in_flight
    if in_flight[run_id] == 1:
        del in_flight[run_id]
    else:
        in_flight[run_id] -= 1


def _claim_connection(
    context: ProxyContext, token: str, run_id: int, transport: asyncio.BaseTransport | None
) -> None:
    """Count the connection against the run's token; refuse and close one past its limit."""
    if transport is None:
        return
    held = context.connections.get(token)
    if held is None:
        if len(context.connections) >= _SWEEP_AT:
            _sweep(context.connections)
        held = context.connections[token] = set()
    elif transport in held:
        return
    limit = context.limits.max_connections_per_run
    if len(held) >= limit:
        held.difference_update([t for t in held if t.is_closing()])
        if len(held) >= limit:
            raise ProxyError(
                429,
                f"run {run_id} has {len(held)} connections to the proxy open already "
                f"(limit {limit}); reuse them or close some",
                close=True,
            )
    held.add(transport)


def _sweep(connections: dict[str, set[asyncio.BaseTransport]]) -> None:
    for token in list(connections):
        open_ = {t for t in connections[token] if not t.is_closing()}
        if open_:
            connections[token] = open_
        else:
            del connections[token]


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
