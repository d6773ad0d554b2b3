"""What an operator sees of a running node: its metrics scraped over HTTP, its traces in Jaeger.

Real vantage6 4.15.2 server, real podman, the real ``average`` algorithm whose central part
creates a subtask for each organization through node A's proxy. Node A is scraped at
``/metrics`` like Prometheus does, and exports its spans over OTLP/HTTPS (verifying the
receiver with the CA it is given) to a real Jaeger (``tests/peers/jaeger.py``); the test
finds them through Jaeger's query API, as an operator searching its UI would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import certifi
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import SESSION, RunningNode, StartNode
from tests.peers.jaeger import Jaeger
from tests.peers.podman import PodmanService
from tests.peers.v6server import V6Collaboration

pytestmark = [pytest.mark.v6server, pytest.mark.podman, pytest.mark.slow]


async def central_average(collab: V6Collaboration, image: str) -> dict[str, Any]:
    """A central average run on org A, with one subtask per organization; its result."""
    orgs = [collab.org_a.id, collab.org_b.id]
    task: dict[str, Any] = await asyncio.to_thread(
        collab.create_task,
        input_={
            "method": "central_average",
            "kwargs": {"column_name": "age", "organizations": orgs},
        },
        image=image,
        organizations=[collab.org_a.id],
    )
    await asyncio.to_thread(collab.user.wait_for_results, task["id"], timeout=180)
    (result,) = await asyncio.to_thread(collab.user.result_values, task["id"])
    assert result["average"] == pytest.approx(41.875)
    return task


async def scrape(
    node: RunningNode,
) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """``GET /metrics`` on the node's health port: the content type and every sample."""
    health = node.node.settings.health
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{health.host}:{health.port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
        content_type = response.headers["Content-Type"]
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return content_type, samples


async def test_a_running_node_serves_its_runs_proxy_and_link_metrics_to_a_scrape(
    v6_plain: V6Collaboration, start_node: StartNode, podman_service: PodmanService
) -> None:
    node_a = await start_node(v6_plain, v6_plain.org_a)
    await start_node(v6_plain, v6_plain.org_b)
    _, before = await scrape(node_a)

    await central_average(v6_plain, podman_service.average_image)
    await asyncio.sleep(0.5)  # the last run leaves the node's memory after its upload
    content_type, after = await scrape(node_a)

    assert content_type.startswith("text/plain; version=0.0.4")
    assert before[("fednode_runs_in_flight", ())] == 0
    # Node A ran the central run and its own subtask's run; both completed.
    assert after[("fednode_runs_total", (("status", "completed"),))] == 2
    assert after[("fednode_run_start_latency_seconds_count", ())] == 2
    assert after[("fednode_run_duration_seconds_count", ())] == 2
    assert 0 < after[("fednode_run_start_latency_seconds_sum", ())] < 120
    # The central run created its subtask and read the results through the proxy.
    created = after[("fednode_proxy_requests_total", (("route", "/task"), ("status", "201")))]
    assert created == 1
    assert after[("fednode_proxy_request_duration_seconds_count", (("route", "/task"),))] >= 1
    assert any(
        name == "fednode_proxy_requests_total" and dict(labels)["route"] == "/result"
        for name, labels in after
    )
    assert after[("fednode_event_lag_seconds_count", (("source", "executor"),))] >= 4
    assert after[("fednode_event_lag_seconds_count", (("source", "server"),))] >= 2
    assert after[("fednode_runs_in_flight", ())] == 0
    assert after[("fednode_slots_in_use", (("kind", "task"),))] == 0
    assert after[("fednode_runs_waiting", (("kind", "task"),))] == 0
    assert after[("fednode_slots", (("kind", "subtask"),))] == 16
    assert after[("fednode_server_reconnects_total", ())] == 0


def tags_of(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span["tags"]}


@pytest.mark.jaeger
async def test_a_runs_trace_its_spans_and_its_subtasks_link_are_found_in_a_real_jaeger(
    v6_plain: V6Collaboration,
    start_node: StartNode,
    podman_service: PodmanService,
    jaeger: Jaeger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As on many hosts: requests' CA bundle variable set (it must not replace the node's CA).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    service = f"fednode-e2e-{SESSION}"
    node_a = await start_node(
        v6_plain,
        v6_plain.org_a,
        telemetry={
            "otlp_endpoint": jaeger.otlp_endpoint,
            "otlp_certificate": str(jaeger.ca_file),
            "otlp_headers": jaeger.headers,
            "service_name": service,
        },
    )
    await start_node(v6_plain, v6_plain.org_b)

    task = await central_average(v6_plain, podman_service.average_image)
    await node_a.shutdown()  # flushes the node's span batches to Jaeger

    (central,) = await asyncio.to_thread(
        jaeger.wait_for_traces, service=service, tags={"fednode.task_id": str(task["id"])}
    )
    names = {span["operationName"] for span in central["spans"]}
    assert {"run", "admit", "start", "execute", "upload", "proxy POST /task"} <= names
    (run,) = [s for s in central["spans"] if s["operationName"] == "run"]
    assert tags_of(run)["fednode.status"] == "completed"
    assert tags_of(run)["fednode.job_id"] == task["job_id"]
    assert central["processes"][run["processID"]]["serviceName"] == service
    (creator,) = [s for s in central["spans"] if s["operationName"] == "proxy POST /task"]

    # Node A's run of the subtask is its own trace, linked to the request that created it.
    (subtask,) = await asyncio.to_thread(
        jaeger.wait_for_traces, service=service, tags={"fednode.parent_task_id": str(task["id"])}
    )
    (sub_run,) = [s for s in subtask["spans"] if s["operationName"] == "run"]
    assert tags_of(sub_run)["fednode.job_id"] == task["job_id"]
    assert {
        (ref["refType"], ref["traceID"], ref["spanID"])
        for ref in sub_run["references"]
        if ref["traceID"] != subtask["traceID"]
    } == {("FOLLOWS_FROM", central["traceID"], creator["spanID"])}
    assert service in jaeger.get("/api/services")["data"]
