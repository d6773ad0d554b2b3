"""What the proxy needs from the node, as small protocols the node satisfies.

The proxy never imports ``node/``. At construction the node hands it:

* a :class:`RunRegistry` — "which run holds this container token?" — answering with a
  :class:`ProxyRun` (ids, whether the run is still active, its W3C trace context), and
  keeping the ids of the subtasks each run created (only their results are decrypted);
* a :class:`ProxyCrypto` — whether the collaboration is encrypted, encryption of a
  subtask's input for a receiving organization (the node knows how to find that
  organization's public key), and decryption of what was encrypted for this node's
  organization.

And, optionally, for the operator's view:

* a :class:`RequestMetrics` — counts and times every request by route and status (one call
  per request, on the hot path: it must be cheap);
* a :class:`TaskCreations` — told which span created each subtask (the span of the central
  run's ``POST /task``), so the node links the subtask's runs to it.

:class:`RunInfo` and :class:`RunTable` are a plain in-memory registry: enough for the
node (register a run's token when its container starts, ``finish`` it when the container
ends, ``discard`` it after a grace period; after a restart, hold unknown tokens until the
runs that kept going are registered again) and for tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from opentelemetry.trace import SpanContext


class ProxyRun(Protocol):
    """One algorithm run as the proxy sees it."""

    @property
    def run_id(self) -> int: ...

    @property
    def task_id(self) -> int: ...

    @property
    def organization_id(self) -> int: ...

    @property
    def collaboration_id(self) -> int: ...

    @property
    def active(self) -> bool:
        """True while the run's container may call the server; False once it finished."""
        ...

    @property
    def trace_context(self) -> Mapping[str, str]:
        """The run's W3C trace context (``traceparent``, optional ``tracestate``)."""
        ...


class RunRegistry(Protocol):
    """Finds the run a container token belongs to; called once per request (keep it O(1))."""

    def lookup(self, token: str) -> ProxyRun | None: ...

    @property
    def restored(self) -> bool:
        """False while the node is still registering the runs it had before a restart: a
        token unknown now may become known in a moment."""
        ...

    async def wait_restored(self) -> None:
        """Return once :attr:`restored` is true."""
        ...

    def note_subtask(self, token: str, task_id: int) -> None:
        """The run holding ``token`` created task ``task_id`` (its results are the run's)."""
        ...

    def owns_subtask(self, token: str, task_id: int) -> bool:
        """Whether ``task_id`` is known to be a subtask of the run holding ``token``.

        A cache, not the truth: after a node restart it is empty, and the proxy asks the
        server (the task's ``parent``) before it refuses."""
        ...


class RequestMetrics(Protocol):
    """Where each answered request is counted and timed (not ``/healthz``)."""

    def observe(self, route: str, status: int, seconds: float) -> None:
        """``route``: the allow-list's route (or ``(not allowed)``), never the raw path."""
        ...


class TaskCreations(Protocol):
    """Told which request span created a task (a run's ``POST /task`` that succeeded)."""

    def task_created(self, task_id: int, span_context: SpanContext) -> None: ...


class ProxyCryptoError(Exception):
    """Input cannot be encrypted for an organization (no public key, bad key): a 400."""


class ProxyCrypto(Protocol):
    """The node's end-to-end encryption, as the proxy uses it."""

    @property
    def encrypted(self) -> bool:
        """Whether the node's collaboration is encrypted."""
        ...

    async def encrypt_for(self, organization_id: int, data: bytes) -> str:
        """``data`` encrypted for ``organization_id``'s public key, in vantage6's format.

        Raises :class:`ProxyCryptoError` when that cannot be done.
        """
        ...

    def decrypt(self, data: str) -> bytes:
        """What was encrypted for this node's organization; raises on anything else."""
        ...


class PeerAddresses(Protocol):
    """Where a run's peer addresses really lead (the node's peering, docs/networking.md)."""

    async def rewrite(self, run_id: int, addresses: list[Any]) -> list[dict[str, Any]]:
        """The server's ``addresses`` for ``run_id``, each pointed at a local forwarder;
        entries that cannot be reached are left out."""
        ...


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A :class:`ProxyRun` as a value."""

    run_id: int
    task_id: int
    organization_id: int
    collaboration_id: int
    active: bool = True
    trace_context: Mapping[str, str] = field(default_factory=dict)


class RunTable:
    """An in-memory :class:`RunRegistry`: container token → :class:`RunInfo`.

    ``restoring=True``: the node starts serving the proxy before it has re-registered the
    runs that kept going while it was down (after a restart); it calls :meth:`mark_restored`
    when that is done, and until then the proxy holds requests with unknown tokens instead
    of refusing them.
    """

    def __init__(self, *, restoring: bool = False) -> None:
        self._runs: dict[str, RunInfo] = {}
        self._subtasks: dict[str, set[int]] = {}
        self._restored = asyncio.Event()
        if not restoring:
            self._restored.set()

    @property
    def restored(self) -> bool:
        return self._restored.is_set()

    async def wait_restored(self) -> None:
        await self._restored.wait()

    def mark_restored(self) -> None:
        self._restored.set()

    def add(self, token: str, run: RunInfo) -> None:
        """Accept ``token`` for ``run``; adding a known token again keeps its subtasks."""
        self._runs[token] = run

    def finish(self, token: str) -> None:
        """Keep the token known but refuse it (403) from now on."""
        run = self._runs.get(token)
        if run is not None:
            self._runs[token] = replace(run, active=False)

    def discard(self, token: str) -> None:
        """Forget the token (401 from now on)."""
        self._runs.pop(token, None)
        self._subtasks.pop(token, None)

    def note_subtask(self, token: str, task_id: int) -> None:
        if token in self._runs:
            self._subtasks.setdefault(token, set()).add(task_id)

    def owns_subtask(self, token: str, task_id: int) -> bool:
        return task_id in self._subtasks.get(token, ())

    def lookup(self, token: str) -> RunInfo | None:
        return self._runs.get(token)

    def __len__(self) -> int:
        return len(self._runs)
