"""fednode's proxy in front of the real vantage6-server 4.15.2, with real container tokens.

Node A of each fixture collaboration "runs" a task: the real server mints the container
token for it (``POST /token/container`` with node A's token), and node A's proxy is the
real app with that token in its run table. Algorithms are played by plain HTTP calls and,
once, by the real ``AlgorithmClient`` from vantage6-algorithm-tools 4.15.2. Node B plays
the other organization: it hears ``new_task`` on the socket, reads its runs' raw input,
and reports a result encrypted by the real vantage6 cryptor.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import socketio
from aiohttp import web

from node.crypto import CryptoError, Cryptor, cryptor_for
from node.proxy_link import NodeProxyCrypto, OrganizationKeys
from node.server.rest import ServerClient
from proxy import (
    ProxyCrypto,
    ProxyCryptoError,
    ProxyLimits,
    ProxyServer,
    RunInfo,
    RunTable,
    make_proxy_app,
)
from tests.http1 import Connection, kept_alive
from tests.peers.v6server import VENV, V6Collaboration, V6RpcError, V6Server

pytestmark = pytest.mark.v6server

IMAGE = "localhost/fednode/proxy-test:1"  # never pulled: no container runs here


def api(
    server: V6Server, method: str, path: str, *, token: str, body: Any = None
) -> tuple[int, Any]:
    """One call straight to the server (not through the proxy)."""
    request = urllib.request.Request(
        f"{server.api_url}/{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def node_token(server: V6Server, api_key: str) -> str:
    request = urllib.request.Request(
        f"{server.api_url}/token/node",
        data=json.dumps({"api_key": api_key}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.load(response)["access_token"])


@dataclass(frozen=True)
class Node:
    """Node A's view of one collaboration: two running tasks with real container tokens."""

    collab: V6Collaboration
    token_a: str  # node A's access token
    token_b: str  # node B's
    task: int  # a task node A runs
    run: int  # node A's run of it
    container: str  # the real container token of that run
    other_task: int
    other_container: str

    @property
    def server(self) -> V6Server:
        return self.collab.server

    def run_info(self, *, task: int | None = None, active: bool = True) -> RunInfo:
        return RunInfo(
            run_id=self.run,
            task_id=task or self.task,
            organization_id=self.collab.org_a.id,
            collaboration_id=self.collab.id,
            active=active,
            trace_context={
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            },
        )


def _running_task(collab: V6Collaboration, token_a: str, name: str) -> tuple[int, int, str]:
    task = collab.create_task(
        input_={"method": "central"}, image=IMAGE, organizations=[collab.org_a.id], name=name
    )
    status, minted = api(
        collab.server,
        "POST",
        "token/container",
        token=token_a,
        body={"task_id": task["id"], "image": IMAGE},
    )
    assert status == 200, minted
    (run,) = collab.user.runs(task["id"])
    return task["id"], run["id"], minted["container_token"]


def _node(collab: V6Collaboration) -> Node:
    collab.server.start()  # a no-op unless a test left it stopped
    token_a = node_token(collab.server, collab.org_a.api_key)
    token_b = node_token(collab.server, collab.org_b.api_key)
    task, run, container = _running_task(collab, token_a, "proxy-parent")
    other_task, _, other_container = _running_task(collab, token_a, "proxy-other-parent")
    return Node(collab, token_a, token_b, task, run, container, other_task, other_container)


@pytest.fixture(scope="module")
def plain(v6_plain: V6Collaboration) -> Node:
    return _node(v6_plain)


@pytest.fixture(scope="module")
def encrypted(v6_encrypted: V6Collaboration) -> Node:
    return _node(v6_encrypted)


