"""fednode's Kubernetes node beside vantage6-node 5.0.0a26, on one kube-apiserver with kwok.

What a vantage6 5 user would otherwise run on Kubernetes is the vantage6 5 node; this
measures it beside fednode on the same testbed in the same run, one node at a time (the
other idles), each node in its own process and its own namespace:

* **fednode**: a :class:`node.app.Node` with the Kubernetes executor (a child process of
  this script, acting as a ServiceAccount bound to the executor's Role), on a fresh
  vantage6-server 4.15.2 (``tests/peers``: fednode speaks the vantage6 4 protocol);
* **vantage6-node 5.0.0a26** (PyPI; the newest vantage6 5 installable here), started by
  ``benchmarks/v5stack/launch_node.py`` in the venv of ``scripts/v5stack-setup``, on
  vantage6-server 5.0.0a26 served by uWSGI+gevent (upstream's production mode) with
  sqlite, authenticating through ``benchmarks/v5stack/oidc_standin.py`` (a named fake of
  the few Keycloak endpoints a26 calls). It reaches the apiserver through its in-cluster
  configuration (``KUBERNETES_SERVICE_HOST``, a ServiceAccount token and the CA),
  acting as a ServiceAccount bound to a Role with what it needs in its task namespace
  (Pod Security ``privileged``: a26 mounts hostPath volumes).

Both run ``federated_compute`` tasks for one organization; kwok plays the kubelet and runs
every pod 1 s (no annotation: the testbed's default Stage), for both nodes alike. Every
pod of either node goes to a kwok node of this run's own (created at the start, tainted,
deleted at the end: the shared nodes hold 4 x 110 pods and other sessions' pods), through
fednode's ``node_selector``/``tolerations`` settings and, for a26, the launcher's
``--steer`` file (``benchmarks/v5stack/launch_node.py``), which also carries the kwok
annotations of the in-flight phase.

Every time comes from a peer, not from either node, on this machine's clock: *task
created* is the server's ``task.created_at``; *Job created* and *Pod Succeeded* are when
this process's own watches on the two namespaces (admin) receive the Job's ``ADDED`` and
the Pod's ``Succeeded``; *result at the server* is when the run's row in the server's
sqlite database first holds a final status (read every 20 ms, read-only: up to 20 ms late
for both alike).

Phases:

1. sequential: ``--runs`` tasks per node, one after another, alternating the nodes:
   task created → Job created (dispatch), Pod Succeeded → result at the server
   (completion);
2. bursts (``--bursts``, default 50; ``--bursts ""``: none): that many tasks created one
   after another as fast as each server takes them, per node: runs with no final status
   when the run ends (a26's completion poll hands over one result per poll and drops the
   others it deleted: its runs stay ``active``), time from the first task created to the
   last result, the most runs in flight at once (created, no final status yet), node RSS
   (peak, sampled every 0.2 s) and the requests each node made per run — counted in the
   node processes themselves (fednode: the executor's and server client's counters; a26:
   its Kubernetes client and ``requests`` sessions, wrapped by the launcher), because the
   apiserver's own metrics have no per-client label and the testbed is shared;
3. in flight (``--in-flight N``, issue 18's "RSS with 500 runs in flight"; off by
   default): N tasks per node created ``--create-concurrency`` (8) at a time, every pod
   they start held Running by kwok (annotation ``fednode.test/run-seconds: forever``)
   until every run has a Running pod, no new Job came for ``--stall-seconds`` or
   ``--hold-seconds`` passed; the node's RSS sampled every 0.5 s, and 20 times over 10 s
   at the top; then every held pod released at once (the annotation set to ``0``) and the
   runs' final statuses awaited: Jobs and Running pods reached (a26 starts runs one at a
   time: its rate is printed), RSS before / held / peak, dispatch and completion latency,
   runs with no final status, requests per run.

Tasks are created with direct POSTs on both sides (fednode's server: the body the
vantage6 4 client sends for an unencrypted collaboration, without its extra GETs of the
organization and the blob store's status per task), so creating is not what limits a
burst.

Prints median, p95 and max, and the ratio vantage6 5 / fednode for each.

    .venv/bin/python benchmarks/v5node_compare.py [--runs 20] [--bursts 50[,500]] \
        [--in-flight 500 [--hold-seconds 900] [--stall-seconds 60]]

Needs the Kubernetes testbed up (``scripts/k8s-testbed up``; this never starts or stops
it), ``scripts/v6server-setup`` and ``scripts/v5stack-setup`` (run here). Benchmark only:
not part of CI. It bounds every wait and stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.k8s_executor import PREFIX, Child  # noqa: E402
from benchmarks.stats import percentile, summary  # noqa: E402
from executors.base import LABEL_RUN  # noqa: E402
from executors.kubernetes.client import JOBS, PODS, KubeClient, Resource, connect  # noqa: E402
from testbed.kwok import POD_RUN_SECONDS  # noqa: E402

V5_VENV = Path(os.environ.get("V5_VENV", Path.home() / ".cache" / "fednode" / "v5" / "venv"))
HERE = Path(__file__).resolve().parent
STANDIN = HERE / "v5stack" / "oidc_standin.py"
LAUNCH = HERE / "v5stack" / "launch_node.py"
IMAGE = "localhost/fednode/bench-v5cmp:1"  # kwok never pulls it
REALM = "vantage6"
TOKEN_SECONDS = 300  # tokens from the stand-in live this long (Keycloak's default)
OPEN = {None, "", "pending", "initializing", "active"}
POLL_DB = 0.02
FEDNODE, V5 = "fednode", "vantage6-node 5.0.0a26"


def free_port() -> int:
    from tests.peers.stack import free_port as pick

    return pick()


def utc(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


# ---- what the peers saw -----------------------------------------------------------------


@dataclass
class Seen:
    """One side's runs as its server's database and the apiserver showed them."""

    db: Path
    created: dict[int, float] = field(default_factory=dict)  # run -> task.created_at
    task_of: dict[int, int] = field(default_factory=dict)
    final_at: dict[int, float] = field(default_factory=dict)
    status: dict[int, str] = field(default_factory=dict)
    job_added: dict[int, float] = field(default_factory=dict)
    pod_succeeded: dict[int, float] = field(default_factory=dict)
    pod_phase: dict[int, str] = field(default_factory=dict)  # the latest seen

    def runs_of(self, task_ids: set[int]) -> list[int]:
        return sorted(r for r, t in self.task_of.items() if t in task_ids)

    def in_flight(self) -> int:
        return sum(1 for r in self.task_of if r not in self.final_at)


def read_runs(db: Path, since: int) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return connection.execute(
            "SELECT run.id, run.task_id, run.status, task.created_at FROM run "
            "JOIN task ON run.task_id = task.id WHERE run.id >= ?",
            (since,),
        ).fetchall()
    finally:
        connection.close()


async def watch_database(seen: Seen) -> None:
    lowest = 0
    while True:
        with contextlib.suppress(sqlite3.OperationalError):  # locked for a moment
            rows = await asyncio.to_thread(read_runs, seen.db, lowest)
            now = time.time()
            for run_id, task_id, status, created_at in rows:
                seen.task_of[run_id] = task_id
                if created_at:
                    seen.created[run_id] = utc(created_at)
                if status not in OPEN and run_id not in seen.final_at:
                    seen.final_at[run_id] = now
                    seen.status[run_id] = status
            pending = [r for r in seen.task_of if r not in seen.final_at]
            lowest = min(pending) if pending else max(seen.task_of, default=0) + 1
        await asyncio.sleep(POLL_DB)


def run_id_of(obj: dict[str, Any]) -> int | None:
    """fednode labels its objects with the run; a26 annotates ``run_id`` on its Jobs and
    labels their pods ``app=run-<id>``."""
    meta = obj.get("metadata") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    for value in (labels.get(LABEL_RUN), notes.get("run_id")):
        if value and str(value).isdigit():
            return int(value)
    app = str(labels.get("app") or "")
    if app.startswith("run-") and app[4:].isdigit():
        return int(app[4:])
    return None


async def watch_kube(
    client: KubeClient, resource: Resource, namespace: str, seen: Seen, ready: asyncio.Event
) -> None:
    path = resource.path(namespace)
    listed = await client.get(path, query=(), what=f"list {resource.plural}")
    version = listed["metadata"]["resourceVersion"]
    while True:
        query = (
            ("watch", "true"),
            ("resourceVersion", version),
            ("timeoutSeconds", 3600),
            ("allowWatchBookmarks", "true"),
        )
        async with client.stream(
            path, query=query, read_timeout=3600, what=f"watch {resource.plural}"
        ) as lines:
            ready.set()
            async for line in lines:
                now = time.time()
                event = json.loads(line)
                obj = event.get("object") or {}
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                run_id = run_id_of(obj)
                if run_id is None or event.get("type") not in ("ADDED", "MODIFIED"):
                    continue
                if resource is JOBS:
                    seen.job_added.setdefault(run_id, now)
                    continue
                phase = (obj.get("status") or {}).get("phase") or "Pending"
                seen.pod_phase[run_id] = phase
                if phase == "Succeeded":
                    seen.pod_succeeded.setdefault(run_id, now)


# ---- where the pods go: the benchmark's own kwok node -----------------------------------


@dataclass(frozen=True)
class Placement:
    """A kwok node of this run's own, tainted: every pod of either node goes there, so the
    held pods of ``--in-flight`` neither fill the shared nodes (4 x 110 pods) nor meet
    other sessions' pods."""

    node: str
    node_selector: dict[str, str]
    tolerations: list[dict[str, str]]


