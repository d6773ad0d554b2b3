"""A researcher for the tests: the real vantage6-client 4.15.2 behind a JSON-lines RPC.

Runs inside the v6server venv (``scripts/v6server-setup``). fednode's tests live in
another venv and must not import vantage6, so ``tests/peers/v6server.py`` starts this
worker once per test session and talks to it over stdin/stdout:

    request   {"id": 1, "method": "create_task", "params": {...}}
    response  {"id": 1, "result": ...}
          or  {"id": 1, "error": {"type": "...", "message": "...", "traceback": "..."}}

One request at a time, one line each way. Bytes travel as base64 text (``*_b64``).
stdout is reserved for responses: the client's own chatter (it logs to stdout) is
redirected to stderr at start-up.

Every call goes through the real ``UserClient`` (or the real ``vantage6.common.encryption``
cryptors), so what fednode sees from it is what a real researcher's client produces:
input encoding and encryption per organization, result decryption, the HTTP calls.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _claim_stdout() -> Any:
    """Keep the real stdout for the protocol; send everything else written there to stderr."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol


class RpcError(Exception):
    """A call the server or the client refused; the message says why."""


def _checked(response: Any, what: str, key: str = "id") -> Any:
    # UserClient.request returns the JSON body whatever the status code; an error is a
    # body with only a "msg".
    if not isinstance(response, dict) or key not in response:
        raise RpcError(f"{what} failed: {response!r}")
    return response


