"""The researcher's side of the vantage6 peer: the real ``vantage6-client``, over RPC.

fednode's venv must not contain vantage6, so the real ``UserClient`` runs in the
v6server venv as a long-lived worker (``scripts/v6server/userclient.py``) and this module
speaks JSON lines to it: one request line on stdin, one reply line on stdout. A reader
thread moves reply lines into a queue, so every call has a deadline and a dead worker is
reported with its log instead of hanging the test session.

Methods are synchronous; ``client.aio.<method>(...)`` runs the same call in a thread so
an event loop (sockets a test is listening on) keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import queue
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any, TypeVar

Record = dict[str, Any]  # a JSON object as the server (or the client) returns it


T = TypeVar("T")


def _expect(kind: type[T], method: str, value: Any) -> T:
    if not isinstance(value, kind):
        raise RuntimeError(f"{method}: expected a {kind.__name__}, got {value!r}")
    return value


class V6RpcError(RuntimeError):
    """The worker answered with an error: the client or the server refused the call."""

    def __init__(self, method: str, error: dict[str, Any]) -> None:
        super().__init__(f"{method}: {error['type']}: {error['message']}")
        self.method = method
        self.type = error["type"]
        self.message = error["message"]
        self.remote_traceback = error.get("traceback", "")


class V6UserClient:
    """A logged-in researcher (the server's root user unless told otherwise).

    Replies are the vantage6 client's own values (JSON), documented per method.
    """

    def __init__(self, *, python: Path, script: Path, log_path: Path, timeout: float = 120.0):
        self.log_path = log_path
        self.timeout = timeout
        self.aio = _AsyncView(self)
        self.whoami: Record = {}  # {"user_id", "organization_id"} after login()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._log: IO[bytes] = log_path.open("ab")
        self._proc = subprocess.Popen(
            [str(python), str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        threading.Thread(
            target=self._read_replies, name="v6-userclient-reader", daemon=True
        ).start()
        ready = self._next_reply("start-up", timeout=60.0)
        if not ready.get("ready"):
            raise RuntimeError(f"vantage6 user-client worker did not start: {ready!r}")

    # ---- transport --------------------------------------------------------------------
    def call(self, method: str, /, *, rpc_timeout: float | None = None, **params: Any) -> Any:
        """One RPC: ``method(**params)`` in the worker; its result, or V6RpcError."""
        assert self._proc.stdin is not None
        with self._lock:
            request_id = next(self._ids)
            line = json.dumps({"id": request_id, "method": method, "params": params})
            try:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                raise RuntimeError(f"vantage6 user-client worker died; {self._tail()}") from None
            reply = self._next_reply(method, timeout=rpc_timeout or self.timeout)
        if reply.get("id") != request_id:
            raise RuntimeError(f"{method}: reply out of order: {reply!r}")
        if "error" in reply:
            raise V6RpcError(method, reply["error"])
        return reply.get("result")

    def _record(self, method: str, /, **params: Any) -> Record:
        return _expect(dict, method, self.call(method, **params))

    def _records(self, method: str, /, **params: Any) -> list[Record]:
        return _expect(list, method, self.call(method, **params))

    def _text(self, method: str, /, **params: Any) -> str:
        return _expect(str, method, self.call(method, **params))

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # the worker's loop ends at EOF
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def _read_replies(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._replies.put(line)
        self._replies.put(None)  # EOF: the worker is gone

    def _next_reply(self, method: str, *, timeout: float) -> dict[str, Any]:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            self._proc.kill()  # a reply can no longer be matched to its request
            raise RuntimeError(f"{method}: no reply within {timeout} s; {self._tail()}") from None
        if line is None:
            raise RuntimeError(f"{method}: vantage6 user-client worker exited; {self._tail()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _tail(self, lines: int = 40) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"worker log {self.log_path} ends with:\n" + "\n".join(text)

    # ---- session ----------------------------------------------------------------------
    def login(self, *, url: str, port: int, api_path: str, username: str, password: str) -> Record:
        """``UserClient(url, port, api_path).authenticate(...)``; url without the port,
        e.g. ``http://127.0.0.1``. Returns ``{"user_id", "organization_id"}``."""
        self.whoami = self._record(
            "login", host=url, port=port, api_path=api_path, username=username, password=password
        )
        return self.whoami

    def setup_encryption(self, private_key: Path) -> str:
        """``client.setup_encryption(path)`` for the user's organization (uploads its public
        key when the server's differs). Returns that public key (base64 of PEM)."""
        return _expect(
            str,
            "setup_encryption",
            self._record("setup_encryption", private_key=str(private_key))["public_key"],
        )

    def request(
        self,
        endpoint: str,
        *,
        method: str = "get",
        json_body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Any API call with the user's token; the server's JSON body, whatever the status."""
        return self.call(
            "request", endpoint=endpoint, method=method, json_body=json_body, params=params
        )

    # ---- set-up -----------------------------------------------------------------------
    def create_organization(self, name: str, *, public_key: str | None = None) -> Record:
        return self._record("create_organization", name=name, public_key=public_key)

    def set_public_key(self, organization: int, public_key: str) -> Record:
        return self._record("set_public_key", organization=organization, public_key=public_key)

    def create_collaboration(
        self, name: str, organizations: list[int], *, encrypted: bool
    ) -> Record:
        return self._record(
            "create_collaboration", name=name, organizations=organizations, encrypted=encrypted
        )

    def create_node(self, *, collaboration: int, organization: int, name: str) -> Record:
        """The server's node record; ``["api_key"]`` is the node's key (shown only once)."""
        return self._record(
            "create_node", collaboration=collaboration, organization=organization, name=name
        )

    # ---- tasks, runs, results ---------------------------------------------------------
    def create_task(
        self,
        *,
        collaboration: int,
        organizations: list[int],
        input_: dict[str, Any],
        image: str,
        name: str = "fednode-test",
        description: str = "",
        databases: list[dict[str, Any]] | None = None,
    ) -> Record:
        """``client.task.create``; the server's task record (``id``, ``job_id``,
        ``status``, ``runs``, ``init_org``, ``collaboration``, ``databases``, ...)."""
        return self._record(
            "create_task",
            collaboration=collaboration,
            organizations=organizations,
            name=name,
            image=image,
            description=description,
            input_=input_,
            databases=databases,
        )

    def kill_task(self, task: int) -> Record:
        """``POST kill/task``; the server's message."""
        return self._record("kill_task", task=task)

    def task(self, task: int) -> Record:
        return self._record("task", task=task)

    def task_status(self, task: int) -> str:
        return self._text("task_status", task=task)

    def wait_for_results(self, task: int, *, timeout: float = 60.0) -> list[Record]:
        """Poll until the task is finished, then ``results(task)``."""
        # The worker keeps the deadline; the RPC itself may take a little longer.
        return self._records(
            "wait_for_results", task=task, timeout=timeout, rpc_timeout=timeout + 30
        )

    def results(self, task: int) -> list[Record]:
        """``client.result.from_task(task)["data"]``: one dict per run with ``id``,
        ``run{id}``, ``task{id}``, ``result`` (decrypted JSON *text*, None if the run has
        none) and ``blob_storage_used``."""
        return self._records("results", task=task)

    def result_values(self, task: int) -> list[Any]:
        """The decoded ``result`` of each run of the task that has one."""
        return [json.loads(r["result"]) for r in self.results(task) if r.get("result")]

    def runs(self, task: int) -> list[Record]:
        """``client.run.from_task(task)["data"]``: runs with ``status``, ``input``
        (decrypted text), ``organization{id}``, ``node{id}``, ``log``, timestamps."""
        return self._records("runs", task=task)

    # ---- the real vantage6 cryptors ---------------------------------------------------
    def generate_key(self, path: Path) -> str:
        """``RSACryptor.create_new_rsa_key(path)`` (RSA-4096 PEM); its public key as the
        API stores it (base64 of the SubjectPublicKeyInfo PEM)."""
        return _expect(
            str, "generate_key", self._record("generate_key", path=str(path))["public_key"]
        )

    def public_key_of(self, private_key: Path) -> str:
        return self._text("public_key_of", private_key=str(private_key))

    def encrypt(self, data: bytes, public_key: str | None, *, kind: str = "rsa") -> str:
        """``RSACryptor.encrypt_bytes_to_str`` (``kind="rsa"``, ``"<key>$<iv>$<ct>"``) or
        ``DummyCryptor`` (``kind="dummy"``, plain base64)."""
        return self._text(
            "encrypt", data_b64=base64.b64encode(data).decode(), public_key=public_key, kind=kind
        )

    def decrypt(self, data: str, private_key: Path | None, *, kind: str = "rsa") -> bytes:
        """``RSACryptor(private_key).decrypt(data)`` or ``DummyCryptor().decrypt(data)``."""
        key = None if private_key is None else str(private_key)
        plain_b64 = self._text("decrypt", data=data, private_key=key, kind=kind)
        return base64.b64decode(plain_b64)


class _AsyncView:
    """``await client.aio.create_task(...)``: the same method, run in a worker thread."""

    def __init__(self, client: V6UserClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._client, name)

        async def in_thread(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return in_thread