class NodeCrypto:
    """What the node hands its proxy: fednode's cryptor plus public keys from the server."""

    def __init__(self, cryptor: Cryptor, node: Node) -> None:
        self._cryptor = cryptor
        self._node = node

    @property
    def encrypted(self) -> bool:
        return self._cryptor.encrypted

    async def encrypt_for(self, organization_id: int, data: bytes) -> str:
        status, org = await asyncio.to_thread(
            api,
            self._node.server,
            "GET",
            f"organization/{organization_id}",
            token=self._node.token_a,
        )
        if status != 200:
            raise ProxyCryptoError(f"organization {organization_id}: {org}")
        try:
            return self._cryptor.encrypt(data, org.get("public_key"))
        except CryptoError as exc:
            raise ProxyCryptoError(str(exc)) from None

    def decrypt(self, data: str) -> bytes:
        return self._cryptor.decrypt(data)


@dataclass
class Proxy:
    server: ProxyServer
    runs: RunTable
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.server.url

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, Any]:
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.url + path, headers=headers, **kwargs
        ) as response:
            return response.status, json.loads(await response.read())


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def node_proxy() -> AsyncIterator[ProxyFactory]:
    """Node A's proxy for a collaboration, holding both of its running tasks' tokens."""
    opened: list[Proxy] = []

    async def build(
        node: Node, *, limits: ProxyLimits | None = None, crypto: ProxyCrypto | None = None
    ) -> Proxy:
        runs = RunTable()
        runs.add(node.container, node.run_info())
        runs.add(node.other_container, node.run_info(task=node.other_task))
        private_key = node.collab.org_a.private_key
        crypto = crypto or NodeCrypto(
            cryptor_for(encrypted=node.collab.encrypted, private_key=private_key), node
        )
        app = make_proxy_app(
            upstream_api_url=node.server.api_url, runs=runs, crypto=crypto, limits=limits
        )
        server = ProxyServer(app, host="127.0.0.1", port=0)
        await server.start()
        proxy = Proxy(server, runs, aiohttp.ClientSession())
        opened.append(proxy)
        return proxy

    yield build
    for proxy in opened:
        await proxy.http.close()
        await proxy.server.stop()


def subtask_body(node: Node, organizations: list[int], input_: Any) -> dict[str, Any]:
    """A subtask exactly as ``AlgorithmClient.task.create`` sends it."""
    encoded = base64.b64encode(json.dumps(input_).encode()).decode()
    return {
        "name": "subtask",
        "image": IMAGE,
        "collaboration_id": node.collab.id,
        "description": "from a proxy test",
        "organizations": [{"id": org, "input": encoded} for org in organizations],
        "databases": [],
    }


def report_result(node: Node, subtask: int, result: bytes) -> None:
    """Node B finishes its run of ``subtask`` with ``result`` (encrypted for org A)."""
    status, runs = api(node.server, "GET", f"run?task_id={subtask}", token=node.token_b)
    assert status == 200, runs
    (run,) = [r for r in runs["data"] if r["organization"]["id"] == node.collab.org_b.id]
    if node.collab.encrypted:
        payload = node.collab.user.encrypt(result, node.collab.org_a.public_key)
    else:
        payload = node.collab.user.encrypt(result, None, kind="dummy")
    status, body = api(
        node.server,
        "PATCH",
        f"run/{run['id']}",
        token=node.token_b,
        body={
            "result": payload,
            "status": "completed",
            "started_at": datetime.now(UTC).isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
        },
    )
    assert status == 200, body


async def listen_as_node_b(node: Node) -> tuple[socketio.AsyncClient, asyncio.Queue[Any]]:
    """Node B's socket.io connection; its ``new_task`` events land on the queue."""
    events: asyncio.Queue[Any] = asyncio.Queue()
    synced = asyncio.Event()
    sio = socketio.AsyncClient(reconnection=False)

    async def on_sync(*_: Any) -> None:
        synced.set()

    async def on_new_task(data: Any) -> None:
        events.put_nowait(data)

    sio.on("sync", on_sync, namespace="/tasks")
    sio.on("new_task", on_new_task, namespace="/tasks")
    await sio.connect(
        node.server.url,
        headers={"Authorization": f"Bearer {node.token_b}"},
        namespaces=["/tasks"],
        transports=["websocket"],
        wait_timeout=10,
    )
    await asyncio.wait_for(synced.wait(), 10)
    return sio, events


