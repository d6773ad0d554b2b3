"""One informer per kind: list once, then watch from that version; a cache kept exact.

As in client-go, an :class:`Informer` lists the objects of one resource in one namespace
that match a label selector, hands each to its handler, and then watches from the list's
``resourceVersion``. It is shared by every run: the executor starts exactly one for Jobs and
one for Pods, never one per run, and nothing polls.

Keeping the cache exact across trouble is the whole job:

* a watch that ends (server timeout, connection dropped, API server restarted) is resumed
  from the last ``resourceVersion`` seen — an object's, or a ``BOOKMARK``'s (bookmarks are
  requested, so a quiet stream still advances);
* ``410 Gone`` (the version is older than the server's window) means relist: the new list
  replaces the cache, objects missing from it are handed to the handler as ``DELETED``
  (so a deletion that happened while disconnected is still seen), the rest as
  ``MODIFIED``/``ADDED`` (so a change that was missed is seen, once, by its current state);
* a request that cannot reach the server is retried after a short, growing pause (the
  only wait in this module: it paces reconnects, it discovers nothing).

The handler is a plain callable run in the informer's task, in stream order; it must be
quick and must not raise (an exception is logged and the stream goes on). As in
client-go, every object goes through the informer's *transform* before it is cached or
handed on, so the cache holds only what its readers read
(:mod:`~executors.kubernetes.transform`; by default the object less
``metadata.managedFields``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import Any

from common.backoff import Backoff
from common.logging import get_logger
from common.types import Json
from executors.kubernetes.client import KubeClient, KubeError, Resource
from executors.kubernetes.transform import Transform, without_managed_fields

log = get_logger(__name__)

LIST_PAGE_SIZE = 500


class Change(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


Handler = Callable[[Change, Json], None]


class _Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


class Informer:
    """List+watch of one resource kind in one namespace; see the module docstring."""

    def __init__(
        self,
        *,
        client: KubeClient,
        resource: Resource,
        namespace: str,
        label_selector: str,
        handler: Handler,
        watch_timeout: int,
        transform: Transform = without_managed_fields,
    ) -> None:
        self._client = client
        self._resource = resource
        self._namespace = namespace
        self._selector = label_selector
        self._handler = handler
        self._watch_timeout = watch_timeout
        self._transform = transform
        self.store: dict[str, Json] = {}
        self.resource_version: str | None = None
        #: How often the stream was resumed from a version, and how often relisted (410).
        self.resumes = 0
        self.relists = 0
        #: Bytes of watch events received (what following the runs costs on the wire).
        self.received_bytes = 0
        self._what = resource.plural

    @property
    def kind(self) -> str:
        return self._resource.plural

    async def prime(self) -> None:
        """The first list: fills the cache (raises :class:`KubeError` if it cannot)."""
        await self._list()

    async def run(self) -> None:
        """Watch forever (until cancelled), resuming and relisting as needed."""
        backoff = Backoff(first=0.05, cap=2.0)  # reset by a healthy stream
        fresh = True  # the version comes from a list (prime or relist), not a broken stream
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    self.relists += 1
                    fresh = True
                if not fresh:
                    self.resumes += 1
                fresh = False
                if await self._watch():
                    backoff.reset()
                else:  # ended without a single event: do not hammer a server going down
                    await backoff.pause()
            except _Gone:
                log.info("k8s.watch_expired", kind=self.kind, version=self.resource_version)
                self.resource_version = None
            except KubeError as error:
                log.warning(
                    "k8s.watch_failed", kind=self.kind, status=error.status, error=str(error)
                )
                if error.status == 410:
                    self.resource_version = None
                await backoff.pause()

    # -- list -----------------------------------------------------------------------------

    async def _list(self) -> None:
        items: dict[str, Json] = {}
        version = ""
        cont: str | None = None
        while True:
            query: list[tuple[str, str | int]] = [
                ("labelSelector", self._selector),
                ("limit", LIST_PAGE_SIZE),
            ]
            if cont:
                query.append(("continue", cont))
            try:
                page = await self._client.get(
                    self._resource.path(self._namespace), query=query, what=f"list {self._what}"
                )
            except KubeError as error:
                if error.status == 410 and cont:  # the continue token expired: start over
                    items, cont = {}, None
                    continue
                raise
            for item in page.get("items") or []:
                obj = self._transform(item)
                items[obj["metadata"]["name"]] = obj
            metadata = page.get("metadata") or {}
            version = str(metadata.get("resourceVersion") or version)
            cont = metadata.get("continue") or None
            if not cont:
                break
        self._replace(items)
        self.resource_version = version

    def _replace(self, items: dict[str, Json]) -> None:
        old = self.store
        self.store = dict(items)
        for name, obj in old.items():
            if name not in items:
                self._deliver(Change.DELETED, obj)
        for name, obj in items.items():
            previous = old.get(name)
            if previous is None:
                self._deliver(Change.ADDED, obj)
            elif _version(previous) != _version(obj):
                self._deliver(Change.MODIFIED, obj)

    # -- watch ----------------------------------------------------------------------------

    async def _watch(self) -> bool:
        """One watch request until it ends; whether any event arrived (a healthy stream)."""
        query: list[tuple[str, str | int]] = [
            ("watch", "true"),
            ("labelSelector", self._selector),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", self._watch_timeout),
            ("resourceVersion", self.resource_version or ""),
        ]
        healthy = False
        async with self._client.stream(
            self._resource.path(self._namespace),
            query=query,
            read_timeout=self._watch_timeout + 30,
            what=f"watch {self._what}",
        ) as lines:
            async for line in lines:
                self.received_bytes += len(line)
                if not line.strip():
                    continue
                self._on_line(line)
                healthy = True
        return healthy

    def _on_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("k8s.watch_bad_line", kind=self.kind, line=line[:200])
            return
        kind, raw = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            error = KubeError.from_status(int(raw.get("code") or 500), raw)
            if error.status == 410:
                raise _Gone()
            raise error
        if kind == "BOOKMARK":
            version = _version(raw)
            if version:
                self.resource_version = version
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        obj = self._transform(raw)
        version = _version(obj)
        name = obj.get("metadata", {}).get("name")
        if name is None:
            return
        change = Change(kind)
        if change is Change.DELETED:
            self.store.pop(name, None)
        else:
            self.store[name] = obj
        if version:
            self.resource_version = version
        self._deliver(change, obj)

    def _deliver(self, change: Change, obj: Json) -> None:
        try:
            self._handler(change, obj)
        except Exception:
            log.exception(
                "k8s.handler_failed",
                kind=self.kind,
                change=change.value,
                name=obj.get("metadata", {}).get("name"),
            )


def _version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
