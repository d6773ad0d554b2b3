"""One OpenTelemetry trace per run, from the server's event to the uploaded result.

The run lifecycle opens a root span ``run`` when it receives a run and closes it when the
result is uploaded. Its steps are child spans — ``admit``, ``start``, ``execute`` (from
"container started" to "container ended"), ``upload`` — with the run's attributes (run id,
task id, image, executor, status, reason).

The root span's W3C context (``traceparent``/``tracestate``) is handed to the container's
environment and stored on the runtime object, so that the proxy and a restarted node (which
cannot resume a span object) join the same trace by using it as the parent.

The provider is an object, not a global, so tests can give each node an in-memory exporter
and assert the span tree. With an OTLP endpoint configured, spans go out over OTLP/HTTP
from the SDK's batch processor (which owns its own export thread).
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()


def make_tracer_provider(
    *,
    service_name: str,
    node_name: str,
    sampling_ratio: float = 1.0,
    otlp_endpoint: str | None = None,
    processors: tuple[SpanProcessor, ...] = (),
) -> TracerProvider:
    """A provider exporting to ``otlp_endpoint`` (if set) and to any extra ``processors``."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.instance.id": node_name}),
        sampler=ParentBased(TraceIdRatioBased(sampling_ratio)),
    )
    if otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint)))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")


def carrier_of(span: trace.Span) -> dict[str, str]:
    """The W3C trace context of ``span`` as a ``{"traceparent": ..., ...}`` mapping."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def context_from(carrier: Mapping[str, str] | None) -> Context | None:
    """The parent context stored in ``carrier`` (``None`` when there is none)."""
    if not carrier or "traceparent" not in carrier:
        return None
    return _propagator.extract(dict(carrier))