# ---- what algorithms do -----------------------------------------------------------------


async def test_an_algorithm_reads_its_task_and_collaboration_through_the_proxy(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(plain)
    status, task = await proxy.call("GET", f"/task/{plain.task}", token=plain.container)
    assert status == 200
    assert (task["id"], task["image"]) == (plain.task, IMAGE)
    status, state = await proxy.call("GET", f"/task/{plain.task}/status", token=plain.container)
    assert (status, state["status"]) == (200, "pending")
    status, org = await proxy.call(
        "GET", f"/organization/{plain.collab.org_b.id}", token=plain.container
    )
    assert (status, org["id"]) == (200, plain.collab.org_b.id)
    status, collab = await proxy.call(
        "GET", f"/collaboration/{plain.collab.id}", token=plain.container
    )
    assert (status, collab["encrypted"]) == (200, False)
    status, blob = await proxy.call("GET", "/blobstream/status", token=plain.container)
    assert (status, blob) == (200, {"blob_store_enabled": False})


async def test_a_subtask_reaches_the_server_and_the_other_org_hears_new_task(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(plain)
    sio, events = await listen_as_node_b(plain)
    try:
        body = subtask_body(plain, [plain.collab.org_b.id], {"method": "partial", "x": 1})
        status, task = await proxy.call("POST", "/task", token=plain.container, json=body)
        assert status == 201, task
        assert task["parent"]["id"] == plain.task
        heard = await asyncio.wait_for(events.get(), 10)
        while heard["id"] != task["id"]:
            heard = await asyncio.wait_for(events.get(), 10)
        assert heard["parent_id"] == plain.task
    finally:
        await sio.disconnect()
    status, runs = api(plain.server, "GET", f"run?task_id={task['id']}", token=plain.token_b)
    assert status == 200
    (run,) = runs["data"]
    assert json.loads(base64.b64decode(run["input"])) == {"method": "partial", "x": 1}

    report_result(plain, task["id"], b'{"sum": 42}')
    status, results = await proxy.call(
        "GET", f"/result?task_id={task['id']}", token=plain.container
    )
    assert status == 200
    assert [base64.b64decode(r["result"]) for r in results["data"]] == [b'{"sum": 42}']


async def test_in_an_encrypted_collaboration_each_org_gets_input_only_it_can_read(
    encrypted: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(encrypted)
    collab = encrypted.collab
    orgs = [collab.org_a, collab.org_b]
    body = subtask_body(encrypted, [org.id for org in orgs], {"method": "partial", "y": [1, 2]})
    status, task = await proxy.call("POST", "/task", token=encrypted.container, json=body)
    assert status == 201, task
    for org, token in ((collab.org_a, encrypted.token_a), (collab.org_b, encrypted.token_b)):
        status, runs = api(encrypted.server, "GET", f"run?task_id={task['id']}", token=token)
        (run,) = [r for r in runs["data"] if r["organization"]["id"] == org.id]
        stored = run["input"]
        assert "$" in stored  # vantage6's "<key>$<iv>$<message>", not base64 of the input
        plain_input = collab.user.decrypt(stored, org.private_key)
        assert json.loads(plain_input) == {"method": "partial", "y": [1, 2]}
    with pytest.raises(V6RpcError):  # not even the researcher's org can read it
        collab.user.decrypt(runs["data"][0]["input"], collab.root_private_key)


async def test_in_an_encrypted_collaboration_results_come_back_decrypted(
    encrypted: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(encrypted)
    body = subtask_body(encrypted, [encrypted.collab.org_b.id], {"method": "partial"})
    status, task = await proxy.call("POST", "/task", token=encrypted.container, json=body)
    assert status == 201, task
    report_result(encrypted, task["id"], b'{"mean": 3.5}')
    expected = base64.b64encode(b'{"mean": 3.5}').decode()

    status, page = await proxy.call(
        "GET", f"/result?task_id={task['id']}&page=1", token=encrypted.container
    )
    assert status == 200
    (result,) = page["data"]
    assert result["result"] == expected
    status, one = await proxy.call("GET", f"/result/{result['id']}", token=encrypted.container)
    assert (status, one["result"]) == (200, expected)
    # 4.15.2 leaves results out of run records; those pass through with their input as is
    status, runs = await proxy.call("GET", f"/run?task_id={task['id']}", token=encrypted.container)
    assert status == 200
    assert "result" not in runs["data"][0] and "$" in runs["data"][0]["input"]
    # straight from the server it is ciphertext
    _, raw = api(encrypted.server, "GET", f"result/{result['id']}", token=encrypted.token_a)
    assert raw["result"] != expected and "$" in raw["result"]


ALGORITHM = """
import json, sys
from vantage6.algorithm.client import AlgorithmClient
token, port, org = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = AlgorithmClient(token=token, host="http://127.0.0.1", port=port, path="")
task = client.task.create(input_={"method": "partial", "kwargs": {"k": 7}}, organizations=[org])
print(json.dumps({"task": task["id"]}), flush=True)
results = client.wait_for_results(task["id"], interval=0.2)
print(json.dumps({"results": results}), flush=True)
"""


async def test_the_real_algorithm_client_creates_a_subtask_and_gets_its_result(
    encrypted: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(encrypted)
    algorithm = await asyncio.create_subprocess_exec(
        str(VENV / "bin" / "python"),
        "-c",
        ALGORITHM,
        encrypted.container,
        str(proxy.server.port),
        str(encrypted.collab.org_b.id),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert algorithm.stdout is not None and algorithm.stderr is not None
    try:
        line = await asyncio.wait_for(algorithm.stdout.readline(), 60)
        assert line, (await algorithm.stderr.read()).decode()[-3000:]
        subtask = json.loads(line)["task"]
        _, runs = api(encrypted.server, "GET", f"run?task_id={subtask}", token=encrypted.token_b)
        stored = runs["data"][0]["input"]
        assert json.loads(
            encrypted.collab.user.decrypt(stored, encrypted.collab.org_b.private_key)
        ) == {
            "method": "partial",
            "kwargs": {"k": 7},
        }
        await asyncio.to_thread(report_result, encrypted, subtask, b'{"answer": 42}')
        line = await asyncio.wait_for(algorithm.stdout.readline(), 60)
        assert line, (await algorithm.stderr.read()).decode()[-3000:]
        assert json.loads(line)["results"] == [{"answer": 42}]
    finally:
        if algorithm.returncode is None:
            algorithm.kill()
        await algorithm.wait()


# ---- what the proxy refuses, and that it goes on serving --------------------------------


async def assert_still_serving(proxy: Proxy, node: Node) -> None:
    status, task = await proxy.call("GET", f"/task/{node.other_task}", token=node.other_container)
    assert (status, task["id"]) == (200, node.other_task)


async def test_no_token_and_forged_tokens_are_401(plain: Node, node_proxy: ProxyFactory) -> None:
    proxy = await node_proxy(plain)
    assert (await proxy.call("GET", f"/task/{plain.task}", token=None))[0] == 401
    header, payload, _ = plain.container.split(".")
    forged = f"{header}.{payload}.{'A' * 43}"  # the real claims, a made-up signature
    assert (await proxy.call("GET", f"/task/{plain.task}", token=forged))[0] == 401
    # a valid token that is not a container's of this node: node B's own access token
    assert (await proxy.call("GET", f"/task/{plain.task}", token=plain.token_b))[0] == 401
    await assert_still_serving(proxy, plain)


async def test_a_finished_runs_token_is_403(plain: Node, node_proxy: ProxyFactory) -> None:
    proxy = await node_proxy(plain)
    proxy.runs.finish(plain.container)
    status, body = await proxy.call("GET", f"/task/{plain.task}", token=plain.container)
    assert status == 403
    assert "finished" in body["msg"]
    await assert_still_serving(proxy, plain)


async def test_malformed_and_oversized_subtasks_are_refused(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(plain, limits=ProxyLimits(max_body_bytes=64 * 1024))
    status, body = await proxy.call(
        "POST",
        "/task",
        token=plain.container,
        data=b'{"organizations": [',
        headers={"Content-Type": "application/json"},
    )
    assert (status, "not valid JSON" in body["msg"]) == (400, True)
    huge = subtask_body(plain, [plain.collab.org_b.id], {"blob": "x" * 100_000})
    status, body = await proxy.call("POST", "/task", token=plain.container, json=huge)
    assert status == 413
    await assert_still_serving(proxy, plain)


async def test_path_tricks_and_other_endpoints_are_refused(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(plain)
    for target, expected in (
        ("/task/../user", 400),
        ("/task/%2e%2e/user", 400),
        ("http://127.0.0.1/api/user", 400),
        ("/user", 403),
        ("/token/container", 403),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {plain.container}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        status = int((await reader.readline()).split()[1])
        writer.close()
        assert status == expected, target
    status, _ = await proxy.call(
        "PATCH", f"/run/{plain.run}", token=plain.container, json={"status": "completed"}
    )
    assert status == 403
    await assert_still_serving(proxy, plain)


async def test_without_patience_a_stopped_server_is_a_fast_503_and_serving_resumes(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(plain, limits=ProxyLimits(unreachable_patience=0))
    await assert_still_serving(proxy, plain)  # a pooled connection now exists
    await asyncio.to_thread(plain.server.stop)
    try:
        started = time.monotonic()
        status, body = await proxy.call("GET", f"/task/{plain.task}", token=plain.container)
        assert status == 503, body
        status, _ = await proxy.call(
            "POST", "/task", token=plain.container, json=subtask_body(plain, [1], {})
        )
        assert status == 503
        assert time.monotonic() - started < 2.0
        assert (await proxy.call("GET", "/healthz", token=None))[0] == 200
    finally:
        await asyncio.to_thread(plain.server.start)
    await assert_still_serving(proxy, plain)


async def test_a_call_made_while_the_server_restarts_is_answered_once_it_is_back(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    # vantage6's algorithm client does not retry: a 503 during a server restart crashed
    # central runs in the chaos campaign. The proxy waits for the server instead.
    proxy = await node_proxy(
        plain, limits=ProxyLimits(unreachable_patience=200, upstream_timeout=240)
    )
    await assert_still_serving(proxy, plain)
    await asyncio.to_thread(plain.server.stop)
    try:
        call = asyncio.create_task(proxy.call("GET", f"/task/{plain.task}", token=plain.container))
        await asyncio.sleep(1.0)
        assert not call.done()  # held, not refused
    finally:
        await asyncio.to_thread(plain.server.start)
    status, body = await asyncio.wait_for(call, 240)
    assert status == 200, body
    assert body["id"] == plain.task


@contextmanager
def frozen(server: V6Server) -> Iterator[None]:
    """The real server, SIGSTOPped: connections are accepted, nothing is answered."""
    process = server._proc  # the fixture's child process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


async def test_a_server_that_does_not_answer_is_a_504_within_the_limit(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(plain, limits=ProxyLimits(upstream_timeout=1.0))
    with frozen(plain.server):
        started = time.monotonic()
        status, body = await proxy.call("GET", f"/task/{plain.task}", token=plain.container)
        elapsed = time.monotonic() - started
        assert (status, "did not answer" in body["msg"]) == (504, True)
        assert 0.9 < elapsed < 3.0
    await assert_still_serving(proxy, plain)


# ---- attacks on the proxy itself (issue 13, item 7) --------------------------------------
#
# Each performs the attack on node A's proxy in front of the real server; before the
# hardening it succeeded (the plaintext of another run's results came back, thousands of
# key lookups, a truncated or unbounded answer, connections held for an hour).


async def test_a_run_cannot_have_another_runs_results_decrypted(
    encrypted: Node, node_proxy: ProxyFactory
) -> None:
    """The other run on node A makes a subtask; its results are encrypted for org A, and
    the server lets any container of the collaboration read them: the proxy must not
    decrypt them for the first run."""
    proxy = await node_proxy(encrypted)
    body = subtask_body(encrypted, [encrypted.collab.org_b.id], {"method": "partial"})
    status, task = await proxy.call("POST", "/task", token=encrypted.other_container, json=body)
    assert status == 201, task
    report_result(encrypted, task["id"], b'{"secret": "of the other run"}')
    secret = base64.b64encode(b'{"secret": "of the other run"}').decode()
    # the server hands the first run's token the (ciphertext) result
    status, raw = api(
        encrypted.server, "GET", f"result?task_id={task['id']}", token=encrypted.container
    )
    assert status == 200 and "$" in raw["data"][0]["result"]
    result_id = raw["data"][0]["id"]

    for path in (f"/result?task_id={task['id']}", f"/result/{result_id}"):
        status, answer = await proxy.call("GET", path, token=encrypted.container)
        assert status == 403, answer
        assert f"task(s) {task['id']} are not decrypted for run {encrypted.run}" in answer["msg"]
        assert secret not in json.dumps(answer)
    # the run that made the subtask gets it
    status, page = await proxy.call(
        "GET", f"/result?task_id={task['id']}", token=encrypted.other_container
    )
    assert (status, page["data"][0]["result"]) == (200, secret)


async def test_after_a_restart_a_runs_own_subtask_results_are_still_decrypted(
    encrypted: Node, node_proxy: ProxyFactory
) -> None:
    """A restarted node adopts the run with an empty run table: the server's ``parent``
    of the task (the run's task) is what counts, not the proxy's memory."""
    before = await node_proxy(encrypted)
    body = subtask_body(encrypted, [encrypted.collab.org_b.id], {"method": "partial"})
    status, task = await before.call("POST", "/task", token=encrypted.container, json=body)
    assert status == 201, task
    report_result(encrypted, task["id"], b"[1, 2, 3]")
    after = await node_proxy(encrypted)  # a fresh run table
    assert not after.runs.owns_subtask(encrypted.container, task["id"])
    status, page = await after.call(
        "GET", f"/result?task_id={task['id']}", token=encrypted.container
    )
    assert status == 200, page
    assert page["data"][0]["result"] == base64.b64encode(b"[1, 2, 3]").decode()
    assert after.runs.owns_subtask(encrypted.container, task["id"])


FOREIGN_READER = """
import json, sys
from vantage6.algorithm.client import AlgorithmClient
token, port, task, result = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
client = AlgorithmClient(token=token, host="http://127.0.0.1", port=port, path="")
print(json.dumps({"get": client.result.get(result)}), flush=True)
try:
    print(json.dumps({"from_task": client.result.from_task(task)}), flush=True)
except Exception as exc:
    print(json.dumps({"from_task_error": repr(exc)}), flush=True)
"""


async def test_the_real_algorithm_client_gets_no_foreign_result_and_logs_why(
    encrypted: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(encrypted)
    body = subtask_body(encrypted, [encrypted.collab.org_b.id], {"method": "partial"})
    status, task = await proxy.call("POST", "/task", token=encrypted.other_container, json=body)
    assert status == 201, task
    report_result(encrypted, task["id"], b'{"secret": 7}')
    _, raw = api(encrypted.server, "GET", f"result?task_id={task['id']}", token=encrypted.container)
    algorithm = await asyncio.create_subprocess_exec(
        str(VENV / "bin" / "python"),
        "-c",
        FOREIGN_READER,
        encrypted.container,
        str(proxy.server.port),
        str(task["id"]),
        str(raw["data"][0]["id"]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(algorithm.communicate(), 60)
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert lines[0] == {"get": None}, err.decode()[-2000:]
    assert "from_task_error" in lines[1]  # the client expects a page; it gets the refusal
    assert "secret" not in out.decode()
    assert "the proxy decrypts only the results of subtasks this run created" in err.decode()


class CountingServerClient(ServerClient):
    """The node's real REST client, counting the calls it makes to the real server."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[str] = []

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append(f"{method} {path}")
        return await super()._send(method, path, **kwargs)


@pytest.fixture
async def node_a_client(encrypted: Node) -> AsyncIterator[CountingServerClient]:
    client = CountingServerClient(
        api_url=encrypted.server.api_url, api_key=encrypted.collab.org_a.api_key
    )
    await client.open()
    await client.authenticate()
    yield client
    await client.close()


def node_keys(node: Node, client: ServerClient, *, ttl: float = 300.0) -> NodeProxyCrypto:
    """Node A's own crypto for its proxy: its key and ``node.proxy_link``'s key lookup."""
    keys = OrganizationKeys(client, collaboration_id=node.collab.id, ttl=ttl)
    cryptor = cryptor_for(encrypted=True, private_key=node.collab.org_a.private_key)
    return NodeProxyCrypto(cryptor, keys)


async def test_a_subtask_naming_many_organizations_costs_one_key_listing(
    encrypted: Node, node_a_client: CountingServerClient, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(encrypted, crypto=node_keys(encrypted, node_a_client))
    collab = encrypted.collab
    organizations = [collab.org_b.id, *range(10_000, 10_200)]  # 200 not in it
    body = subtask_body(encrypted, organizations, {"method": "partial"})
    node_a_client.calls.clear()
    started = time.monotonic()
    status, answer = await proxy.call("POST", "/task", token=encrypted.container, json=body)
    assert status == 400, answer
    assert "has no public key in this collaboration" in answer["msg"]
    assert node_a_client.calls == ["GET organization"]
    assert time.monotonic() - started < 5
    # and far too many is refused before any lookup
    body = subtask_body(encrypted, list(range(1, 10_001)), {"method": "partial"})
    status, answer = await proxy.call("POST", "/task", token=encrypted.container, json=body)
    assert (status, "at most 256 organizations" in answer["msg"]) == (400, True)
    assert node_a_client.calls == ["GET organization"]


async def test_a_rotated_organization_key_is_used_after_the_cache_time(
    encrypted: Node,
    node_a_client: CountingServerClient,
    node_proxy: ProxyFactory,
    tmp_path: Any,
) -> None:
    collab = encrypted.collab
    proxy = await node_proxy(encrypted, crypto=node_keys(encrypted, node_a_client, ttl=1.0))
    new_private = tmp_path / "org-b-rotated.pem"
    new_public = collab.user.generate_key(new_private)

    async def subtask_input() -> str:
        body = subtask_body(encrypted, [collab.org_b.id], {"method": "partial", "n": 1})
        status, task = await proxy.call("POST", "/task", token=encrypted.container, json=body)
        assert status == 201, task
        _, runs = api(collab.server, "GET", f"run?task_id={task['id']}", token=encrypted.token_b)
        return str(runs["data"][0]["input"])

    try:
        assert collab.user.decrypt(await subtask_input(), collab.org_b.private_key)
        set_key(encrypted, new_public)
        await asyncio.sleep(1.2)
        stored = await subtask_input()
        assert json.loads(collab.user.decrypt(stored, new_private)) == {
            "method": "partial",
            "n": 1,
        }
    finally:
        assert collab.org_b.public_key is not None
        set_key(encrypted, collab.org_b.public_key)


def set_key(node: Node, public_key: str) -> None:
    """Node B sets its organization's public key (only members may)."""
    status, body = api(
        node.server,
        "PATCH",
        f"organization/{node.collab.org_b.id}",
        token=node.token_b,
        body={"public_key": public_key},
    )
    assert status == 200, body


def large_subtask(node: Node, size: int) -> dict[str, Any]:
    """A subtask whose input makes ``GET task/<id>?include=runs`` about ``size`` bytes
    (the server caps descriptions at 1,024 characters, not inputs); random, so that it
    stays that large compressed."""
    noise = base64.b64encode(os.urandom(size * 3 // 8)).decode()
    return subtask_body(node, [node.collab.org_b.id], {"noise": noise})


class GzipFront:
    """A NAMED STAND-IN for a compressing reverse proxy in front of the server (nginx with
    ``gzip on``, an ingress): the real 4.15.2 server never compresses, deployments often
    do. Like nginx it compresses JSON only for a client that accepts gzip."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> GzipFront:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    async def handle(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in HEADERS_ONWARD}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as http,
            http.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=await request.read(),
            ) as answer,
        ):
            body = await answer.read()
            response = web.Response(
                status=answer.status,
                body=body,
                content_type=answer.content_type,
            )
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression(web.ContentCoding.gzip)
        return response


HEADERS_ONWARD = {"authorization", "content-type"}


async def test_a_large_answer_through_a_compressing_front_arrives_whole(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    """It used to arrive cut at the compressed length (the proxy streamed the inflated
    body under the compressed ``Content-Length``)."""
    direct = await node_proxy(plain)
    body = large_subtask(plain, 3 * 1024 * 1024)
    status, task = await direct.call("POST", "/task", token=plain.container, json=body)
    assert status == 201, task
    target = f"/task/{task['id']}?include=runs"
    status, whole = await direct.call("GET", target, token=plain.container)
    assert status == 200
    async with GzipFront(f"http://127.0.0.1:{plain.server.port}") as front:
        runs = RunTable()
        runs.add(plain.container, plain.run_info())
        crypto = NodeCrypto(cryptor_for(encrypted=False, private_key=None), plain)
        app = make_proxy_app(upstream_api_url=front.api_url, runs=runs, crypto=crypto)
        async with (
            ProxyServer(app, host="127.0.0.1", port=0) as proxy,
            aiohttp.ClientSession() as http,
            http.get(
                f"{proxy.url}{target}",
                headers={"Authorization": f"Bearer {plain.container}"},
            ) as response,
        ):
            assert response.status == 200
            raw = await response.read()
    assert len(raw) > 2 * 1024 * 1024
    assert json.loads(raw) == whole


async def test_an_answer_over_the_size_limit_is_a_502(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    proxy = await node_proxy(plain, limits=ProxyLimits(max_response_bytes=512 * 1024))
    body = large_subtask(plain, 1024 * 1024)
    status, task = await proxy.call("POST", "/task", token=plain.container, json=body)
    assert status == 201, task
    status, answer = await proxy.call(
        "GET", f"/task/{task['id']}?include=runs", token=plain.container
    )
    assert status == 502
    assert "larger than the proxy passes on (524288 bytes" in answer["msg"]
    await assert_still_serving(proxy, plain)


async def test_one_run_cannot_hold_the_proxys_connections(
    plain: Node, node_proxy: ProxyFactory
) -> None:
    """Run A opens connections and keeps them: past its limit they are refused and
    closed, run B is served, and idle ones are closed after the keep-alive timeout
    (aiohttp's default kept them an hour)."""
    proxy = await node_proxy(plain, limits=ProxyLimits(keepalive_timeout=10.0))
    port = proxy.server.port
    path = f"/task/{plain.task}"
    started = time.monotonic()
    opened: list[Connection] = []
    for _ in range(5):  # in fives: the run's in-flight limit (16) is not what is tested
        opened += await asyncio.gather(*(kept_alive(port, plain.container, path) for _ in range(8)))
    assert time.monotonic() - started < 10.0  # none closed for idleness yet
    statuses = sorted(status for _, _, status in opened)
    assert statuses == [200] * 32 + [429] * 8
    refused = [reader for reader, _, status in opened if status == 429]
    for reader in refused:
        assert await asyncio.wait_for(reader.read(), 2) == b""
    _, writer, status = await kept_alive(port, plain.other_container, f"/task/{plain.other_task}")
    assert status == 200
    writer.close()
    for reader, _, status in opened:
        if status == 200:
            assert await asyncio.wait_for(reader.read(), 15) == b""  # closed by the proxy
    for _, writer, _ in opened:
        writer.close()
    await assert_still_serving(proxy, plain)
