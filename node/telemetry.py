"""One OpenTelemetry trace per run, from the server's event to the uploaded result.

The run lifecycle opens a root span ``run`` when it receives a run and closes it when the
result is uploaded. Its steps are child spans — ``admit``, ``start``, ``execute`` (from
"container started" to "container ended"), ``upload`` — with the run's attributes (run id,
task id, image, executor, status, reason).

The root span's W3C context (``traceparent``/``tracestate``) is handed to the container's
environment and stored on the runtime object, so that the proxy and a restarted node (which
cannot resume a span object) join the same trace by using it as the parent.

The runs of one federated task are findable together: each ``run`` span carries the job,
task and parent task ids, and a subtask's run has a span link to the span that created its
task — the proxy span of the central run's ``POST /task`` — when that span is this node's
(:class:`TaskOrigins`). Log lines carry the ``trace_id``/``span_id`` of the span current
where they are written (:func:`add_trace_ids`, a structlog processor), so an operator goes
from a log line to its trace and back.

The provider is an object, not a global, so tests can give each node an in-memory exporter
and assert the span tree. With an OTLP endpoint configured, spans go out over OTLP/HTTP
(plain or TLS, with a CA of the operator's and optionally a client certificate; extra
headers such as an API key or a tenant) from the SDK's batch processor (which owns its own
export thread).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()

#: How many created tasks :class:`TaskOrigins` remembers (a central run creates a few).
ORIGINS_MEMORY = 4096


@dataclass(frozen=True)
class OtlpTarget:
    """Where and how spans are exported: ``endpoint`` is the receiver's base URL."""

    endpoint: str
    #: Sent with every export (an API key, a tenant); values are secrets.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: CA bundle (PEM) that verifies an ``https`` receiver (default: the system's).
    certificate: Path | None = None
    #: Client certificate and key (PEM) for a receiver that asks for one (mutual TLS).
    client_certificate: Path | None = None
    client_key: Path | None = None
    timeout: float = 10.0


def make_tracer_provider(
    *,
    service_name: str,
    node_name: str,
    sampling_ratio: float = 1.0,
    otlp: OtlpTarget | None = None,
    processors: tuple[SpanProcessor, ...] = (),
) -> TracerProvider:
    """A provider exporting to ``otlp`` (if set) and to any extra ``processors``."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.instance.id": node_name}),
        sampler=ParentBased(TraceIdRatioBased(sampling_ratio)),
    )
    if otlp is not None:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp)))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def _otlp_exporter(target: OtlpTarget) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    def path(file: Path | None) -> str | None:
        return None if file is None else str(file)

    return OTLPSpanExporter(
        endpoint=target.endpoint.rstrip("/") + "/v1/traces",
        headers=dict(target.headers) or None,
        certificate_file=path(target.certificate),
        client_certificate_file=path(target.client_certificate),
        client_key_file=path(target.client_key),
        timeout=target.timeout,
        session=_session_keeping_its_ca() if target.certificate is not None else None,
    )


def _session_keeping_its_ca() -> Any:
    """A ``requests`` session whose CA (the exporter sets ``verify``) the environment cannot
    replace: requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` override a session's
    ``verify`` on every request, so on a host that sets them (many do, for the system's
    bundle) ``otlp_certificate`` would be ignored and the export fail verification. Proxy
    variables still apply."""
    import requests

    class KeepsItsCA(requests.Session):
        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> Any:
            settings = super().merge_environment_settings(*args, **kwargs)
            settings["verify"] = self.verify
            return settings

    return KeepsItsCA()


def add_trace_ids(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the current span's ``trace_id``/``span_id`` (W3C hex) on the line."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


class TaskOrigins:
    """Which of this node's spans created a task: the link from its runs back to their origin.

    The proxy reports every task a central run creates (:meth:`task_created`, from the span
    of its ``POST /task``). A run of that task remembered afterwards starts with a link to
    that span (:meth:`origin_of`); the server's event for the run can overtake the proxy's
    answer, so a subtask's run remembered before gets the link when the report comes
    (:meth:`wait_for`). Bounded: the last :data:`ORIGINS_MEMORY` tasks; runs wait only while
    they are in flight (:meth:`forget` at their end).
    """

    def __init__(self, *, capacity: int = ORIGINS_MEMORY) -> None:
        self._capacity = capacity
        self._origins: OrderedDict[int, SpanContext] = OrderedDict()
        self._waiting: dict[int, list[Span]] = {}

    def task_created(self, task_id: int, span_context: SpanContext) -> None:
        self._origins[task_id] = span_context
        if len(self._origins) > self._capacity:
            self._origins.popitem(last=False)
        for span in self._waiting.pop(task_id, ()):
            span.add_link(span_context, {"fednode.link": "created by"})

    def origin_of(self, task_id: int) -> SpanContext | None:
        return self._origins.get(task_id)

    def wait_for(self, task_id: int, span: Span) -> None:
        self._waiting.setdefault(task_id, []).append(span)

    def forget(self, task_id: int, span: Span) -> None:
        spans = self._waiting.get(task_id)
        if spans is not None and span in spans:
            spans.remove(span)
            if not spans:
                del self._waiting[task_id]


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
