"""A run the runtime's queue holds (Kueue) is waiting, not failed: the node shows why in
``fednode status`` and on the run's trace, and forgets it once the run is admitted."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from executors.spec import Phase, Reason, RunEvent
from node.lifecycle.inflight import InFlight
from node.server.models import Run, RunStatus
from tests.unit.lifecycle_node import lifecycle_config

QUOTA = "waiting for Kueue admission: insufficient unused quota for nvidia.com/gpu"


def test_a_queued_run_shows_why_it_waits_until_it_is_admitted(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = lifecycle_config(tmp_path, executor_kind="kubernetes")
    inflight = InFlight(config=config, tracer=provider.get_tracer("test"), proxy_runs=None)
    records = {
        run_id: inflight.remember(
            Run.model_validate({"id": run_id, "task": {"id": 10 + run_id, "image": "i"}})
        )
        for run_id in (1, 2)
    }

    inflight.observe(RunEvent.now(1, Phase.PENDING, message="waiting for Kueue admission"))
    inflight.observe(RunEvent.now(1, Phase.PENDING, message=QUOTA))
    inflight.observe(RunEvent.now(2, Phase.PENDING, message=QUOTA))
    inflight.observe(RunEvent.now(9, Phase.PENDING, message=QUOTA))  # not ours: ignored
    assert inflight.waiting() == {1: QUOTA, 2: QUOTA}

    inflight.observe(RunEvent.now(1, Phase.STARTING))
    inflight.observe(RunEvent.now(2, Phase.KILLED, Reason.KILLED))  # killed while waiting
    assert inflight.waiting() == {}
    for record in records.values():
        inflight.finished(record, status=RunStatus.COMPLETED.value)

    spans = {
        dict(span.attributes or {})["fednode.run_id"]: span
        for span in exporter.get_finished_spans()
    }
    assert [(e.name, dict(e.attributes or {})) for e in spans[1].events] == [
        ("waiting", {"fednode.reason": "waiting for Kueue admission"}),
        ("waiting", {"fednode.reason": QUOTA}),
        ("admitted", {"fednode.phase": "starting"}),
    ]
    assert dict(spans[1].attributes or {})["fednode.waiting"] == QUOTA  # the last reason
    assert [e.name for e in spans[2].events] == ["waiting", "waiting.ended"]
