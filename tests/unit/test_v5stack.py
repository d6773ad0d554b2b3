"""The vantage6 5 benchmark's own pieces: how it tells runs apart, how the a26 launcher
names Kubernetes requests, and the Keycloak stand-in answering the calls a26 makes.

The stand-in needs PyJWT, which only the v5 venv has (``scripts/v5stack-setup``, a
benchmark-only peer that CI does not build): without that venv its test is skipped.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from benchmarks.v5node_compare import run_id_of
from executors.base import LABEL_RUN

REPO = Path(__file__).resolve().parents[2]
V5_PYTHON = (
    Path(os.environ.get("V5_VENV", Path.home() / ".cache" / "fednode" / "v5" / "venv"))
    / "bin"
    / "python"
)


def _launcher() -> Any:
    """``benchmarks/v5stack/launch_node.py`` runs in the v5 venv (vantage6, kubernetes);
    only its stdlib part is tested here, loaded by path so that nothing else is imported."""
    spec = importlib.util.spec_from_file_location(
        "v5_launch_node", REPO / "benchmarks" / "v5stack" / "launch_node.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_are_told_apart_by_each_nodes_own_marks() -> None:
    assert run_id_of({"metadata": {"labels": {LABEL_RUN: "7"}}}) == 7
    assert run_id_of({"metadata": {"name": "run-8", "annotations": {"run_id": "8"}}}) == 8
    assert run_id_of({"metadata": {"labels": {"app": "run-9", "job-name": "run-9"}}}) == 9
    assert run_id_of({"metadata": {"name": "v6-node-test-pod", "labels": {"app": "x"}}}) is None


@pytest.mark.parametrize(
    ("method", "url", "query", "key"),
    [
        ("GET", "https://h:1/api/v1/namespaces/ns", None, "kube GET namespaces"),
        ("POST", "https://h:1/apis/batch/v1/namespaces/ns/jobs", None, "kube POST jobs"),
        ("GET", "https://h:1/api/v1/namespaces/ns/pods", [("watch", True)], "kube WATCH pods"),
        ("GET", "https://h:1/api/v1/namespaces/ns/pods/p-1/log", [], "kube GET pods/log"),
        ("DELETE", "https://h:1/api/v1/namespaces/ns/secrets/run-1", None, "kube DELETE secrets"),
    ],
)
def test_the_launcher_names_kubernetes_requests_by_verb_and_resource(
    method: str, url: str, query: Any, key: str
) -> None:
    assert _launcher().kube_key(method, url, query) == key


# -- the stand-in ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[str]:
    if not V5_PYTHON.exists():
        pytest.skip("no v5 venv (scripts/v5stack-setup: a benchmark-only peer)")
    port = _free_port()
    process = subprocess.Popen(
        [
            *(str(V5_PYTHON), str(REPO / "benchmarks/v5stack/oidc_standin.py")),
            *("--port", str(port), "--state", str(tmp_path / "kc")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                call(base, "GET", "/realms/vantage6")
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def call(
    base: str,
    method: str,
    path: str,
    *,
    form: dict[str, str] | None = None,
    body: Any = None,
    token: str | None = None,
) -> tuple[int, Any, dict[str, str]]:
    data, headers = None, {}
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None, dict(response.headers)
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None, dict(error.headers)


def claims_verified(token: str, public_key_b64: str) -> dict[str, Any]:
    """The token's claims, after checking its RS256 signature with the realm's key."""
    key = serialization.load_der_public_key(base64.b64decode(public_key_b64))
    assert isinstance(key, RSAPublicKey)
    head, payload, signature = token.split(".")

    def unb64(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    key.verify(unb64(signature), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    claims: dict[str, Any] = json.loads(unb64(payload))
    return claims


def test_standin_plays_what_the_a26_server_and_node_call(standin: str) -> None:
    token_path = "/realms/vantage6/protocol/openid-connect/token"
    _, realm, _ = call(standin, "GET", "/realms/vantage6")
    status, admin, _ = call(
        standin,
        "POST",
        token_path,
        form={
            "grant_type": "client_credentials",
            "client_id": "v6-admin",
            "client_secret": "admin-secret",
        },
    )
    assert status == 200
    admin_token = admin["access_token"]
    # POST /api/node: a client with a service account and the node claim mapper
    mapper = {"config": {"claim.name": "vantage6_client_type", "claim.value": "node"}}
    status, _, headers = call(
        standin,
        "POST",
        "/admin/realms/vantage6/clients",
        body={
            "clientId": "n1-node-client",
            "serviceAccountsEnabled": True,
            "protocolMappers": [mapper],
        },
        token=admin_token,
    )
    assert status == 201
    client_uuid = headers["Location"].rsplit("/", 1)[1]
    status, users, _ = call(
        standin,
        "GET",
        "/admin/realms/vantage6/users?username=service-account-n1-node-client&max=1&exact=True",
        token=admin_token,
    )
    assert status == 200 and len(users) == 1
    _, secret, _ = call(
        standin,
        "GET",
        f"/admin/realms/vantage6/clients/{client_uuid}/client-secret",
        token=admin_token,
    )
    # the node logs in as its client; the server verifies the token with the realm's key
    status, login, _ = call(
        standin,
        "POST",
        token_path,
        form={
            "grant_type": "client_credentials",
            "client_id": "n1-node-client",
            "client_secret": secret["value"],
        },
    )
    assert status == 200
    claims = claims_verified(login["access_token"], realm["public_key"])
    assert claims["sub"] == users[0]["id"]
    assert claims["vantage6_client_type"] == "node"
    assert claims["exp"] > claims["iat"]
    # a wrong secret, an admin call without the admin's token, a wrong password: refused
    wrong = {"grant_type": "client_credentials", "client_id": "n1-node-client"}
    assert call(standin, "POST", token_path, form={**wrong, "client_secret": "x"})[0] == 401
    assert (
        call(standin, "GET", "/admin/realms/vantage6/users", token=login["access_token"])[0] == 401
    )
    password = {"grant_type": "password", "client_id": "public_client", "username": "admin"}
    assert call(standin, "POST", token_path, form={**password, "password": "nope"})[0] == 401
    assert call(standin, "POST", token_path, form={**password, "password": "admin"})[0] == 200
    # DELETE /api/node: the client and its service account go
    status, _, _ = call(
        standin, "DELETE", f"/admin/realms/vantage6/clients/{client_uuid}", token=admin_token
    )
    assert status == 204
    _, users, _ = call(
        standin,
        "GET",
        "/admin/realms/vantage6/users?username=service-account-n1-node-client&exact=true",
        token=admin_token,
    )
    assert users == []
