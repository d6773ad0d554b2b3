"""The proxy app's mechanics: the door, forwarding, failures of the server, observation.

The server here is a STAND-IN: a tiny aiohttp app that records what reaches it and
answers as each test scripts it (slow, broken, large). It exists to make failure modes of
the server reproducible; what the proxy does against the real vantage6 server is specified
in ``tests/integration/test_proxy_v6server.py``. The proxy itself is the real app, served
by the real ``ProxyServer`` on a loopback port.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext
from structlog.testing import capture_logs

from proxy import (
    ProxyCryptoError,
    ProxyLimits,
    ProxyServer,
    RunInfo,
    RunTable,
    make_proxy_app,
)
from tests.http1 import kept_alive

TOKEN = "token-of-run-7"
OTHER_TOKEN = "token-of-run-8"
FINISHED_TOKEN = "token-of-finished-run-9"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """A stand-in for the server's REST API under ``/api``; scripted per test."""

    seen: list[Seen] = field(default_factory=list)
    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    server: TestServer | None = None

    @property
    def api_url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/api"))

    def answer(self, method: str, path: str, answer: Answer) -> None:
        self.answers[(method, path)] = answer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        answer = self.answers.get((request.method, request.path))
        if answer is not None:
            return await answer(request)
        return web.json_response({"method": request.method, "target": request.raw_path})


class FakeCrypto:
    """A ProxyCrypto that marks what it encrypted, so tests can read the marks back."""

    encrypted = True

    def __init__(self) -> None:
        self.encrypted_for: list[int] = []

    async def encrypt_for(self, organization_id: int, data: bytes) -> str:
        if organization_id == 404:
            raise ProxyCryptoError("organization 404 has no public key")
        self.encrypted_for.append(organization_id)
        return f"enc:{organization_id}:{data.decode()}"

    def decrypt(self, data: str) -> bytes:
        if not data.startswith("enc:"):
            raise ValueError("not ours")
        return data.split(":", 2)[2].encode()


class PlainCrypto:
    encrypted = False

    async def encrypt_for(self, organization_id: int, data: bytes) -> str:
        raise AssertionError("an unencrypted collaboration never encrypts")

    def decrypt(self, data: str) -> bytes:
        raise AssertionError("an unencrypted collaboration never decrypts")


@dataclass
class Proxy:
    server: ProxyServer
    runs: RunTable
    session: aiohttp.ClientSession
    spans: InMemorySpanExporter

    @property
    def url(self) -> str:
        return self.server.url

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(
            method, self.url + path, headers=headers, **kwargs
        ) as response:
            raw = await response.read()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            return response.status, body, response


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    stand_in = StandIn()
    app = web.Application()
    app.router.add_route("*", "/api/{tail:.*}", stand_in.handle)
    stand_in.server = TestServer(app, host="127.0.0.1")
    await stand_in.server.start_server()
    yield stand_in
    await stand_in.server.close()