class Worker:
    """The RPC methods. Each public method is one call; its keyword arguments are params."""

    def __init__(self) -> None:
        from vantage6.client import UserClient

        self._user_client_cls = UserClient
        self.client: Any = None
        self._rsa: Any = None  # the user's organization's RSACryptor, once set up
        self._encrypted: dict[int, bool] = {}  # collaboration id -> encrypted flag

    # ---- session -------------------------------------------------------------------
    def ping(self) -> str:
        return "pong"

    def login(
        self, *, host: str, port: int, api_path: str, username: str, password: str
    ) -> dict[str, Any]:
        client = self._user_client_cls(host, port, api_path, log_level="info")
        client.authenticate(username, password)
        if not getattr(client, "whoami", None):
            raise RpcError(f"login as {username!r} at {host}:{port}{api_path} failed")
        self.client = client
        return {"user_id": client.whoami.id_, "organization_id": client.whoami.organization_id}

    def setup_encryption(self, *, private_key: str) -> dict[str, Any]:
        """The real ``client.setup_encryption``: load the user organization's private key
        and upload its public key to the server if the server's differs."""
        self.client.setup_encryption(private_key)
        self._rsa = self.client.cryptor
        return {"public_key": self._rsa.public_key_str}

    def request(
        self,
        *,
        endpoint: str,
        method: str = "get",
        json_body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Escape hatch: any API call with the user's token (``client.request``)."""
        return self.client.request(endpoint, json=json_body, method=method, params=params)

    # ---- set-up of organizations, collaborations, nodes ----------------------------
    def create_organization(self, *, name: str, public_key: str | None = None) -> Any:
        org = self.client.organization.create(
            name=name,
            address1="Teststraat 1",
            address2="Testdam",
            zipcode="1234 AB",
            country="NL",
            domain=f"{name.lower()}.test",
            public_key=public_key,
        )
        return _checked(org, f"create organization {name!r}")

    def set_public_key(self, *, organization: int, public_key: str) -> Any:
        org = self.client.organization.update(id_=organization, public_key=public_key)
        return _checked(org, f"set public key of organization {organization}")

    def create_collaboration(
        self, *, name: str, organizations: list[int], encrypted: bool = False
    ) -> Any:
        collab = self.client.collaboration.create(
            name=name, organizations=organizations, encrypted=encrypted
        )
        _checked(collab, f"create collaboration {name!r}")
        self._encrypted[collab["id"]] = bool(collab["encrypted"])
        return collab

    def create_node(self, *, collaboration: int, organization: int, name: str) -> Any:
        """Register a node; the answer holds its ``api_key`` (the server's only copy)."""
        node = self.client.node.create(
            collaboration=collaboration, organization=organization, name=name
        )
        return _checked(node, f"create node {name!r}", key="api_key")

    # ---- tasks, runs, results --------------------------------------------------------
    def create_task(
        self,
        *,
        collaboration: int,
        organizations: list[int],
        name: str,
        image: str,
        description: str = "",
        input_: dict[str, Any],
        databases: list[dict[str, Any]] | None = None,
    ) -> Any:
        """``client.task.create``: the input is serialized and, in an encrypted
        collaboration, encrypted per organization with that organization's public key."""
        self._use_cryptor_of(collaboration)
        task = self.client.task.create(
            collaboration=collaboration,
            organizations=organizations,
            name=name,
            image=image,
            description=description,
            input_=input_,
            databases=[{"label": "default"}] if databases is None else databases,
        )
        return _checked(task, f"create task {name!r}")

    def kill_task(self, *, task: int) -> Any:
        # Same call as client.task.kill, which logs the server's answer and returns None.
        return self.client.request("kill/task", method="post", json={"id": task})

    def task(self, *, task: int) -> Any:
        return _checked(self.client.task.get(task), f"get task {task}")

    def task_status(self, *, task: int) -> str:
        return _checked(self.client.request(f"task/{task}/status"), "status", key="status")[
            "status"
        ]

    def wait_for_results(
        self, *, task: int, timeout: float = 60.0, interval: float = 0.2
    ) -> list[dict[str, Any]]:
        """What ``client.wait_for_results`` does (poll ``task/<id>/status`` until finished,
        then ``client.result.from_task``), with a deadline instead of waiting forever."""
        from vantage6.common.task_status import has_task_finished

        deadline = time.monotonic() + timeout
        while not has_task_finished(status := self.task_status(task=task)):
            if time.monotonic() > deadline:
                raise RpcError(f"task {task} not finished after {timeout} s (status {status})")
            time.sleep(interval)
        return self.results(task=task)

    def results(self, *, task: int) -> list[dict[str, Any]]:
        """``client.result.from_task``: ``result`` is the decrypted JSON *text*."""
        self._use_cryptor_of(self._collaboration_of(task))
        return _checked(self.client.result.from_task(task), "results", key="data")["data"]

    def runs(self, *, task: int) -> list[dict[str, Any]]:
        """``client.run.from_task``: runs with ``input`` decrypted (when readable)."""
        self._use_cryptor_of(self._collaboration_of(task))
        return _checked(self.client.run.from_task(task), "runs", key="data")["data"]

    # ---- the real cryptors, for interoperability tests ------------------------------
    def generate_key(self, *, path: str) -> dict[str, Any]:
        """A new RSA-4096 private key (PEM, unencrypted) written to ``path`` exactly as
        vantage6 makes one; returns its public key in the API's form (base64 of PEM)."""
        from vantage6.common.encryption import RSACryptor

        key = RSACryptor.create_new_rsa_key(Path(path))
        public_pem = RSACryptor.create_public_key_bytes(key)
        return {"path": path, "public_key": base64.b64encode(public_pem).decode()}

    def public_key_of(self, *, private_key: str) -> str:
        return self._rsa_cryptor(private_key).public_key_str

    def encrypt(
        self,
        *,
        data_b64: str,
        public_key: str | None = None,
        kind: str = "rsa",
        skip_base64_encoding_of_msg: bool = False,
    ) -> str:
        """``encrypt_bytes_to_str`` of RSACryptor (``kind="rsa"``: ``key$iv$ct``) or
        DummyCryptor (``kind="dummy"``: base64). Blob form (raw ciphertext after the
        header) comes back base64-encoded."""
        data = base64.b64decode(data_b64)
        cryptor = self._rsa_cryptor(None) if kind == "rsa" else self._dummy_cryptor()
        out = cryptor.encrypt_bytes_to_str(
            data, public_key, skip_base64_encoding_of_msg=skip_base64_encoding_of_msg
        )
        return base64.b64encode(out).decode() if isinstance(out, bytes) else out

    def decrypt(
        self, *, data: str, private_key: str | None = None, kind: str = "rsa", blob: bool = False
    ) -> str:
        """``decrypt`` of RSACryptor (with the private key file) or DummyCryptor; returns
        the plaintext as base64. ``blob=True``: ``data`` is base64 of the blob bytes."""
        cryptor = self._rsa_cryptor(private_key) if kind == "rsa" else self._dummy_cryptor()
        payload: str | bytes = base64.b64decode(data) if blob else data
        return base64.b64encode(cryptor.decrypt(payload)).decode()

    # ---- helpers -----------------------------------------------------------------------
    @staticmethod
    def _rsa_cryptor(private_key: str | None) -> Any:
        # The cryptors use a Singleton metaclass: calling RSACryptor(...) a second time
        # returns the *first* instance, whatever key file is passed. type.__call__ skips
        # the metaclass and builds a fresh instance for each key.
        from vantage6.common.encryption import CryptorBase, RSACryptor

        if private_key is not None:
            return type.__call__(RSACryptor, Path(private_key))
        encrypt_only = RSACryptor.__new__(RSACryptor)  # encryption needs no private key
        CryptorBase.__init__(encrypt_only)
        return encrypt_only

    @staticmethod
    def _dummy_cryptor() -> Any:
        from vantage6.common.encryption import DummyCryptor

        return DummyCryptor()

    def _collaboration_of(self, task: int) -> int:
        return int(self.task(task=task)["collaboration"]["id"])

    def _use_cryptor_of(self, collaboration: int) -> None:
        # A real researcher sets up one client per collaboration; this worker serves both
        # kinds, so it picks the cryptor that client would have for this collaboration.
        if collaboration not in self._encrypted:
            collab = _checked(
                self.client.collaboration.get(collaboration), f"collaboration {collaboration}"
            )
            self._encrypted[collaboration] = bool(collab["encrypted"])
        if not self._encrypted[collaboration]:
            self.client.cryptor = self._dummy_cryptor()
        elif self._rsa is None:
            raise RpcError(
                f"collaboration {collaboration} is encrypted: call setup_encryption first"
            )
        else:
            self.client.cryptor = self._rsa


def serve() -> None:
    protocol = _claim_stdout()
    worker = Worker()
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        reply: dict[str, Any] = {"id": request.get("id")}
        try:
            method = request["method"]
            if method.startswith("_") or not callable(getattr(worker, method, None)):
                raise RpcError(f"no such method: {method!r}")
            reply["result"] = getattr(worker, method)(**request.get("params", {}))
        except Exception as exc:
            reply["error"] = {
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": traceback.format_exc(),
            }
        protocol.write(json.dumps(reply, default=str) + "\n")


if __name__ == "__main__":
    serve()
