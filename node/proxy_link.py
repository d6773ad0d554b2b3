"""What the proxy needs from the node, handed to it as the small protocols it defines.

* :class:`OrganizationKeys` — organizations' public keys from the server, cached (the run
  lifecycle uses it too, to encrypt results for the task's initiator);
* :class:`NodeProxyCrypto` — the node's cryptor as ``proxy.ProxyCrypto``;
* :func:`proxy_placement` — where the proxy listens and what address runs are given, per
  executor kind (podman: the run network's gateway; Kubernetes: the configured Service
  address; apptainer: loopback).
"""

from __future__ import annotations

from typing import NamedTuple

from executors.apptainer.config import ApptainerSettings
from executors.kubernetes.config import KubernetesSettings
from executors.podman.config import PodmanSettings
from node.crypto import CryptoError, Cryptor
from node.server.rest import ServerClient
from node.settings import NodeSettings
from proxy import ProxyCryptoError


class OrganizationKeys:
    """Public keys of organizations as the server stores them (base64 PEM), cached."""

    def __init__(self, server: ServerClient) -> None:
        self._server = server
        self._keys: dict[int, str | None] = {}

    async def public_key(self, organization_id: int) -> str | None:
        if organization_id not in self._keys:
            org = await self._server.request("GET", f"organization/{organization_id}")
            self._keys[organization_id] = (org or {}).get("public_key") or None
        return self._keys[organization_id]


class NodeProxyCrypto:
    """``proxy.ProxyCrypto`` over the node's cryptor and the organizations' keys."""

    def __init__(self, cryptor: Cryptor, keys: OrganizationKeys) -> None:
        self._cryptor = cryptor
        self._keys = keys

    @property
    def encrypted(self) -> bool:
        return self._cryptor.encrypted

    async def encrypt_for(self, organization_id: int, data: bytes) -> str:
        key = await self._keys.public_key(organization_id) if self.encrypted else None
        try:
            return self._cryptor.encrypt(data, key)
        except CryptoError as exc:
            raise ProxyCryptoError(f"organization {organization_id}: {exc}") from None

    def decrypt(self, data: str) -> bytes:
        try:
            return self._cryptor.decrypt(data)
        except CryptoError as exc:
            raise ProxyCryptoError(str(exc)) from None


class ProxyPlacement(NamedTuple):
    """Where the proxy listens, and the host runs are told to call."""

    bind_host: str
    advertise_host: str
    freebind: bool = False


def proxy_placement(settings: NodeSettings) -> ProxyPlacement:
    proxy, executor = settings.proxy, settings.executor
    if isinstance(executor, PodmanSettings):
        gateway = executor.network_gateway
        return ProxyPlacement(gateway, proxy.advertise_host or gateway, freebind=True)
    if isinstance(executor, KubernetesSettings):
        return ProxyPlacement(proxy.host, proxy.advertise_host or proxy.host)
    if isinstance(executor, ApptainerSettings):
        return ProxyPlacement(proxy.host, proxy.advertise_host or "127.0.0.1")
    return ProxyPlacement(proxy.host, proxy.advertise_host or proxy.host)