@pytest.fixture
async def make_proxy(standin: StandIn) -> AsyncIterator[ProxyFactory]:
    started: list[Proxy] = []

    async def build(
        *,
        crypto: Any = None,
        limits: ProxyLimits | None = None,
        upstream_api_url: str | None = None,
        metrics: Any = None,
        task_creations: Any = None,
    ) -> Proxy:
        runs = RunTable()
        runs.add(TOKEN, RunInfo(7, 70, 2, 1, trace_context={"traceparent": TRACEPARENT}))
        runs.add(OTHER_TOKEN, RunInfo(8, 80, 2, 1))
        runs.add(FINISHED_TOKEN, RunInfo(9, 90, 2, 1))
        runs.finish(FINISHED_TOKEN)
        spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        app = make_proxy_app(
            upstream_api_url=upstream_api_url or standin.api_url,
            runs=runs,
            crypto=crypto or PlainCrypto(),
            tracer=provider.get_tracer("test"),
            metrics=metrics,
            task_creations=task_creations,
            limits=limits,
        )
        server = ProxyServer(app, host="127.0.0.1", port=0)
        await server.start()
        proxy = Proxy(server, runs, aiohttp.ClientSession(), spans)
        started.append(proxy)
        return proxy

    yield build
    for proxy in started:
        await proxy.session.close()
        await proxy.server.stop()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def raw_request(port: int, request_line: str, headers: str = "") -> int:
    """The status of one hand-written HTTP/1.1 request (targets clients would normalize)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"{request_line}\r\nHost: proxy\r\nAuthorization: Bearer {TOKEN}\r\n{headers}"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


# ---- the door -------------------------------------------------------------------------


async def test_healthz_answers_without_a_token(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    status, body, _ = await proxy.call("GET", "/healthz", token=None)
    assert (status, body) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("token", "status"),
    [(None, 401), ("forged", 401), (FINISHED_TOKEN, 403)],
)
async def test_requests_without_an_active_runs_token_never_reach_the_server(
    make_proxy: ProxyFactory, standin: StandIn, token: str | None, status: int
) -> None:
    proxy = await make_proxy()
    got, body, response = await proxy.call("GET", "/task/70", token=token)
    assert got == status
    assert "msg" in body
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert standin.seen == []


async def test_a_non_bearer_authorization_is_refused(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    async with proxy.session.get(
        proxy.url + "/task/70", headers={"Authorization": f"Basic {TOKEN}"}
    ) as response:
        assert response.status == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/user"),
        ("GET", "/token/container"),
        ("POST", "/token/container"),
        ("PATCH", "/run/1"),
        ("DELETE", "/task/1"),
        ("GET", "/task"),
        ("HEAD", "/task/1"),
        ("GET", "/task/abc"),
        ("GET", "/"),
        ("POST", "/organization"),
    ],
)
async def test_endpoints_outside_the_algorithm_clients_calls_are_forbidden(
    make_proxy: ProxyFactory, standin: StandIn, method: str, path: str
) -> None:
    proxy = await make_proxy()
    status, _, _ = await proxy.call(method, path)
    assert status == 403
    assert standin.seen == []


@pytest.mark.parametrize(
    "request_line",
    [
        "GET /task/../user HTTP/1.1",
        "GET /task/%2e%2e/user HTTP/1.1",
        "GET /task/%2E%2e/token/container HTTP/1.1",
        "GET /task%2f1 HTTP/1.1",
        "GET /./task/1 HTTP/1.1",
        "GET //task/1 HTTP/1.1",
        "GET /task\\1 HTTP/1.1",
        "GET http://evil.example/api/user HTTP/1.1",
        "GET http://127.0.0.1/task/1 HTTP/1.1",
    ],
)
async def test_path_tricks_are_rejected_before_anything_else(
    make_proxy: ProxyFactory, standin: StandIn, request_line: str
) -> None:
    proxy = await make_proxy()
    assert await raw_request(proxy.server.port, request_line) == 400
    assert standin.seen == []


async def test_a_declared_oversized_body_is_refused_unread(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    proxy = await make_proxy(limits=ProxyLimits(max_body_bytes=1000))
    status, body, _ = await proxy.call("POST", "/task", data=b"x" * 1001)
    assert status == 413
    assert "limit" in body["msg"]
    assert standin.seen == []


async def test_an_oversized_chunked_body_is_refused(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    proxy = await make_proxy(limits=ProxyLimits(max_body_bytes=1000))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 100

    status, body, _ = await proxy.call("POST", "/task", data=chunks())
    assert status == 413
    assert "msg" in body
    assert standin.seen == []


# ---- forwarding -----------------------------------------------------------------------


async def test_a_read_goes_to_the_server_with_the_runs_token_and_query(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    proxy = await make_proxy()
    status, body, _ = await proxy.call("GET", "/organization?collaboration_id=1&page=2")
    assert status == 200
    assert body == {"method": "GET", "target": "/api/organization?collaboration_id=1&page=2"}
    (seen,) = standin.seen
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Cookie" not in seen.headers


async def test_the_servers_refusals_pass_through_unchanged(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    async def not_found(_: web.Request) -> web.Response:
        return web.json_response({"msg": "Task id=5 is not found!"}, status=404)

    standin.answer("GET", "/api/task/5", not_found)
    proxy = await make_proxy()
    status, body, _ = await proxy.call("GET", "/task/5")
    assert (status, body) == (404, {"msg": "Task id=5 is not found!"})


async def test_pagination_headers_are_relayed_and_hop_headers_are_not(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    async def page(_: web.Request) -> web.Response:
        return web.json_response(
            {"data": [], "links": {}},
            headers={
                "total-count": "0",
                "Link": '</api/organization?page=1>; rel="first"',
                "Set-Cookie": "session=of-the-server",
                "X-Internal": "1",
            },
        )

    standin.answer("GET", "/api/organization", page)
    proxy = await make_proxy()
    status, _, response = await proxy.call("GET", "/organization")
    assert status == 200
    assert response.headers["total-count"] == "0"
    assert response.headers["Link"].startswith("</api/organization")
    assert "Set-Cookie" not in response.headers and "X-Internal" not in response.headers


async def test_a_large_answer_is_streamed_through_intact(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, over the streaming threshold

    async def large(_: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/octet-stream")

    standin.answer("GET", "/api/study", large)
    proxy = await make_proxy(limits=ProxyLimits(stream_threshold=64 * 1024))
    status, body, response = await proxy.call("GET", "/study")
    assert status == 200
    assert body == payload
    assert response.headers["Content-Type"] == "application/octet-stream"


async def test_a_plain_subtask_reaches_the_server_byte_for_byte(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    proxy = await make_proxy()
    task = {"image": "a", "organizations": [{"id": 2, "input": "eyJ4IjogMX0="}]}
    raw = json.dumps(task, indent=1).encode()
    status, _, _ = await proxy.call(
        "POST", "/task", data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 200
    assert standin.seen[-1].body == raw


async def test_an_encrypted_subtask_carries_each_orgs_input_encrypted_for_it(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    crypto = FakeCrypto()
    proxy = await make_proxy(crypto=crypto)
    plain = b'{"method": "partial", "kwargs": {}}'
    encoded = base64.b64encode(plain).decode()
    organizations = [{"id": 2, "input": encoded}, {"id": 3, "input": encoded}]
    task = {"image": "a", "organizations": organizations}
    status, _, _ = await proxy.call("POST", "/task", json=task)
    assert status == 200
    sent = json.loads(standin.seen[-1].body)
    assert [org["input"] for org in sent["organizations"]] == [
        f"enc:2:{plain.decode()}",
        f"enc:3:{plain.decode()}",
    ]
    assert sent["image"] == "a"


@pytest.mark.parametrize(
    ("body", "crypto", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"organizations": []}', None, "Organizations missing"),
        (b'{"organizations": [{"id": "2"}]}', None, "integer id"),
        (b'{"organizations": [{"id": 2, "input": "%%%"}]}', "fake", "not base64"),
        (b'{"organizations": [{"id": 2}]}', "fake", "base64 string"),
        (b'{"organizations": [{"id": 404, "input": "e30="}]}', "fake", "no public key"),
    ],
)
async def test_a_bad_subtask_is_a_400_with_the_reason(
    make_proxy: ProxyFactory, standin: StandIn, body: bytes, crypto: str | None, fragment: str
) -> None:
    proxy = await make_proxy(crypto=FakeCrypto() if crypto else None)
    status, answer, _ = await proxy.call(
        "POST", "/task", data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert fragment in answer["msg"]
    assert standin.seen == []


async def test_results_come_back_decrypted_as_base64_of_the_plain_bytes(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    task = {"id": 700, "link": "/api/task/700"}
    page = {
        "data": [
            {"id": 1, "result": 'enc:2:{"sum": 3}', "task": task, "blob_storage_used": False},
            {"id": 2, "result": None, "task": task, "blob_storage_used": False},
            {
                "id": 3,
                "result": "0b1ab5c0-0000-4000-8000-000000000000",
                "task": task,
                "blob_storage_used": True,
            },
            {"id": 4, "result": "encrypted-for-someone-else", "task": task},
        ],
        "links": {},
    }

    async def results(_: web.Request) -> web.Response:
        return web.json_response(page)

    async def one(_: web.Request) -> web.Response:
        return web.json_response(
            {"id": 1, "result": "enc:2:[1, 2]", "input": "enc:3:x", "task": task}
        )

    async def created(_: web.Request) -> web.Response:
        return web.json_response({"id": 700, "parent": {"id": 70}}, status=201)

    standin.answer("GET", "/api/result", results)
    standin.answer("GET", "/api/run/1", one)
    standin.answer("POST", "/api/task", created)
    proxy = await make_proxy(crypto=FakeCrypto())
    subtask = {"organizations": [{"id": 2, "input": "e30="}]}
    assert (await proxy.call("POST", "/task", json=subtask))[0] == 201
    status, body, _ = await proxy.call("GET", "/result?task_id=700")
    assert status == 200
    got = [record["result"] for record in body["data"]]
    assert got == [
        base64.b64encode(b'{"sum": 3}').decode(),
        None,
        "0b1ab5c0-0000-4000-8000-000000000000",
        "encrypted-for-someone-else",
    ]
    assert standin.seen[-1].target == "/api/result?task_id=700"
    status, body, _ = await proxy.call("GET", "/run/1")
    assert body["result"] == base64.b64encode(b"[1, 2]").decode()
    assert body["input"] == "enc:3:x"  # inputs are for the org that runs them
    assert not [seen for seen in standin.seen if seen.target.startswith("/api/task/")]


def _result_of(task_id: int | None) -> dict[str, Any]:
    record: dict[str, Any] = {"id": 5, "result": 'enc:2:"secret"', "blob_storage_used": False}
    if task_id is not None:
        record["task"] = {"id": task_id, "link": f"/api/task/{task_id}"}
    return record


async def test_results_of_tasks_the_run_did_not_create_are_refused_not_decrypted(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    """A researcher's task of this organization (parent none) and another run's subtask
    (parent 80): their results are encrypted for this node, yet not for run 7's eyes."""
    parents = {500: None, 800: {"id": 80}}
    records = {9: _result_of(500), 10: _result_of(800), 11: _result_of(None)}

    async def result(request: web.Request) -> web.Response:
        return web.json_response(records[int(request.match_info["tail"].split("/")[1])])

    async def task(request: web.Request) -> web.Response:
        task_id = int(request.match_info["tail"].split("/")[1])
        return web.json_response({"id": task_id, "parent": parents[task_id]})

    for record_id in records:
        standin.answer("GET", f"/api/result/{record_id}", result)
    for task_id in parents:
        standin.answer("GET", f"/api/task/{task_id}", task)
    proxy = await make_proxy(crypto=FakeCrypto())
    for record_id, task_id in ((9, 500), (10, 800)):
        status, body, _ = await proxy.call("GET", f"/result/{record_id}")
        assert status == 403
        assert f"task(s) {task_id} are not decrypted for run 7" in body["msg"]
        assert "secret" not in json.dumps(body)
    status, body, _ = await proxy.call("GET", "/result/11")
    assert (status, "names no task" in body["msg"]) == (403, True)
    # the same subtask is run 8's own: its parent is run 8's task
    status, body, _ = await proxy.call("GET", "/result/10", token=OTHER_TOKEN)
    assert (status, body["result"]) == (200, base64.b64encode(b'"secret"').decode())
    # once known, it is not asked again
    asked = len(standin.seen)
    assert (await proxy.call("GET", "/result/10", token=OTHER_TOKEN))[0] == 200
    assert len(standin.seen) == asked + 1


