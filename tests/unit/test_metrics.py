"""The node's metrics and trace links as the lifecycle drives them, and ``/metrics`` itself.

The lifecycle is real; the runtime is the in-memory test executor and the server a
stand-in (``tests/unit/lifecycle_node.py``). What a running node serves to a real scrape
after real runs is in ``tests/e2e/test_node_observability.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client.parser import text_string_to_metric_families

from node.health import make_health_app
from node.metrics import NodeMetrics, Occupancy
from node.server.models import RunStatus
from node.telemetry import TaskOrigins
from policies.admission import AdmissionPolicy
from tests.unit.lifecycle_node import behaviour, lifecycle_under_test

ROOT = Path(__file__).resolve().parents[2]


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, keyed by name and sorted labels."""
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_ended_runs_are_counted_by_status_with_their_start_latency_and_duration(
    tmp_path: Path,
) -> None:
    metrics = NodeMetrics()
    policy = AdmissionPolicy(allowed_algorithms=(r"localhost/.*",))
    async with lifecycle_under_test(tmp_path, metrics=metrics, policy=policy) as node:
        node.add_run(1, behaviour(output="ok", sleep=0.2))
        node.add_run(2, behaviour(exit_code=3))
        node.add_run(3, behaviour())
        node.server.runs[3]["task"]["image"] = "docker.io/evil/miner:1"
        await node.lifecycle.sync()
        for run_id in (1, 2, 3):
            await node.finished(run_id)
        seen = samples(metrics)

    assert seen[("fednode_runs_total", (("status", "completed"),))] == 1
    assert seen[("fednode_runs_total", (("status", "crashed"),))] == 1
    assert seen[("fednode_runs_total", (("status", "not allowed"),))] == 1
    # Runs 1 and 2 had a container: each start was timed once, each run's duration too.
    assert seen[("fednode_run_start_latency_seconds_count", ())] == 2
    assert seen[("fednode_run_duration_seconds_count", ())] == 2
    assert seen[("fednode_run_duration_seconds_sum", ())] >= 0.2
    assert seen[("fednode_event_lag_seconds_count", (("source", "executor"),))] >= 4


async def test_waiting_runs_and_slots_in_use_are_read_when_scraped(tmp_path: Path) -> None:
    metrics = NodeMetrics()
    async with lifecycle_under_test(tmp_path, max_concurrent_runs=1, metrics=metrics) as node:
        metrics.watch(lambda: node.lifecycle.occupancy(server_reconnects=2))
        node.add_run(1, behaviour(sleep=30))
        node.add_run(2, behaviour())
        node.add_run(3, behaviour(sleep=30))
        node.server.runs[3]["task"]["parent"] = {"id": 1001}
        await node.lifecycle.sync()
        await node.until(lambda: sorted(node.runtime.started) == [1, 3])
        busy = samples(metrics)

    assert busy[("fednode_runs_in_flight", ())] == 3
    assert busy[("fednode_runs_waiting", (("kind", "task"),))] == 1
    assert busy[("fednode_runs_waiting", (("kind", "subtask"),))] == 0
    assert busy[("fednode_slots_in_use", (("kind", "task"),))] == 1
    assert busy[("fednode_slots_in_use", (("kind", "subtask"),))] == 1
    assert busy[("fednode_slots", (("kind", "task"),))] == 1
    assert busy[("fednode_server_reconnects_total", ())] == 2


async def test_a_subtasks_run_links_to_the_proxy_span_that_created_its_task(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    origins = TaskOrigins()
    creator = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    late_creator = SpanContext(
        trace_id=0x1AF7651916CD43DD8448EB211C80319C,
        span_id=0xC7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    async with lifecycle_under_test(
        tmp_path, tracer=provider.get_tracer("test"), task_origins=origins
    ) as node:
        # Task 1002 was created through this node's proxy before its run arrived; task
        # 1003's run arrives first (the server's event overtook the proxy's answer).
        origins.task_created(1002, creator)
        for run_id in (2, 3):
            node.add_run(run_id, behaviour(sleep=0.2))
            node.server.runs[run_id]["task"]["parent"] = {"id": 1001}
            node.server.runs[run_id]["task"]["job_id"] = 77
        node.add_run(4, behaviour())
        await node.lifecycle.sync()
        await node.until(lambda: 3 in node.runtime.started)
        origins.task_created(1003, late_creator)
        for run_id in (2, 3, 4):
            assert await node.finished(run_id) == RunStatus.COMPLETED.value

    runs = {
        (span.attributes or {})["fednode.run_id"]: span
        for span in exporter.get_finished_spans()
        if span.name == "run"
    }
    assert [link.context for link in runs[2].links] == [creator]
    assert [link.context for link in runs[3].links] == [late_creator]
    assert runs[4].links == ()
    assert (runs[2].attributes or {})["fednode.job_id"] == 77
    assert (runs[2].attributes or {})["fednode.parent_task_id"] == 1001
    assert "fednode.parent_task_id" not in (runs[4].attributes or {})
    assert origins._waiting == {}  # nothing is kept for runs that ended


async def test_metrics_are_served_on_the_health_port_in_prometheus_text() -> None:
    metrics = NodeMetrics()
    metrics.proxy.observe("/task", 201, 0.004)
    metrics.proxy.observe("/task", 201, 0.006)
    metrics.proxy.observe("(not allowed)", 403, 0.0001)
    app = make_health_app(status=lambda: {"ready": True, "missing": []}, metrics=metrics.render)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/metrics")
        text = await response.text()
        off = make_health_app(status=lambda: {"ready": True, "missing": []})
        async with TestClient(TestServer(off)) as client_off:
            absent = await client_off.get("/metrics")

    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'fednode_proxy_requests_total{route="/task",status="201"} 2.0' in text
    assert 'fednode_proxy_requests_total{route="(not allowed)",status="403"} 1.0' in text
    assert 'fednode_proxy_request_duration_seconds_bucket{le="0.005",route="/task"} 1.0' in text
    assert absent.status == 404


def test_the_grafana_dashboard_queries_only_metrics_the_node_serves() -> None:
    metrics = NodeMetrics()
    metrics.watch(
        lambda: Occupancy(in_flight=0, waiting={}, slots_in_use={}, slots=1, server_reconnects=0)
    )
    served = (
        {
            sample.name
            for family in text_string_to_metric_families(metrics.render().decode())
            for sample in family.samples
        }
        | {  # families with no sample until something is observed
            f"fednode_{name}{suffix}"
            for name in ("runs", "proxy_requests")
            for suffix in ("_total",)
        }
        | {f"fednode_proxy_request_duration_seconds{suffix}" for suffix in ("_bucket", "_count")}
    )
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        for name in re.findall(r"\bfednode_[a-z_]+", target["expr"])
    }

    assert queried  # the dashboard is read
    assert queried - served == set()
