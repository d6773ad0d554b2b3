"""Talking to the components over HTTPS with the standard library only.

The testbed must not depend on what it tests (``kubernetes_asyncio``, fednode itself): an
admin request is one ``urllib`` call with the testbed's client certificate.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from typing import Any

from testbed.layout import HOST, PKI, PORTS


def tls_context(*, client: str | None = "admin") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    if client:
        ctx.load_cert_chain(PKI / f"{client}.crt", PKI / f"{client}.key")
    return ctx


def http_get(url: str, *, ctx: ssl.SSLContext | None = None, timeout: float = 3) -> str:
    with urllib.request.urlopen(url, context=ctx, timeout=timeout) as response:
        return str(response.read().decode())


def _send(request: urllib.request.Request) -> dict[str, Any]:
    with urllib.request.urlopen(request, context=tls_context(), timeout=10) as response:
        result = json.loads(response.read() or b"{}")
    return result if isinstance(result, dict) else {}


def api(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request to kube-apiserver as the admin; raises urllib.error.HTTPError on failure."""
    data = json.dumps(body).encode() if body is not None else None
    return _send(
        urllib.request.Request(
            f"https://{HOST}:{PORTS['kube-apiserver']}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
    )


def api_patch(path: str, patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch as the admin."""
    return _send(
        urllib.request.Request(
            f"https://{HOST}:{PORTS['kube-apiserver']}{path}",
            data=json.dumps(patch).encode(),
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
        )
    )
