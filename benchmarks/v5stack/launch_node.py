"""Start vantage6-node 5.0.0a26 outside a pod, counting its Kubernetes and server requests.

Runs inside the v5 venv (``scripts/v5stack-setup``), never inside fednode's;
``benchmarks/v5node_compare.py`` starts it as a subprocess. It starts the node the way the
a26 wheel's own ``vantage6/dev_start.py`` does (``NodeContext(stem, True, config)`` and
``vantage6.node.run``; ``vnode-local start`` is broken in a26), after redirecting the
paths a26 hard-codes for a pod, because this machine is not one:

* the in-cluster ServiceAccount files (``kubernetes.config.incluster_config`` reads
  ``/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt}``; a26 has no kubeconfig
  path) → ``--sa-dir``; the apiserver address is the usual ``KUBERNETES_SERVICE_HOST`` /
  ``KUBERNETES_SERVICE_PORT`` environment;
* the context's ``/mnt/{log,data,config}`` → ``--dirs``;
* the node's task files root ``/app/tasks`` (``vantage6.node.globals.TASK_FILES_ROOT``,
  imported by name into ``k8s.run_io`` and ``k8s.session_manager``) → ``--task-root``.

None of these changes what the node does with a run. Steering (``--steer FILE``, the
testbed's side of the benchmark, not a26's): while that JSON file exists, every Job a26
creates gets its ``annotations``, ``nodeSelector`` and ``tolerations`` added to the pod
template before it is sent — the kwok annotations that decide how long the pod "runs",
and the benchmark's own kwok node — as fednode's runs get the same through its settings
and executor. The file is read at each Job creation, so the benchmark changes it between
phases. Counting: every request the
Kubernetes client sends (``RESTClientObject.request``: verb and resource, a watch counted
as ``WATCH``) and every HTTP request to the vantage6 server (``requests`` sessions, which
the module-level ``requests.get``/``patch`` the node uses go through) is tallied and
written as JSON to ``--counts`` twice a second, so the benchmark reads them while the node
runs.

    python launch_node.py --config node.yaml --sa-dir DIR --dirs DIR --task-root DIR \
        --counts FILE [--steer FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

COUNTS: Counter[str] = Counter()
LOCK = threading.Lock()


def kube_key(method: str, url: str, query: Any) -> str:
    """``"GET pods"``, ``"POST jobs"``, ``"WATCH pods"``, ``"GET pods/log"``..."""
    parts = [p for p in urlsplit(url).path.split("/") if p]
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2 :]
    else:  # cluster-scoped: /api/v1/namespaces/<name> and the like
        rest = parts[-2:-1] if len(parts) > 3 else parts[-1:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    watching = any(k == "watch" and v for k, v in (query or []))
    return f"kube {'WATCH' if watching else method} {resource}"


def steer(job: Any, path: Path | None) -> None:
    """Add the steering file's pod-template fields to a Job body (a dict by now)."""
    if path is None or not isinstance(job, dict):
        return
    try:
        wanted = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    template = job.setdefault("spec", {}).setdefault("template", {})
    meta = template.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), **wanted.get("annotations", {})}
    pod = template.setdefault("spec", {})
    if wanted.get("nodeSelector"):
        pod["nodeSelector"] = {**(pod.get("nodeSelector") or {}), **wanted["nodeSelector"]}
    if wanted.get("tolerations"):
        pod["tolerations"] = [*(pod.get("tolerations") or []), *wanted["tolerations"]]


def instrument(steer_path: Path | None) -> None:
    import requests
    from kubernetes.client import rest

    kube_request = rest.RESTClientObject.request

    def counted_kube(
        self: Any, method: str, url: str, query_params: Any = None, *a: Any, **kw: Any
    ) -> Any:
        key = kube_key(method, url, query_params)
        with LOCK:
            COUNTS[key] += 1
        if key == "kube POST jobs":
            steer(kw.get("body", a[1] if len(a) > 1 else None), steer_path)
        return kube_request(self, method, url, query_params, *a, **kw)

    rest.RESTClientObject.request = counted_kube

    session_request = requests.Session.request

    def counted_http(self: Any, method: str, url: str, *a: Any, **kw: Any) -> Any:
        with LOCK:
            COUNTS[f"http {method.upper()}"] += 1
        return session_request(self, method, url, *a, **kw)

    requests.Session.request = counted_http


def write_counts(path: Path) -> None:
    while True:
        with LOCK:
            data = json.dumps(dict(COUNTS))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(data)
        tmp.replace(path)
        time.sleep(0.5)


def redirect(args: argparse.Namespace) -> None:
    from kubernetes.config import incluster_config

    incluster_config.SERVICE_TOKEN_FILENAME = str(args.sa_dir / "token")
    incluster_config.SERVICE_CERT_FILENAME = str(args.sa_dir / "ca.crt")

    from vantage6.cli.context.node import NodeContext

    folders = {name: args.dirs / name for name in ("log", "data", "config")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    NodeContext.instance_folders = staticmethod(lambda *_a, **_k: dict(folders))

    import vantage6.node.globals as node_globals
    import vantage6.node.k8s.run_io as run_io
    import vantage6.node.k8s.session_manager as session_manager

    args.task_root.mkdir(parents=True, exist_ok=True)
    for module in (node_globals, run_io, session_manager):
        module.TASK_FILES_ROOT = str(args.task_root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--sa-dir", type=Path, required=True)
    parser.add_argument("--dirs", type=Path, required=True)
    parser.add_argument("--task-root", type=Path, required=True)
    parser.add_argument("--counts", type=Path, required=True)
    parser.add_argument("--steer", type=Path, help="JSON: pod-template fields for every Job")
    args = parser.parse_args()
    for name in ("KUBERNETES_SERVICE_HOST", "V6_API_KEY", "V6_NODE_NAME", "KEYCLOAK_URL"):
        if not os.environ.get(name):
            sys.exit(f"launch_node: set {name}")
    instrument(args.steer)
    redirect(args)
    threading.Thread(target=write_counts, args=(args.counts,), daemon=True).start()

    from vantage6.cli.context.node import NodeContext
    from vantage6.node import run

    ctx = NodeContext(
        args.config.stem, True, str(args.config), logger_prefix=f"{args.config.stem} | "
    )
    run(ctx)


if __name__ == "__main__":
    main()
