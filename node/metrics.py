"""The node's Prometheus metrics, served as ``GET /metrics`` on the health port.

What an operator graphs and alerts on: runs ended by status, how long a run waits from the
server's event to a running container and how long its container runs, the queue (runs
waiting for a slot) and the slots in use, the proxy's requests by route and status with
their latency, how late the node handles the events of the runtime and the server, and
how often the link to the server had to be made again.

Why ``prometheus-client`` and not the OpenTelemetry metrics SDK with its Prometheus
exporter: the exporter is itself built on ``prometheus-client`` (one more layer and two more
packages for the same text), and the SDK's instruments cost several times more per
observation (attributes are hashed into a new set on every call; measured in
``docs/operating.md``) — and the proxy records one observation per request on its hot path.
Traces stay OpenTelemetry (:mod:`node.telemetry`); the two meet only in the operator's
dashboards.

Each :class:`NodeMetrics` has its own registry (no process-global state: tests run several
nodes in one process). Counters and histograms are updated where things happen; what is a
state rather than an event (runs in flight, waiting, slots in use, reconnects) is read
when Prometheus scrapes, from a :data:`Occupancy` callback, so nothing is kept twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "NodeMetrics", "Occupancy", "ProxyRequestMetrics"]

#: The classic text format (what :func:`generate_latest` writes), which every Prometheus
#: reads; the names here need none of the newer format's escaping.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds from the server's event to a running container: image pulls make the tail long.
START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
#: Seconds a container runs: federated analytics runs from a second to hours.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
#: Seconds a proxy request takes (dominated by the server's answer).
PROXY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
#: Seconds between an event happening and the node handling it.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


@dataclass(frozen=True, slots=True)
class Occupancy:
    """The node's state at scrape time."""

    in_flight: int
    #: Runs admitted and waiting for a free slot, per kind (``task``, ``subtask``).
    waiting: dict[str, int]
    #: Slots held by runs, per kind.
    slots_in_use: dict[str, int]
    #: Slots per kind (``max_concurrent_runs``).
    slots: int
    #: Times the link to the server was made again after it was lost.
    server_reconnects: int


class ProxyRequestMetrics:
    """The proxy's requests by route and status, and their latency by route.

    Satisfies the proxy's ``RequestMetrics`` protocol. Per request it does two dictionary
    lookups and two increments under prometheus-client's locks; the labelled children are
    made once per (route, status) and kept (routes are the proxy's allow-list, statuses
    HTTP codes: both bounded).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            "fednode_proxy_requests",
            "Requests algorithms made through the node's proxy, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self._latency = Histogram(
            "fednode_proxy_request_duration_seconds",
            "Time the proxy took to answer an algorithm's request, by route",
            ["route"],
            buckets=PROXY_BUCKETS,
            registry=registry,
        )
        self._counters: dict[str, dict[int, Counter]] = {}
        self._histograms: dict[str, Histogram] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        by_status = self._counters.get(route)
        if by_status is None:
            by_status = self._counters[route] = {}
            self._histograms[route] = self._latency.labels(route)
        counter = by_status.get(status)
        if counter is None:
            counter = by_status[status] = self._requests.labels(route, str(status))
        counter.inc()
        self._histograms[route].observe(seconds)


class NodeMetrics:
    """All of one node's metrics in one registry; :meth:`render` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.runs = Counter(
            "fednode_runs",
            "Runs that ended on this node, by the status reported to the server",
            ["status"],
            registry=registry,
        )
        self.start_latency = Histogram(
            "fednode_run_start_latency_seconds",
            "Time from the server's event to the run's container running",
            buckets=START_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "fednode_run_duration_seconds",
            "Time a run's container ran, from running to its end (runtime timestamps)",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.event_lag = Histogram(
            "fednode_event_lag_seconds",
            "Time from an event (runtime: the watch/event stream; server: the socket) to "
            "the node handling it",
            ["source"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.executor_lag = self.event_lag.labels("executor")
        self.server_lag = self.event_lag.labels("server")
        self.proxy = ProxyRequestMetrics(registry)
        self._occupancy = _OccupancyCollector()
        registry.register(self._occupancy)

    def watch(self, occupancy: Callable[[], Occupancy] | None) -> None:
        """Read the node's state from ``occupancy()`` at each scrape (``None``: nothing)."""
        self._occupancy.source = occupancy

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _OccupancyCollector(Collector):
    """Gauges (and the reconnect counter) read from the node when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], Occupancy] | None = None

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families below are made at each scrape

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        now = self.source()
        yield GaugeMetricFamily(
            "fednode_runs_in_flight",
            "Runs this node has taken and not yet finished (waiting, starting, running, uploading)",
            value=now.in_flight,
        )
        waiting = GaugeMetricFamily(
            "fednode_runs_waiting",
            "Runs waiting for a free slot (the queue), by kind",
            labels=["kind"],
        )
        in_use = GaugeMetricFamily(
            "fednode_slots_in_use", "Run slots held by runs, by kind", labels=["kind"]
        )
        slots = GaugeMetricFamily(
            "fednode_slots", "Run slots (max_concurrent_runs), by kind", labels=["kind"]
        )
        for kind in ("task", "subtask"):
            waiting.add_metric([kind], now.waiting.get(kind, 0))
            in_use.add_metric([kind], now.slots_in_use.get(kind, 0))
            slots.add_metric([kind], now.slots)
        yield waiting
        yield in_use
        yield slots
        yield CounterMetricFamily(
            "fednode_server_reconnects",
            "Times the socket link to the server was made again after it was lost",
            value=now.server_reconnects,
        )
