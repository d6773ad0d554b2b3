"""A thin, counted JSON client over kubernetes_asyncio's connection and authentication.

kubernetes_asyncio knows how to connect (in-cluster service account with token rotation,
kubeconfig contexts, exec plugins) and how to authenticate each request; its generated
models are slow to build and hide the raw objects a controller wants. So this layer keeps
the former and skips the latter: every call sends and returns plain JSON dicts, through
``ApiClient.call_api`` (which applies the current credentials), on one shared aiohttp pool.

Every request is counted by verb and resource (:attr:`KubeClient.requests`), so the cost
of a run in API requests is a number, not a guess (benchmarks/k8s_executor.py reads it).
Errors become :class:`KubeError` with the API server's status and message; a connection
that fails has status 0. No business logic lives here.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from common.logging import get_logger
from common.types import Json

log = get_logger(__name__)

Query = Sequence[tuple[str, str | int]]

#: Where a pod's service account credentials appear when running in a cluster.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    """The API server refused a request (``status`` >= 400) or could not be reached (0)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_status(cls, status: int, body: Any) -> KubeError:
        """From a ``Status`` object (an error response, or a watch ``ERROR`` event)."""
        if isinstance(body, dict):
            return cls(
                int(body.get("code") or status),
                str(body.get("reason") or ""),
                str(body.get("message") or ""),
            )
        return cls(status, "", str(body)[:500])


class Resource(NamedTuple):
    """A namespaced API resource: ``/apis/batch/v1`` + ``jobs``."""

    prefix: str
    plural: str

    def path(self, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        path = f"{self.prefix}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if sub is not None:
            path += f"/{sub}"
        return path


JOBS = Resource("/apis/batch/v1", "jobs")
PODS = Resource("/api/v1", "pods")
SECRETS = Resource("/api/v1", "secrets")
SERVICES = Resource("/api/v1", "services")
NETWORK_POLICIES = Resource("/apis/networking.k8s.io/v1", "networkpolicies")
#: Kueue's record of a queued Job (read only: why a run waits for admission).
WORKLOADS = Resource("/apis/kueue.x-k8s.io/v1beta1", "workloads")


def namespace_path(name: str) -> str:
    return f"/api/v1/namespaces/{name}"


def in_cluster() -> bool:
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        and (SERVICE_ACCOUNT_DIR / "token").is_file()
    )


def service_account_namespace() -> str | None:
    """The namespace of the pod's service account (the node pod's namespace), if in a pod."""
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() or None
    except OSError:
        return None


async def connect(
    *, kubeconfig: Path | None, context: str | None, max_connections: int
) -> k8s_client.ApiClient:
    """An ApiClient from a kubeconfig, the in-cluster service account, or the default file."""
    configuration = k8s_client.Configuration()
    if kubeconfig is None and context is None and in_cluster():
        k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration,
            token_filename=str(SERVICE_ACCOUNT_DIR / "token"),
            cert_filename=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        )
    else:
        await k8s_config.load_kube_config(
            config_file=str(kubeconfig) if kubeconfig else None,
            context=context,
            client_configuration=configuration,
        )
    configuration.connection_pool_maxsize = max_connections
    return k8s_client.ApiClient(configuration=configuration)


class KubeClient:
    """JSON in, JSON out; every request counted. One per executor, closed with it."""

    def __init__(self, api: k8s_client.ApiClient, *, request_timeout: float) -> None:
        self._api = api
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.requests: Counter[str] = Counter()

    @property
    def api(self) -> k8s_client.ApiClient:
        return self._api

    async def close(self) -> None:
        await self._api.close()

    # -- one-shot requests ----------------------------------------------------------------

    async def get(self, path: str, *, query: Query = (), what: str) -> Json:
        return await self._json("GET", path, query=query, what=what)

    async def create(self, path: str, body: Json, *, query: Query = (), what: str) -> Json:
        return await self._json("POST", path, query=query, body=body, what=what)

    async def delete(self, path: str, *, query: Query = (), what: str) -> Json:
        return await self._json("DELETE", path, query=query, what=what)

    async def merge_patch(self, path: str, body: Json, *, what: str) -> Json:
        return await self._json(
            "PATCH", path, body=body, what=what, content_type="application/merge-patch+json"
        )

    async def apply(self, path: str, body: Json, *, field_manager: str, what: str) -> Json:
        """Server-side apply, taking ownership of the fields it sets (``force``)."""
        return await self._json(
            "PATCH",
            path,
            body=body,
            what=what,
            query=(("fieldManager", field_manager), ("force", "true")),
            content_type="application/apply-patch+yaml",
        )

    async def text(self, path: str, *, query: Query = (), what: str) -> str:
        async with self._request("GET", path, query=query, what=what) as response:
            return await response.text(errors="replace")

    # -- streams --------------------------------------------------------------------------

    @asynccontextmanager
    async def stream(
        self, path: str, *, query: Query, read_timeout: float, what: str
    ) -> AsyncIterator[aiohttp.StreamReader]:
        """A long-running response (a watch), read line by line by the caller."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout)
        async with self._request(
            "GET", path, query=query, what=what, client_timeout=timeout
        ) as response:
            yield response.content

    # -- plumbing -------------------------------------------------------------------------

    async def _json(
        self,
        method: str,
        path: str,
        *,
        what: str,
        query: Query = (),
        body: Json | None = None,
        content_type: str = "application/json",
    ) -> Json:
        async with self._request(
            method, path, query=query, body=body, what=what, content_type=content_type
        ) as response:
            data = await response.read()
        try:
            parsed = json.loads(data) if data else {}
        except ValueError as error:
            raise KubeError(0, "BadResponse", f"{method} {path}: not JSON") from error
        return parsed if isinstance(parsed, dict) else {}

    @asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        query: Query = (),
        body: Json | None = None,
        content_type: str = "application/json",
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        self.requests[what] += 1
        try:
            response: aiohttp.ClientResponse = await self._api.call_api(
                path,
                method,
                query_params=list(query),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=client_timeout or self._timeout,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise KubeError(0, type(error).__name__, f"{method} {path}: {error}") from error
        try:
            _log_warnings(response.headers, method=method, path=path)
            if response.status >= 400:
                raw = await response.read()
                try:
                    detail: Any = json.loads(raw)
                except ValueError:
                    detail = raw.decode(errors="replace")
                raise KubeError.from_status(response.status, detail)
            yield response
        except (aiohttp.ClientError, TimeoutError) as error:
            raise KubeError(0, type(error).__name__, f"{method} {path}: {error}") from error
        finally:
            response.release()


def _log_warnings(headers: Mapping[str, str], *, method: str, path: str) -> None:
    """The API server's ``Warning`` headers (e.g. Pod Security ``warn`` findings)."""
    getall = getattr(headers, "getall", None)
    warnings = getall("Warning", []) if getall is not None else []
    for warning in warnings:
        log.warning("k8s.api_warning", method=method, path=path, warning=warning)