async def own_kwok_node(client: KubeClient, stack: contextlib.AsyncExitStack) -> Placement:
    from testbed.kwok import NODE_SELECTOR_ANNOTATION

    tag = uuid.uuid4().hex[:6]
    name, key = f"kwok-v5cmp-{tag}", "fednode.bench/v5cmp"
    capacity = {"cpu": "512", "memory": "2Ti", "pods": "2000", "ephemeral-storage": "1Ti"}
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                key: tag,
            },
            "annotations": {NODE_SELECTOR_ANNOTATION: "fake"},
        },
        "spec": {"taints": [{"key": key, "value": tag, "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }
    await client.create("/api/v1/nodes", body, what="create the benchmark's kwok node")

    async def delete() -> None:
        with contextlib.suppress(Exception):
            await client.delete(f"/api/v1/nodes/{name}", what="delete the benchmark's node")

    stack.push_async_callback(delete)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        node = await client.get(f"/api/v1/nodes/{name}", what="get the benchmark's node")
        conditions = (node.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            toleration = {"key": key, "operator": "Equal", "value": tag, "effect": "NoSchedule"}
            return Placement(name, {key: tag}, [toleration])
        await asyncio.sleep(0.5)
    raise SystemExit(f"kwok did not make node {name} Ready within 60 s")


# ---- the two nodes ----------------------------------------------------------------------


@dataclass
class Side:
    """One node, its server and what was seen of it."""

    label: str
    seen: Seen
    process: subprocess.Popen[bytes] | asyncio.subprocess.Process
    log_path: Path
    create: Callable[[str], Any]  # async: tag -> task id
    counts: Callable[[], Any]  # async: -> Counter of the node's requests so far
    steer: Callable[[dict[str, str]], Any]  # async: kwok annotations for the next pods
    namespace: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def alive(self) -> bool:
        return (
            self.process.returncode is None
            if isinstance(self.process, asyncio.subprocess.Process)
            else self.process.poll() is None
        )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


# -- vantage6 5: stand-in Keycloak, a26 server under uWSGI, a26 node ----------------------


class V5Api:
    """The a26 server's REST API as its super user (a password token from the stand-in)."""

    def __init__(self, base: str, kc: str) -> None:
        self.base, self.kc = base, kc
        # uWSGI's HTTP router closes each connection after one answer (no --http-keepalive)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        self.token, self.logged_in = "", 0.0

    async def login(self) -> None:
        form = {
            "grant_type": "password",
            "client_id": "public_client",
            "username": "admin",
            "password": "admin",
        }
        async with self.session.post(
            f"{self.kc}/realms/{REALM}/protocol/openid-connect/token", data=form
        ) as response:
            response.raise_for_status()
            self.token = (await response.json())["access_token"]
        self.logged_in = time.monotonic()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if time.monotonic() - self.logged_in > TOKEN_SECONDS / 2:
            # a26 answers an expired token with 500 (its handler retries the request as a
            # container and reports that failure), so renew well before it expires
            await self.login()
        async with self.session.request(
            method,
            f"{self.base}/{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as response:
            text = await response.text()
            if response.status >= 300:
                raise SystemExit(f"a26 server: {method} {path} -> {response.status}: {text[:500]}")
            return json.loads(text) if text else None


def site_packages() -> Path:
    return next((V5_VENV / "lib").glob("python3*/site-packages"))


async def wait_http(
    url: str, seconds: float, what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(
                    f"{what} exited ({process.returncode}); its log ends:\n"
                    + "\n".join((await asyncio.to_thread(log.read_text)).splitlines()[-30:])
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise SystemExit(f"{what} did not answer {url} within {seconds:.0f} s")


def spawn(
    argv: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )


def a26_rules() -> list[dict[str, Any]]:
    """What a26 does in its task namespace: read it (``ensure_task_namespace``), a test
    pod, Jobs, their pods and logs, Secrets for task secrets."""
    verbs = ["create", "delete", "get", "list", "watch"]
    return [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": verbs},
        {"apiGroups": [""], "resources": ["pods", "pods/log", "secrets"], "verbs": verbs},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
    ]


async def start_v5(
    stack: contextlib.AsyncExitStack,
    workdir: Path,
    testbed: Any,
    apiserver_port: int,
    placement: Placement,
) -> Side:
    home = workdir / "v5"
    home.mkdir()
    kc_port, server_port = free_port(), free_port()
    kc_url = f"http://127.0.0.1:{kc_port}"
    python = str(V5_VENV / "bin" / "python")

    standin = spawn(
        [
            python,
            str(STANDIN),
            "--port",
            str(kc_port),
            "--state",
            str(home / "kc"),
            "--token-seconds",
            str(TOKEN_SECONDS),
        ],
        log=home / "standin.log",
    )
    stack.callback(stop_process, standin)
    await wait_http(
        f"{kc_url}/realms/{REALM}", 30, "the OIDC stand-in", standin, home / "standin.log"
    )

    db = home / "server.sqlite"
    config = {
        "description": "v5node_compare",
        "ip": "127.0.0.1",
        "port": server_port,
        "api_path": "/api",
        "uri": f"sqlite:///{db}",
        "allow_drop_all": False,
        "jwt_secret_key": uuid.uuid4().hex,
        "directories": {"log": str(home / "log"), "data": str(home / "data")},
        "logging": {
            "level": "WARNING",
            "file": "server.log",
            "use_console": True,
            "backup_count": 1,
            "max_size": 1024,
            "format": "%(asctime)s - %(name)-14s - %(levelname)-8s - %(message)s",
            "datefmt": "%Y-%m-%d %H:%M:%S",
        },
    }
    (home / "server.yaml").write_text(json.dumps(config))
    env = {
        **os.environ,
        "KEYCLOAK_URL": kc_url,
        "KEYCLOAK_REALM": REALM,
        "KEYCLOAK_ADMIN_USERNAME": "unused",
        "KEYCLOAK_ADMIN_PASSWORD": "unused",
        "KEYCLOAK_ADMIN_CLIENT": "v6-admin",
        "KEYCLOAK_ADMIN_CLIENT_SECRET": "admin-secret",
    }
    server = spawn(
        [
            str(V5_VENV / "bin" / "uwsgi"),
            "--http",
            f"127.0.0.1:{server_port}",
            "--gevent",
            "100",
            "--http-websockets",
            "--master",
            "--callable",
            "app",
            "--disable-logging",
            "--die-on-term",
            "--wsgi-file",
            str(site_packages() / "vantage6/server/wsgi.py"),
            "--pyargv",
            str(home / "server.yaml"),
        ],
        log=home / "server.log",
        env=env,
        cwd=home,
    )
    stack.callback(stop_process, server, signal_int=True)
    base = f"http://127.0.0.1:{server_port}/api"
    await wait_http(
        f"{base}/version", 120, "vantage6-server 5.0.0a26 (uWSGI)", server, home / "server.log"
    )

    api = V5Api(base, kc_url)
    stack.push_async_callback(api.session.close)
    await api.login()
    me = await api.call("GET", "user/me")
    root_org = (me.get("organization") or {}).get("id") or me.get("organization_id")
    org = await api.call("POST", "organization", {"name": f"v5cmp-{uuid.uuid4().hex[:6]}"})
    collab = await api.call(
        "POST",
        "collaboration",
        {
            "name": f"v5cmp-{uuid.uuid4().hex[:6]}",
            "organization_ids": [root_org, org["id"]],
            "encrypted": False,
        },
    )
    node_name = f"v5cmp-{uuid.uuid4().hex[:6]}"
    node = await api.call(
        "POST",
        "node",
        {"name": node_name, "collaboration_id": collab["id"], "organization_id": org["id"]},
    )
    session = await api.call(
        "POST",
        "session",
        {"name": f"s-{node_name}", "scope": "own", "collaboration_id": collab["id"]},
    )

    namespace = await testbed.create_namespace("v5cmp-a26", pod_security="privileged")
    stack.push_async_callback(testbed.delete_namespace, namespace)
    kubeconfig = await testbed.service_account_kubeconfig(namespace, "v6-node", rules=a26_rules())
    sa = home / "sa"
    sa.mkdir()
    kc = yaml.safe_load(kubeconfig.read_text())
    (sa / "token").write_text(kc["users"][0]["user"]["token"])
    (sa / "ca.crt").write_bytes(
        base64.b64decode(kc["clusters"][0]["cluster"]["certificate-authority-data"])
    )

    node_config = {
        "server_url": "http://127.0.0.1",
        "port": server_port,
        "api_path": "/api",
        "task_dir": str(home / "hostpath-tasks"),
        "task_namespace": namespace,
        "node_proxy_port": free_port(),
        "share_algorithm_logs": True,
        "encryption": {"enabled": False, "private_key": ""},
        "logging": {
            "level": "INFO",
            "file": "node.log",
            "use_console": True,
            "backup_count": 1,
            "max_size": 1024,
            "format": "%(asctime)s - %(name)-14s - %(levelname)-8s - %(message)s",
            "datefmt": "%Y-%m-%d %H:%M:%S",
            "loggers": [
                {"name": n, "level": "warning"}
                for n in (
                    "urllib3",
                    "requests",
                    "engineio.client",
                    "socketio.client",
                    "kubernetes.client.rest",
                )
            ],
        },
    }
    config_path = home / f"{node_name}.yaml"
    config_path.write_text(json.dumps(node_config))
    counts_file = home / "counts.json"
    steer_file = home / "steer.json"

    def write_steer(annotations: dict[str, str]) -> None:
        wanted = {
            "nodeSelector": placement.node_selector,
            "tolerations": placement.tolerations,
            "annotations": annotations,
        }
        tmp = steer_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted))
        tmp.replace(steer_file)

    write_steer({})
    node_env = {
        **os.environ,
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(apiserver_port),
        "V6_API_KEY": node["api_key"],
        "V6_NODE_NAME": node_name,
        "KEYCLOAK_URL": kc_url,
        "KEYCLOAK_REALM": REALM,
        "PROXY_SERVER_HOST": "http://127.0.0.1",
    }
    process = spawn(
        [
            python,
            str(LAUNCH),
            "--config",
            str(config_path),
            "--sa-dir",
            str(sa),
            "--dirs",
            str(home / "mnt"),
            "--task-root",
            str(home / "app-tasks"),
            "--counts",
            str(counts_file),
            "--steer",
            str(steer_file),
        ],
        log=home / "node.log",
        env=node_env,
        cwd=home,
    )
    stack.callback(stop_process, process)

    arguments = base64.b64encode(b'{"method": "bench"}').decode()

    async def create(tag: str) -> int:
        task = await api.call(
            "POST",
            "task",
            {
                "name": f"v5cmp-{tag}",
                "image": IMAGE,
                "method": "bench",
                "collaboration_id": collab["id"],
                "session_id": session["id"],
                "organizations": [{"id": org["id"], "arguments": arguments}],
                "action": "federated_compute",
            },
        )
        return int(task["id"])

    async def counts() -> Counter[str]:
        with contextlib.suppress(OSError, ValueError):
            return Counter(json.loads(await asyncio.to_thread(counts_file.read_text)))
        return Counter()

    async def steer(annotations: dict[str, str]) -> None:
        await asyncio.to_thread(write_steer, annotations)

    return Side(V5, Seen(db), process, home / "node.log", create, counts, steer, namespace)


def stop_process(process: subprocess.Popen[bytes], *, signal_int: bool = False) -> None:
    if process.poll() is None:
        if signal_int:
            process.send_signal(2)  # uWSGI's master stops its workers on SIGINT
        else:
            process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


# -- fednode: vantage6-server 4.15.2, the node in a child process -------------------------


async def start_fednode(
    stack: contextlib.AsyncExitStack,
    workdir: Path,
    testbed: Any,
    max_runs: int,
    placement: Placement,
) -> Side:
    from tests.integration.k8s_executor_helpers import chart_network_policies, task_volume
    from tests.peers import v6server
    from tests.peers.stack import server_with_collaboration

    # Its first start (tables, rules, roles) takes ~60 s at a load average of 25 on two
    # cores; the tests' 60 s limit is for a quieter machine.
    v6server.START_TIMEOUT = max(v6server.START_TIMEOUT, 300.0)

    peers = stack.enter_context(server_with_collaboration(workdir, prefix="v5cmp"))
    server, collab = peers.server, peers.collaboration
    org = collab.org_a
    namespace = await testbed.create_namespace("v5cmp-fednode")
    stack.push_async_callback(testbed.delete_namespace, namespace)
    node_name = f"fednode-v5cmp-{uuid.uuid4().hex[:6]}"
    proxy_port = free_port()
    admin = await stack.enter_async_context(testbed.api_client())
    # as the chart: the runs' policies and the claim of the task directory
    rules = await chart_network_policies(admin, namespace, node_name, proxy_port=proxy_port)
    await stack.enter_async_context(task_volume(admin, namespace))
    kubeconfig = await testbed.service_account_kubeconfig(namespace, rules=rules)
    task_dir = workdir / "fednode-tasks"
    task_dir.mkdir()
    settings = {
        "name": node_name,
        "server_url": f"http://{server.host}",
        "port": server.port,
        "api_path": server.api_path,
        "api_key": org.api_key,
        "task_dir": str(task_dir),
        "databases": [],
        "executor": {
            "kind": "kubernetes",
            "kubeconfig": str(kubeconfig),
            "namespace": namespace,
            "proxy_namespace": namespace,
            "proxy_port": proxy_port,
            "node_selector": placement.node_selector,
            "tolerations": placement.tolerations,
        },
        "proxy": {"port": proxy_port},
        "health": {"port": free_port()},
        "max_concurrent_runs": max_runs,
        "policies": {"resources": {"default_cpu": 0.01, "default_memory_mb": 16}},
    }
    log_path = workdir / "fednode.log"
    log = log_path.open("wb")
    stack.callback(log.close)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--role",
        "fednode",
        "--settings",
        json.dumps(settings),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        limit=2**24,
    )
    stack.push_async_callback(finish_child, process)
    child = Child(process, "fednode node")  # the ``@@ KIND {json}`` protocol of k8s_executor
    await child.expect("READY", within=120)

    # Tasks are POSTed directly, as the a26 ones (the vantage6 4 client would add a GET of
    # the organization and of the blob store's status per task): the body it would send
    # for an unencrypted collaboration (input: base64 of the JSON).
    session = aiohttp.ClientSession()
    stack.push_async_callback(session.close)
    async with session.post(
        f"{server.api_url}/token/user",
        json={"username": server.root_username, "password": server.root_password},
    ) as response:
        response.raise_for_status()
        token = (await response.json())["access_token"]
    headers = {"Authorization": f"Bearer {token}"}

    async def create(tag: str) -> int:
        body = {
            "name": f"v5cmp-{tag}",
            "image": IMAGE,
            "description": "",
            "collaboration_id": collab.id,
            "organizations": [
                {
                    "id": org.id,
                    "input": base64.b64encode(json.dumps({"tag": tag}).encode()).decode(),
                }
            ],
            "databases": [],  # as the a26 tasks: no database
        }
        async with session.post(f"{server.api_url}/task", json=body, headers=headers) as response:
            text = await response.text()
            if response.status >= 300:
                raise SystemExit(f"4.15.2 server: POST task -> {response.status}: {text[:500]}")
            return int(json.loads(text)["id"])

    async def counts() -> Counter[str]:
        child.tell("COUNTS")
        return Counter(await child.expect("COUNTS", within=30))

    async def steer(annotations: dict[str, str]) -> None:
        child.tell(f"STEER {json.dumps(annotations)}")
        await child.expect("STEERED", within=30)

    db = server.workdir / "v6.sqlite"
    return Side(FEDNODE, Seen(db), process, log_path, create, counts, steer, namespace)


async def finish_child(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        assert process.stdin is not None
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()


async def fednode_child(settings_json: str) -> None:
    """The fednode node, in its own process so that its RSS and requests are its own."""
    from executors.base import ExecutorContext
    from executors.kubernetes.config import KubernetesSettings
    from executors.kubernetes.executor import KubernetesExecutor
    from executors.spec import RunSpec
    from node.app import Node
    from node.logging import configure_logging
    from node.server.rest import ServerClient
    from node.settings import load_settings

    configure_logging(
        level=os.environ.get("V5CMP_NODE_LOG", "WARNING"), fmt="json", stream=sys.stderr
    )
    raw = json.loads(settings_json)
    settings = load_settings(None, **raw)
    server_calls: Counter[str] = Counter()
    request = ServerClient.request

    async def counted(self: ServerClient, method: str, path: str, **kwargs: Any) -> Any:
        server_calls[f"http {method.upper()}"] += 1
        return await request(self, method, path, **kwargs)

    ServerClient.request = counted  # type: ignore[method-assign]
    steering: dict[str, str] = {}

    class Steered(KubernetesExecutor):
        """Its runs' pods get the kwok annotations the referee asks for (testbed only)."""

        async def start(self, spec: RunSpec) -> None:
            if steering:
                spec = spec.model_copy(update={"annotations": {**spec.annotations, **steering}})
            await super().start(spec)

    executor = Steered(
        KubernetesSettings.model_validate(raw["executor"]),
        context=ExecutorContext(node_name=settings.name, task_dir=Path(raw["task_dir"])),
    )
    node = Node(settings, executor=executor)
    stop = asyncio.Event()
    serving = asyncio.create_task(node.run(stop))
    await asyncio.wait_for(node.ready.wait(), 120)
    assert node.state.socket is not None
    await asyncio.wait_for(node.state.socket.connected.wait(), 60)
    print(f"{PREFIX}READY {{}}", flush=True)
    loop = asyncio.get_running_loop()
    while word := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        if word == "COUNTS":
            kube = {f"kube {k}": v for k, v in executor.requests.items()}
            print(f"{PREFIX}COUNTS {json.dumps({**kube, **server_calls})}", flush=True)
        elif word.startswith("STEER "):
            steering.clear()
            steering.update(json.loads(word[6:]))
            print(f"{PREFIX}STEERED {{}}", flush=True)
    stop.set()
    await asyncio.wait_for(serving, 60)


# ---- phases -----------------------------------------------------------------------------


async def wait_final(seen: Seen, task_ids: set[int], *, seconds: float, quiet: float) -> None:
    """Until every run of ``task_ids`` has a final status, ``seconds`` pass, or nothing
    changed for ``quiet`` seconds once every run's pod had succeeded (a run whose result
    a node dropped never ends)."""
    deadline = time.monotonic() + seconds
    last, changed = -1, time.monotonic()
    while time.monotonic() < deadline:
        runs = seen.runs_of(task_ids)
        done = sum(1 for r in runs if r in seen.final_at)
        if runs and len(runs) >= len(task_ids) and done == len(runs):
            return
        if done != last:
            last, changed = done, time.monotonic()
        pods_done = runs and all(r in seen.pod_succeeded for r in runs)
        if pods_done and time.monotonic() - changed > quiet:
            return
        await asyncio.sleep(0.05)


@dataclass
class Sample:
    runs: list[int]
    tasks: int
    seconds: float = 0.0  # first created -> last result
    create_seconds: float = 0.0
    in_flight_peak: int = 0
    rss_before: float = 0.0
    rss_peak: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)

    def dispatch(self, seen: Seen) -> list[float]:
        return [
            (seen.job_added[r] - seen.created[r]) * 1000
            for r in self.runs
            if r in seen.job_added and r in seen.created
        ]

    def completion(self, seen: Seen) -> list[float]:
        return [
            (seen.final_at[r] - seen.pod_succeeded[r]) * 1000
            for r in self.runs
            if r in seen.final_at and r in seen.pod_succeeded
        ]

    def lost(self, seen: Seen) -> int:
        return self.tasks - sum(1 for r in self.runs if r in seen.final_at)


async def sequential(sides: list[Side], runs: int) -> dict[str, Sample]:
    tasks: dict[str, set[int]] = {side.label: set() for side in sides}
    for i in range(runs):
        for side in sides:
            task_id = await side.create(f"seq-{i}")
            tasks[side.label].add(task_id)
            await wait_final(side.seen, {task_id}, seconds=60, quiet=10)
    return {side.label: Sample(side.seen.runs_of(tasks[side.label]), runs) for side in sides}


async def burst(side: Side, size: int) -> Sample:
    seen = side.seen
    sample = Sample([], size, rss_before=side.rss_mib())
    sample.rss_peak = sample.rss_before
    before = await side.counts()
    in_flight_base = seen.in_flight()

    async def sampler() -> None:
        while True:
            with contextlib.suppress(OSError):
                sample.rss_peak = max(sample.rss_peak, side.rss_mib())
            sample.in_flight_peak = max(sample.in_flight_peak, seen.in_flight() - in_flight_base)
            await asyncio.sleep(0.2)

    sampling = asyncio.create_task(sampler())
    began = time.monotonic()
    task_ids = {await side.create(f"burst{size}-{i}") for i in range(size)}
    sample.create_seconds = time.monotonic() - began
    await wait_final(seen, task_ids, seconds=120 + 3 * size, quiet=30)
    sampling.cancel()
    await asyncio.gather(sampling, return_exceptions=True)
    after = await side.counts()
    after.subtract(before)
    sample.requests = +after
    sample.runs = seen.runs_of(task_ids)
    created = [seen.created[r] for r in sample.runs if r in seen.created]
    finals = [seen.final_at[r] for r in sample.runs if r in seen.final_at]
    if created and finals:
        sample.seconds = max(finals) - min(created)
    return sample


@dataclass
class Held:
    """The ``--in-flight`` phase of one node: runs held Running, the node's RSS meanwhile."""

    wanted: int
    runs: list[int] = field(default_factory=list)
    create_seconds: float = 0.0
    hold_seconds: float = 0.0  # first task created -> release
    jobs_at_release: int = 0
    running_at_release: int = 0
    open_at_release: int = 0  # runs with no final status at their server
    jobs_over_time: list[tuple[float, int]] = field(default_factory=list)
    rss_before: float = 0.0
    rss_held: list[float] = field(default_factory=list)  # sampled while held at the top
    rss_peak: float = 0.0
    release_seconds: float = 0.0  # release -> last result (or the wait's end)
    requests: Counter[str] = field(default_factory=Counter)
    sample: Sample | None = None


HOLD = {POD_RUN_SECONDS: "forever"}


async def release(client: KubeClient, namespace: str, seen: Seen, runs: set[int]) -> int:
    """Tell kwok to end every held pod of ``runs`` now (annotation ``forever`` -> ``0``:
    its Stage that ends a pod matches again, with no delay); returns how many."""
    listed = await client.get(PODS.path(namespace), query=(), what="list pods")
    names = [
        pod["metadata"]["name"]
        for pod in listed.get("items") or []
        if run_id_of(pod) in runs
        and (pod["metadata"].get("annotations") or {}).get(POD_RUN_SECONDS) == "forever"
    ]
    gate = asyncio.Semaphore(16)

    async def one(name: str) -> None:
        async with gate:
            with contextlib.suppress(Exception):  # gone meanwhile
                await client.merge_patch(
                    PODS.path(namespace, name),
                    {"metadata": {"annotations": {POD_RUN_SECONDS: "0"}}},
                    what="release a held pod",
                )

    await asyncio.gather(*(one(name) for name in names))
    return len(names)


async def in_flight(side: Side, client: KubeClient, size: int, args: argparse.Namespace) -> Held:
    """``size`` tasks created ``--create-concurrency`` at a time, every pod held Running
    (kwok), until each run has its Job or no new Job came for ``--stall-seconds`` (or
    ``--hold-seconds`` passed); RSS sampled every 0.5 s meanwhile; then every pod released
    at once and the runs' final statuses awaited."""
    seen = side.seen
    held = Held(size, rss_before=side.rss_mib())
    held.rss_peak = held.rss_before
    before = await side.counts()
    await side.steer(HOLD)
    task_ids: set[int] = set()
    phase_runs: set[int] = set()
    holding = True
    began = time.monotonic()

    async def sampler() -> None:
        while True:
            with contextlib.suppress(OSError):
                rss = side.rss_mib()
                held.rss_peak = max(held.rss_peak, rss)
            phase_runs.update(seen.runs_of(task_ids))
            jobs = sum(1 for r in phase_runs if r in seen.job_added)
            if holding:
                held.jobs_over_time.append((time.monotonic() - began, jobs))
            await asyncio.sleep(0.5)

    sampling = asyncio.create_task(sampler())
    gate = asyncio.Semaphore(args.create_concurrency)

    async def create(i: int) -> None:
        async with gate:
            task_ids.add(await side.create(f"held{size}-{i}"))

    await asyncio.gather(*(create(i) for i in range(size)))
    held.create_seconds = time.monotonic() - began
    print(
        f"  {side.label}: {size} tasks created in {held.create_seconds:.1f} s; holding ...",
        flush=True,
    )
    last_jobs, last_change = -1, time.monotonic()
    while time.monotonic() - began < args.hold_seconds:
        runs = seen.runs_of(task_ids)
        jobs = sum(1 for r in runs if r in seen.job_added)
        running = sum(1 for r in runs if seen.pod_phase.get(r) == "Running")
        if jobs != last_jobs:
            last_jobs, last_change = jobs, time.monotonic()
        if running >= size or time.monotonic() - last_change > args.stall_seconds:
            break
        await asyncio.sleep(0.5)
    for _ in range(20):  # the node's RSS at the top, over 10 s
        with contextlib.suppress(OSError):
            held.rss_held.append(side.rss_mib())
        await asyncio.sleep(0.5)
    runs = seen.runs_of(task_ids)
    held.jobs_at_release = sum(1 for r in runs if r in seen.job_added)
    held.running_at_release = sum(1 for r in runs if seen.pod_phase.get(r) == "Running")
    held.open_at_release = sum(1 for r in runs if r not in seen.final_at)
    held.hold_seconds = time.monotonic() - began
    holding = False
    await side.steer({})  # runs started from now on run 1 s
    released_at = time.monotonic()
    count = await release(client, side.namespace, seen, set(runs))
    print(
        f"  {side.label}: {held.jobs_at_release} Jobs, {held.running_at_release} pods Running "
        f"after {held.hold_seconds:.0f} s; released {count}; waiting for the results ...",
        flush=True,
    )
    await wait_final(seen, task_ids, seconds=args.hold_seconds + 60, quiet=60)
    held.release_seconds = time.monotonic() - released_at
    sampling.cancel()
    await asyncio.gather(sampling, return_exceptions=True)
    after = await side.counts()
    after.subtract(before)
    held.requests = +after
    held.runs = seen.runs_of(task_ids)
    held.sample = Sample(held.runs, size)
    return held


# ---- report -----------------------------------------------------------------------------


def ratio_line(title: str, fed: list[float], v5: list[float]) -> str:
    if not fed or not v5:
        return f"    {title:<34} (no ratio: a side has no samples)"
    parts = [
        f"{name} {pick(v5) / max(pick(fed), 1e-3):.1f}x"
        for name, pick in (
            ("median", statistics.median),
            ("p95", lambda v: percentile(v, 0.95)),
            ("max", max),
        )
    ]
    return f"    {title:<34} vantage6 5 / fednode: " + ", ".join(parts)


def report_latency(title: str, samples: dict[str, Sample], sides: list[Side]) -> None:
    print(f"\n== {title} ==")
    for side in sides:
        sample, seen = samples[side.label], side.seen
        statuses = Counter(seen.status.get(r, "(none)") for r in sample.runs)
        print(f"  {side.label}:")
        print(summary("task created -> Job created", sample.dispatch(seen), width=34, indent=4))
        print(
            summary(
                "Pod Succeeded -> result at server", sample.completion(seen), width=34, indent=4
            )
        )
        print(
            f"    runs with no final status {sample.lost(seen)} of {sample.tasks}; "
            f"statuses {dict(statuses)}"
        )
    if len(sides) == 2:
        fed, v5 = (samples[s.label] for s in sides)
        fseen, vseen = (s.seen for s in sides)
        print(ratio_line("dispatch", fed.dispatch(fseen), v5.dispatch(vseen)))
        print(ratio_line("completion", fed.completion(fseen), v5.completion(vseen)))


def report_burst(size: int, samples: dict[str, Sample], sides: list[Side]) -> None:
    report_latency(f"burst of {size} tasks per node", samples, sides)
    for side in sides:
        s = samples[side.label]
        n = max(1, s.tasks)
        kube = {k[5:]: v for k, v in s.requests.items() if k.startswith("kube ")}
        http = {k[5:]: v for k, v in s.requests.items() if k.startswith("http ")}
        print(
            f"  {side.label}: first task created -> last result {s.seconds:.1f} s (creating "
            f"took {s.create_seconds:.1f} s); most runs in flight at once {s.in_flight_peak}; "
            f"RSS before {s.rss_before:.0f} MiB, peak {s.rss_peak:.0f} MiB"
        )
        print(
            f"    Kubernetes API requests per run {sum(kube.values()) / n:.2f} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kube.items()))})"
        )
        print(
            f"    server requests per run {sum(http.values()) / n:.2f} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(http.items()))})"
        )


def report_in_flight(size: int, results: dict[str, Held], sides: list[Side]) -> None:
    samples = {label: held.sample for label, held in results.items() if held.sample}
    report_latency(f"{size} runs held in flight per node, then released at once", samples, sides)
    for side in sides:
        held = results[side.label]
        n = max(1, held.wanted)
        rss = held.rss_held or [0.0]
        ramp = [jobs for _, jobs in held.jobs_over_time]
        rate = ""
        if len(held.jobs_over_time) > 1 and ramp[-1] > 0:
            first = next(t for t, jobs in held.jobs_over_time if jobs > 0)
            last = next(t for t, jobs in held.jobs_over_time if jobs == ramp[-1])
            rate = f" ({ramp[-1]} Jobs from {first:.0f} s to {last:.0f} s: " + (
                f"{(ramp[-1] - 1) / (last - first):.2f} Jobs/s)" if last > first else "at once)"
            )
        print(
            f"  {side.label}: {held.wanted} tasks created in {held.create_seconds:.1f} s; at "
            f"release ({held.hold_seconds:.0f} s after the first): {held.jobs_at_release} Jobs, "
            f"{held.running_at_release} pods Running, {held.open_at_release} runs open at the "
            f"server{rate}"
        )
        per_run = (statistics.median(rss) - held.rss_before) / max(1, held.jobs_at_release)
        print(
            f"    RSS before {held.rss_before:.0f} MiB; with {held.jobs_at_release} Jobs held "
            f"median {statistics.median(rss):.0f} / p95 {percentile(rss, 0.95):.0f} / max "
            f"{max(rss):.0f} MiB ({len(rss)} samples; {per_run * 1024:.0f} KiB per held run); "
            f"peak over the phase {held.rss_peak:.0f} MiB"
        )
        print(f"    release -> last result (or the wait's end) {held.release_seconds:.1f} s")
        kube = {k[5:]: v for k, v in held.requests.items() if k.startswith("kube ")}
        http = {k[5:]: v for k, v in held.requests.items() if k.startswith("http ")}
        print(
            f"    Kubernetes API requests per run {sum(kube.values()) / n:.2f} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kube.items()))})"
        )
        print(
            f"    server requests per run {sum(http.values()) / n:.2f} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(http.items()))})"
        )
    if len(sides) == 2:
        fed, v5 = (results[s.label] for s in sides)
        fed_rss, v5_rss = (statistics.median(h.rss_held or [0.0]) for h in (fed, v5))
        print(
            f"  RSS held, median: fednode {fed_rss:.0f} MiB ({fed.jobs_at_release} Jobs) vs "
            f"vantage6 5 {v5_rss:.0f} MiB ({v5.jobs_at_release} Jobs)"
        )


# ---- driver -----------------------------------------------------------------------------


async def measure(args: argparse.Namespace, workdir: Path) -> None:
    from tests.peers.kubernetes import APISERVER_PORT, DEFAULT_KUBECONFIG, K8sTestbed

    testbed = K8sTestbed(kubeconfig=DEFAULT_KUBECONFIG, workdir=workdir)
    async with contextlib.AsyncExitStack() as stack:
        print(
            "starting vantage6 5.0.0a26 (stand-in Keycloak, server under uWSGI, node) ...",
            flush=True,
        )
        api = await connect(kubeconfig=DEFAULT_KUBECONFIG, context=None, max_connections=16)
        stack.push_async_callback(api.close)
        client = KubeClient(api, request_timeout=30)
        placement = await own_kwok_node(client, stack)
        print(f"every run's pod goes to this run's own kwok node {placement.node}", flush=True)
        v5 = await start_v5(stack, workdir, testbed, APISERVER_PORT, placement)
        print("starting vantage6-server 4.15.2 and fednode ...", flush=True)
        most = max([*args.bursts, args.in_flight, 50]) + 20
        fed = await start_fednode(stack, workdir, testbed, most, placement)
        sides = [fed, v5]
        watchers: list[asyncio.Task[None]] = []
        for side, namespace in ((fed, fed.namespace), (v5, v5.namespace)):
            watchers.append(asyncio.create_task(watch_database(side.seen)))
            for resource in (JOBS, PODS):
                ready = asyncio.Event()
                watchers.append(
                    asyncio.create_task(watch_kube(client, resource, namespace, side.seen, ready))
                )
                await asyncio.wait_for(ready.wait(), 30)

        async def cancel_watchers() -> None:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

        stack.push_async_callback(cancel_watchers)
        for side in sides:  # warm-up, not counted: up, connected, first run through
            task_id = await side.create("warm")
            await wait_final(side.seen, {task_id}, seconds=args.start_seconds, quiet=30)
            runs = side.seen.runs_of({task_id})
            if not runs or runs[0] not in side.seen.final_at or not side.alive():
                raise SystemExit(
                    f"{side.label}: NOT READY (warm-up task {task_id} has no "
                    f"final status); its log ({side.log_path}) ends:\n"
                    f"{side.log_tail()}"
                )
            print(
                f"{side.label}: up (pid {side.pid}), warm-up run {side.seen.status[runs[0]]}",
                flush=True,
            )
        print(f"\nsequential: {args.runs} tasks per node, alternating ...", flush=True)
        report_latency(
            f"sequential ({args.runs} tasks per node)", await sequential(sides, args.runs), sides
        )
        for size in args.bursts:
            samples = {}
            for side in sides:
                print(f"\nburst: {size} tasks for {side.label} ...", flush=True)
                samples[side.label] = await burst(side, size)
            report_burst(size, samples, sides)
        if args.in_flight:
            held: dict[str, Held] = {}
            for side in sides:
                print(f"\nin flight: {args.in_flight} runs held for {side.label} ...", flush=True)
                held[side.label] = await in_flight(side, client, args.in_flight, args)
            report_in_flight(args.in_flight, held, sides)
        for side in sides:
            print(f"\n{side.label}: still running at the end: {side.alive()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--bursts", type=lambda s: [int(x) for x in s.split(",") if x], default=[50]
    )
    parser.add_argument(
        "--in-flight", type=int, default=0, help="runs to hold in flight per node (0: skip)"
    )
    parser.add_argument("--create-concurrency", type=int, default=8)
    parser.add_argument("--hold-seconds", type=float, default=900)
    parser.add_argument("--stall-seconds", type=float, default=60)
    parser.add_argument("--start-seconds", type=float, default=180)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--role", choices=("referee", "fednode"), default="referee", help=argparse.SUPPRESS
    )
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "fednode":
        asyncio.run(fednode_child(args.settings))
        return
    status = subprocess.run(
        [str(REPO / "scripts" / "k8s-testbed"), "status"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    # The control plane and kwok are what this needs; the real worker may be down.
    needed = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
    healthy = {line.split()[1] for line in status.splitlines() if line.split()[:1] == ["OK"]}
    if missing := [name for name in needed if name not in healthy]:
        sys.exit(
            f"the Kubernetes testbed is not up ({', '.join(missing)} not healthy: "
            "scripts/k8s-testbed up); not starting it here: it is shared"
        )
    for script in ("v6server-setup", "v5stack-setup"):
        subprocess.run([str(REPO / "scripts" / script)], check=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="fednode-v5cmp-"))
    try:
        asyncio.run(measure(args, workdir))
    finally:
        print(f"load average after: {os.getloadavg()}; work directory {workdir}")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