async def test_results_of_a_subtask_are_known_again_after_a_restart(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    """A fresh run table (the node restarted and adopted run 7) knows no subtasks: the
    server's ``parent`` of the task decides, once."""

    async def result(_: web.Request) -> web.Response:
        return web.json_response(_result_of(701))

    async def task(_: web.Request) -> web.Response:
        return web.json_response({"id": 701, "parent": {"id": 70, "link": "/api/task/70"}})

    standin.answer("GET", "/api/result/12", result)
    standin.answer("GET", "/api/task/701", task)
    proxy = await make_proxy(crypto=FakeCrypto())
    assert not proxy.runs.owns_subtask(TOKEN, 701)
    status, body, _ = await proxy.call("GET", "/result/12")
    assert (status, body["result"]) == (200, base64.b64encode(b'"secret"').decode())
    assert proxy.runs.owns_subtask(TOKEN, 701)


async def test_unencrypted_results_pass_through_without_a_task_lookup(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    async def result(_: web.Request) -> web.Response:
        return web.json_response(_result_of(500))

    standin.answer("GET", "/api/result/9", result)
    proxy = await make_proxy()
    status, body, _ = await proxy.call("GET", "/result/9")
    assert (status, body) == (200, _result_of(500))
    assert [seen.target for seen in standin.seen] == ["/api/result/9"]


async def test_blob_storage_is_refused_clearly(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    status, body, _ = await proxy.call("POST", "/blobstream", data=b"abc")
    assert status == 501
    assert "blob storage" in body["msg"]


# ---- when the server fails ------------------------------------------------------------


async def test_a_call_waits_for_a_restarting_server_and_gets_its_answer(
    make_proxy: ProxyFactory,
) -> None:
    # Found by the chaos campaign: a server restart answered a central run's polling with
    # 503 at once, and vantage6's algorithm client crashed the run.
    port = dead_port()
    proxy = await make_proxy(
        upstream_api_url=f"http://127.0.0.1:{port}/api",
        limits=ProxyLimits(unreachable_patience=20),
    )
    call = asyncio.create_task(proxy.call("GET", "/task/70"))
    await asyncio.sleep(0.5)

    async def task(_: web.Request) -> web.Response:
        return web.json_response({"id": 70})

    server = web.Application()
    server.router.add_get("/api/task/70", task)
    runner = web.AppRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        status, body, _ = await asyncio.wait_for(call, 20)
        assert (status, body) == (200, {"id": 70})
    finally:
        await runner.cleanup()


async def test_a_server_that_stays_away_is_a_503_after_the_patience(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(
        upstream_api_url=f"http://127.0.0.1:{dead_port()}/api",
        limits=ProxyLimits(unreachable_patience=1.0),
    )
    started = time.monotonic()
    status, body, _ = await proxy.call("GET", "/task/70")
    assert status == 503
    assert "unreachable" in body["msg"]
    # It gave up once the next pause would have run past the patience.
    assert 0.2 < time.monotonic() - started < 5.0


async def test_without_patience_a_dead_server_is_a_fast_503_and_the_proxy_keeps_serving(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(
        upstream_api_url=f"http://127.0.0.1:{dead_port()}/api",
        limits=ProxyLimits(unreachable_patience=0),
    )
    started = time.monotonic()
    status, body, _ = await proxy.call("GET", "/task/70")
    assert status == 503
    assert "unreachable" in body["msg"]
    assert time.monotonic() - started < 1.0
    status, _, _ = await proxy.call("POST", "/task", json={"organizations": [{"id": 2}]})
    assert status == 503
    status, _, _ = await proxy.call("GET", "/healthz")
    assert status == 200


async def test_a_read_is_retried_after_a_broken_connection(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            assert request.transport is not None
            request.transport.close()
        return web.json_response({"id": 70})

    standin.answer("GET", "/api/task/70", flaky)
    proxy = await make_proxy()
    status, body, _ = await proxy.call("GET", "/task/70")
    assert (status, body, calls) == (200, {"id": 70}, 2)


async def test_a_subtask_is_never_sent_twice_after_a_broken_connection(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    async def broken(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.json_response({})

    standin.answer("POST", "/api/task", broken)
    proxy = await make_proxy()
    status, body, _ = await proxy.call("POST", "/task", json={"organizations": [{"id": 2}]})
    assert status == 502
    assert "broke" in body["msg"]
    assert len(standin.seen) == 1


async def test_a_slow_server_is_a_504_within_the_limit_and_other_runs_go_on(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    standin.answer("GET", "/api/task/70", slow)
    proxy = await make_proxy(limits=ProxyLimits(upstream_timeout=0.3))
    started = time.monotonic()
    slow_call = asyncio.create_task(proxy.call("GET", "/task/70"))
    other_status, _, _ = await proxy.call("GET", "/task/80", token=OTHER_TOKEN)
    assert other_status == 200
    status, body, _ = await slow_call
    assert status == 504
    assert "did not answer" in body["msg"]
    assert time.monotonic() - started < 2.0


async def test_one_run_cannot_take_the_whole_pool_from_the_others(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    release, both_waiting = asyncio.Event(), asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        if len(standin.seen) == 2:
            both_waiting.set()
        await release.wait()
        return web.json_response({"id": 70})

    standin.answer("GET", "/api/task/70", slow)
    proxy = await make_proxy(limits=ProxyLimits(max_requests_per_run=2))
    held = [asyncio.create_task(proxy.call("GET", "/task/70")) for _ in range(2)]
    await asyncio.wait_for(both_waiting.wait(), 5)
    status, body, _ = await proxy.call("GET", "/task/70")
    assert status == 429
    assert "in flight" in body["msg"]
    other, _, _ = await proxy.call("GET", "/task/80", token=OTHER_TOKEN)
    assert other == 200
    release.set()
    assert [status for status, _, _ in await asyncio.gather(*held)] == [200, 200]
    status, _, _ = await proxy.call("GET", "/task/70")
    assert status == 200


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="timeouts"):
        ProxyLimits(upstream_timeout=0)
    with pytest.raises(ValueError, match="max_requests_per_run"):
        ProxyLimits(max_requests_per_run=0)
    with pytest.raises(ValueError, match="timeouts"):
        ProxyLimits(keepalive_timeout=0)
    for name in ("max_response_bytes", "max_body_work", "max_connections_per_run"):
        with pytest.raises(ValueError, match=name):
            ProxyLimits(**{name: 0})


# ---- what one run may cost ------------------------------------------------------------


async def test_a_compressed_answer_over_the_streaming_threshold_arrives_whole(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    """A server behind a compressing front (nginx ``gzip on``): the proxy asks for
    ``identity``; one that compresses anyway is inflated and never sent with the
    compressed ``Content-Length`` (which used to cut the answer short)."""
    # random, so that even compressed it is over the 1 MiB streaming threshold
    names = base64.b64encode(os.urandom(40_000 * 48)).decode()
    payload = json.dumps(
        {"data": [{"id": i, "name": names[i * 64 : i * 64 + 64]} for i in range(40_000)]}
    )

    async def compressed(request: web.Request) -> web.Response:
        response = web.Response(text=payload, content_type="application/json")
        response.enable_compression(web.ContentCoding.gzip)  # whatever the client asked
        return response

    standin.answer("GET", "/api/organization", compressed)
    proxy = await make_proxy()
    status, body, response = await proxy.call("GET", "/organization")
    assert status == 200
    assert len(body["data"]) == 40_000
    assert standin.seen[-1].headers["Accept-Encoding"] == "identity"
    assert "Content-Encoding" not in response.headers


@pytest.mark.parametrize("declared", [True, False])
async def test_an_answer_over_the_size_limit_is_a_502_never_buffered(
    make_proxy: ProxyFactory, standin: StandIn, declared: bool
) -> None:
    big = {"id": 5, "result": "x" * 300_000, "task": {"id": 700}}

    async def large(request: web.Request) -> web.StreamResponse:
        raw = json.dumps(big).encode()
        if declared:
            return web.Response(body=raw, content_type="application/json")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for at in range(0, len(raw), 65536):
            await response.write(raw[at : at + 65536])
        await response.write_eof()
        return response

    standin.answer("GET", "/api/result/5", large)
    standin.answer("GET", "/api/study", large)
    proxy = await make_proxy(crypto=FakeCrypto(), limits=ProxyLimits(max_response_bytes=256 * 1024))
    status, body, _ = await proxy.call("GET", "/result/5")
    assert status == 502
    assert "larger than the proxy passes on (262144 bytes" in body["msg"]
    if declared:  # refused before a byte is sent
        status, body, _ = await proxy.call("GET", "/study")
        assert (status, "larger than" in body["msg"]) == (502, True)
    else:  # streamed: cut off at the limit, never complete-looking
        with pytest.raises(aiohttp.ClientPayloadError):
            await proxy.call("GET", "/study")
    assert (await proxy.call("GET", "/task/70"))[0] == 200


async def test_a_compressed_bomb_is_read_only_up_to_the_limit(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    import gzip

    bomb = gzip.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}")  # 64 MiB in ~64 KiB

    async def answer(_: web.Request) -> web.Response:
        return web.Response(
            body=bomb,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    standin.answer("GET", "/api/result", answer)
    proxy = await make_proxy(limits=ProxyLimits(max_response_bytes=1024 * 1024))
    status, body, _ = await proxy.call("GET", "/result?task_id=700")
    assert (status, "larger than" in body["msg"]) == (502, True)


async def test_a_subtask_naming_too_many_organizations_is_refused_before_any_lookup(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    crypto = FakeCrypto()
    proxy = await make_proxy(crypto=crypto, limits=ProxyLimits(max_task_organizations=10))
    organizations = [{"id": i, "input": "e30="} for i in range(10_000)]
    status, body, _ = await proxy.call("POST", "/task", json={"organizations": organizations})
    assert status == 400
    assert "at most 10 organizations" in body["msg"]
    assert "max_task_organizations" in body["msg"]
    assert crypto.encrypted_for == [] and standin.seen == []


class CountingCrypto(FakeCrypto):
    """Records how many bodies are being encrypted at once."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0

    async def encrypt_for(self, organization_id: int, data: bytes) -> str:
        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(0.05)
        self.now -= 1
        return await super().encrypt_for(organization_id, data)


async def test_body_work_is_bounded_across_runs(make_proxy: ProxyFactory, standin: StandIn) -> None:
    crypto = CountingCrypto()
    proxy = await make_proxy(crypto=crypto, limits=ProxyLimits(max_body_work=2))
    task = {"organizations": [{"id": 2, "input": "e30="}]}
    calls = [
        proxy.call("POST", "/task", json=task, token=token) for token in (TOKEN, OTHER_TOKEN) * 4
    ]
    statuses = [status for status, _, _ in await asyncio.gather(*calls)]
    assert statuses == [200] * 8
    assert crypto.peak == 2


async def test_one_run_cannot_hold_more_than_its_connections(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    proxy = await make_proxy(limits=ProxyLimits(max_connections_per_run=4))
    port = proxy.server.port
    held = [await kept_alive(port, TOKEN, "/task/70") for _ in range(4)]
    assert [status for _, _, status in held] == [200] * 4
    reader, writer, status = await kept_alive(port, TOKEN, "/task/70")
    assert status == 429
    assert await reader.read() == b""  # the proxy closed the fifth connection
    writer.close()
    # another run is not affected
    other = [await kept_alive(port, OTHER_TOKEN, "/task/80") for _ in range(4)]
    assert [status for _, _, status in other] == [200] * 4
    # the held connections still work; closing one frees its place
    _, first, _ = held[0]
    first.close()
    await first.wait_closed()
    await asyncio.sleep(0.05)
    _, writer, status = await kept_alive(port, TOKEN, "/task/70")
    assert status == 200
    for _, w, _ in [*held[1:], *other, (None, writer, None)]:
        w.close()


async def test_a_request_slower_than_the_keepalive_timeout_is_answered(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(0.8)
        return web.json_response({"id": 70})

    standin.answer("GET", "/api/task/70", slow)
    proxy = await make_proxy(limits=ProxyLimits(keepalive_timeout=0.2))
    _, writer, status = await kept_alive(proxy.server.port, TOKEN, "/task/70")
    assert status == 200
    writer.close()


async def test_idle_and_silent_connections_are_closed_after_the_keepalive_timeout(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(limits=ProxyLimits(keepalive_timeout=0.3))
    port = proxy.server.port
    reader, writer, status = await kept_alive(port, TOKEN, "/task/70")
    assert status == 200
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
    slow_writer.write(b"GET /task/70 HTTP/1.1\r\nHost: pr")  # never finished
    started = time.monotonic()
    for r in (reader, silent_reader, slow_reader):
        assert await asyncio.wait_for(r.read(), 5) == b""
    assert time.monotonic() - started < 2.0
    for w in (writer, silent_writer, slow_writer):
        w.close()


# ---- observation ----------------------------------------------------------------------


async def test_each_request_is_a_span_in_the_runs_trace(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    proxy = await make_proxy()
    await proxy.call("GET", "/task/70")
    await proxy.call("GET", "/user")
    spans = proxy.spans.get_finished_spans()
    assert [s.name for s in spans] == ["proxy GET /task/{id}", "proxy GET (not allowed)"]
    span = spans[0]
    assert span.context is not None and span.parent is not None
    assert format(span.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
    assert format(span.parent.span_id, "016x") == TRACEPARENT.split("-")[2]
    attributes = dict(span.attributes or {})
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.route"] == "/task/{id}"
    assert attributes["fednode.run_id"] == 7
    assert float(attributes["fednode.proxy.upstream_ms"]) > 0  # type: ignore[arg-type]
    assert spans[1].attributes is not None
    assert spans[1].attributes["http.response.status_code"] == 403


async def test_each_request_is_one_access_log_line_with_the_run(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy()
    with capture_logs() as logs:
        await proxy.call("GET", "/task/70?x=1")
        await proxy.call("GET", "/task/70", token="forged")
        await proxy.call("GET", "/healthz", token=None)
    lines = [line for line in logs if line["event"] == "proxy.request"]
    assert [(x["run_id"], x["route"], x["status"]) for x in lines] == [
        (7, "/task/{id}", 200),
        (None, "/task/{id}", 401),
    ]
    assert lines[0]["upstream_ms"] is not None and lines[0]["duration_ms"] > 0
    assert lines[0]["task_id"] == 70
    assert lines[1]["peer"] == "127.0.0.1"  # who knocked with a forged token


class Observed:
    """Records what the proxy hands its ``RequestMetrics`` and ``TaskCreations``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int, float]] = []
        self.created: list[tuple[int, SpanContext]] = []

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.append((route, status, seconds))

    def task_created(self, task_id: int, span_context: SpanContext) -> None:
        self.created.append((task_id, span_context))


async def test_each_request_but_healthz_is_counted_by_route_and_status_with_its_time(
    make_proxy: ProxyFactory,
) -> None:
    observed = Observed()
    proxy = await make_proxy(metrics=observed)
    await proxy.call("GET", "/task/70?x=1")
    await proxy.call("GET", "/task/71", token="forged")
    await proxy.call("GET", "/user")
    await proxy.call("GET", "/healthz", token=None)
    assert [(route, status) for route, status, _ in observed.requests] == [
        ("/task/{id}", 200),
        ("/task/{id}", 401),
        ("(not allowed)", 403),
    ]
    assert all(0 < seconds < 5 for _, _, seconds in observed.requests)


async def test_a_created_task_is_reported_with_the_span_of_the_request_that_created_it(
    make_proxy: ProxyFactory, standin: StandIn
) -> None:
    async def created(_: web.Request) -> web.Response:
        return web.json_response({"id": 700, "parent": {"id": 70}}, status=201)

    async def refused(_: web.Request) -> web.Response:
        return web.json_response({"msg": "no"}, status=400)

    observed = Observed()
    proxy = await make_proxy(task_creations=observed)
    standin.answer("POST", "/api/task", created)
    assert (await proxy.call("POST", "/task", json={"organizations": [{"id": 2}]}))[0] == 201
    standin.answer("POST", "/api/task", refused)
    assert (await proxy.call("POST", "/task", json={"organizations": [{"id": 2}]}))[0] == 400
    (span, _) = proxy.spans.get_finished_spans()
    assert span.name == "proxy POST /task"
    assert observed.created == [(700, span.get_span_context())]


# ---- serving --------------------------------------------------------------------------


async def test_the_proxy_serves_on_a_unix_socket(standin: StandIn, tmp_path: Path) -> None:
    runs = RunTable()
    runs.add(TOKEN, RunInfo(7, 70, 2, 1))
    app = make_proxy_app(upstream_api_url=standin.api_url, runs=runs, crypto=PlainCrypto())
    path = tmp_path / "proxy.sock"
    async with ProxyServer(app, path=path) as server:
        assert server.url == f"unix:{path}"
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(
                "http://proxy/task/70", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as response,
        ):
            assert response.status == 200
    assert not path.exists()


async def test_right_after_a_restart_an_unknown_token_waits_until_the_runs_are_restored(
    standin: StandIn,
) -> None:
    runs = RunTable(restoring=True)
    app = make_proxy_app(upstream_api_url=standin.api_url, runs=runs, crypto=PlainCrypto())
    async with (
        ProxyServer(app, host="127.0.0.1", port=0) as server,
        aiohttp.ClientSession() as session,
    ):
        call = asyncio.create_task(
            session.get(f"{server.url}/task/70", headers={"Authorization": f"Bearer {TOKEN}"})
        )
        await asyncio.sleep(0.2)
        assert not call.done()  # held, not refused
        runs.add(TOKEN, RunInfo(7, 70, 2, 1))  # the node re-registers the adopted run
        runs.mark_restored()
        async with await call as response:
            assert response.status == 200
        async with session.get(
            f"{server.url}/task/70", headers={"Authorization": "Bearer forged"}
        ) as response:
            assert response.status == 401  # restored: unknown means unknown


async def test_a_node_that_takes_too_long_to_restore_answers_503_with_retry_after(
    standin: StandIn,
) -> None:
    app = make_proxy_app(
        upstream_api_url=standin.api_url,
        runs=RunTable(restoring=True),
        crypto=PlainCrypto(),
        limits=ProxyLimits(restore_wait=0.1),
    )
    async with (
        ProxyServer(app, host="127.0.0.1", port=0) as server,
        aiohttp.ClientSession() as session,
        session.get(
            f"{server.url}/task/70", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as response,
    ):
        assert response.status == 503
        assert response.headers["Retry-After"] == "2"
        assert "restarting" in (await response.json())["msg"]


async def test_stopping_closes_the_upstream_session(standin: StandIn) -> None:
    app = make_proxy_app(upstream_api_url=standin.api_url, runs=RunTable(), crypto=PlainCrypto())
    server = ProxyServer(app, host="127.0.0.1", port=0)
    await server.start()
    assert server.port > 0
    await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(ValueError, match="either a port"):
        ProxyServer(app)
