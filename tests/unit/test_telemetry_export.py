"""Spans leave over OTLP/HTTPS to a receiver the operator's CA vouches for, with its headers.

The receiver is a real TLS server on loopback (aiohttp with a certificate signed by a CA
made here) that records what reaches ``/v1/traces``; the exporter is the node's own
(:func:`node.telemetry.make_tracer_provider`). The same against a real Jaeger is
``tests/e2e/test_node_observability.py``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import certifi
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from node.telemetry import OtlpTarget, make_tracer_provider
from tests.peers.jaeger import _certificates


@dataclass
class Receiver:
    url: str
    ca: Path
    seen: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    ca, cert, key = _certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    seen: list[dict[str, str]] = []

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        seen.append(dict(request.headers))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=context)
    yield Receiver(url=f"https://127.0.0.1:{server.port}", ca=ca, seen=seen)
    await server.close()


async def export_one_span(target: OtlpTarget) -> None:
    provider = make_tracer_provider(service_name="fednode", node_name="n", otlp=target)
    provider.get_tracer("test").start_span("run").end()
    await asyncio.to_thread(provider.shutdown)  # flushes the batch


async def test_spans_reach_a_tls_receiver_through_the_given_ca_even_with_requests_ca_bundle_set(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many hosts set requests' bundle variable to the system CAs; it must not replace the
    # operator's CA (requests lets it override a session's own verify setting).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())

    await export_one_span(
        OtlpTarget(
            endpoint=receiver.url,
            certificate=receiver.ca,
            headers={"x-tenant": "hospital-a", "authorization": "Bearer t0ken"},
        )
    )

    (headers,) = receiver.seen
    assert headers["x-tenant"] == "hospital-a"
    assert headers["Authorization"] == "Bearer t0ken"


async def test_without_the_ca_the_receiver_is_not_trusted(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())

    await export_one_span(OtlpTarget(endpoint=receiver.url, timeout=2.0))

    assert receiver.seen == []
