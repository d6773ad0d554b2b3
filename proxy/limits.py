"""The proxy's bounds: request and answer sizes, upstream time, retries, connections,
body work, and what one run may hold of each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Bounds on what one request may cost; every field has a production default."""

    #: Largest request body accepted (a subtask's input); larger → 413.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Longest one exchange with the server may take, body included; longer → 504.
    upstream_timeout: float = 60.0
    #: Longest opening a connection to the server may take.
    connect_timeout: float = 5.0
    #: Extra attempts after a connection error, for idempotent requests only.
    retries: int = 2
    #: How long a request waits for a server that refuses connections (restarting) before
    #: it is answered 503: vantage6's algorithm client does not retry, so a server restart
    #: would otherwise crash every run that calls it meanwhile. 0: answer 503 at once.
    unreachable_patience: float = 30.0
    #: Delay before the first retry; doubled for each next one.
    retry_backoff: float = 0.05
    #: Connections to the server kept open and reused (one pool, shared by all runs).
    max_connections: int = 64
    #: Requests one run may have in flight at once; more → 429, so that one run cannot
    #: take the whole pool from the others.
    max_requests_per_run: int = 16
    #: Responses larger than this, or of unknown length, are streamed, not buffered.
    stream_threshold: int = 1024 * 1024
    #: After a node restart, how long a request with a token not (yet) known waits for the
    #: node to register the runs that kept going, before 503.
    restore_wait: float = 30.0
    #: Largest answer of the server the proxy reads (buffered or streamed); larger → 502.
    max_response_bytes: int = 64 * 1024 * 1024
    #: Bodies parsed, encrypted or decrypted at once (all runs together); the rest wait.
    max_body_work: int = 4
    #: Organizations one subtask may name; more → 400 (each may cost a key lookup).
    max_task_organizations: int = 256
    #: Connections one run may hold open to the proxy; a request on one more → 429 and
    #: that connection is closed.
    max_connections_per_run: int = 32
    #: How long an algorithm's idle keep-alive connection stays open.
    keepalive_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0 or self.retries < 0 or self.max_connections < 1:
            raise ValueError("ProxyLimits: sizes, retries and connections must be positive")
        if self.max_requests_per_run < 1:
            raise ValueError("ProxyLimits: max_requests_per_run must be at least 1")
        if self.upstream_timeout <= 0 or self.connect_timeout <= 0 or self.retry_backoff < 0:
            raise ValueError("ProxyLimits: timeouts must be positive")
        if self.keepalive_timeout <= 0:
            raise ValueError("ProxyLimits: timeouts must be positive")
        for name in (
            "max_response_bytes",
            "max_body_work",
            "max_task_organizations",
            "max_connections_per_run",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ProxyLimits: {name} must be at least 1")
