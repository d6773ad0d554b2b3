"""The real worker as a node: bring it up on a running control plane, report its health,
tear it down. The callers (``testbed.cluster``) hold the run lock."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from testbed.apiclient import api, api_patch
from testbed.console import fail, human, log
from testbed.layout import BIN_DIR
from testbed.pki import issue_client_cert, write_kubeconfig
from testbed.process import health_report as process_health
from testbed.process import start_healthy, stop
from testbed.records import read_json, write_json
from testbed.worker import config, host
from testbed.worker.images import import_images
from testbed.worker.layout import (
    CILIUM_LIB,
    CILIUM_MODULE,
    CILIUM_POD_CIDR,
    CNI_BIN,
    CNI_CONF,
    CONTAINERD_ROOT,
    DEBIAN_PACKAGES,
    DNS_SERVICE_IP,
    KUBELET_ROOT,
    MARKER,
    NODE_NAME,
    WORKER_BINARIES,
    WORKER_DIR,
)
from testbed.worker.processes import components

#: API paths of the kinds the manifests hold that are not namespaced /api/v1 plurals.
_KIND_PATHS = {
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
}
_PLURALS = {
    "Endpoints": "endpoints",
    "EndpointSlice": "endpointslices",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps",
    "Deployment": "deployments",
    "Pod": "pods",
}


def missing_prerequisites() -> list[str]:
    missing = [
        f"{pkg} ({path})" for pkg, path in DEBIAN_PACKAGES.items() if not Path(path).exists()
    ]
    missing += [
        f"{name} (scripts/k8s-testbed build --real-worker)"
        for name in WORKER_BINARIES
        if not (BIN_DIR / name).is_file()
    ]
    if not CILIUM_MODULE.joinpath("bpf").is_dir():
        missing.append(f"cilium's BPF sources in {CILIUM_MODULE} (build --real-worker)")
    return missing


def write_files() -> None:
    for directory in (
        WORKER_DIR,
        CNI_BIN,
        CNI_CONF,
        CONTAINERD_ROOT,
        KUBELET_ROOT,
        WORKER_DIR / "pod-logs",
        CILIUM_LIB,
    ):
        directory.mkdir(parents=True, exist_ok=True)
    (WORKER_DIR / "containerd.toml").write_text(config.containerd_config())
    for plugin in ("bridge", "host-local", "loopback", "portmap"):
        link = CNI_BIN / plugin
        link.unlink(missing_ok=True)
        link.symlink_to(f"/usr/lib/cni/{plugin}")
    (CNI_BIN / "cilium-cni").unlink(missing_ok=True)
    (CNI_BIN / "cilium-cni").symlink_to(BIN_DIR / "cilium-cni")
    (CILIUM_LIB / "bpf").unlink(missing_ok=True)
    (CILIUM_LIB / "bpf").symlink_to(CILIUM_MODULE / "bpf")
    (CNI_CONF / "10-fednode-worker.conflist").write_text(
        json.dumps(config.cni_config(with_cilium=True), indent=2)
    )
    # Pods with dnsPolicy Default get this; nothing outside the cluster resolves.
    (WORKER_DIR / "resolv.conf").write_text(f"nameserver {DNS_SERVICE_IP}\n")
    (WORKER_DIR / "kubelet.yaml").write_text(
        yaml.safe_dump(config.kubelet_config(), sort_keys=False)
    )
    (WORKER_DIR / "kube-proxy.yaml").write_text(
        yaml.safe_dump(config.kube_proxy_config(), sort_keys=False)
    )


def write_credentials() -> None:
    """Client certificates: kubelet as system:node, kube-proxy, Cilium (cluster admin)."""
    issue_client_cert("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
    issue_client_cert("kube-proxy", "system:kube-proxy", None)
    issue_client_cert("cilium", "fednode-testbed-cilium", "system:masters")
    for who in ("kubelet", "kube-proxy", "cilium"):
        write_kubeconfig(who)


def apply(obj: dict[str, Any]) -> None:
    """Create ``obj`` through the API, or replace what is there (idempotent)."""
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    if obj["kind"] in _KIND_PATHS:
        base = _KIND_PATHS[obj["kind"]]
    else:
        group_version = obj["apiVersion"]
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        plural = _PLURALS[obj["kind"]]
        base = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    try:
        api("POST", base, obj)
    except urllib.error.HTTPError as error:
        if error.code != 409:
            raise fail(
                f"creating {obj['kind']} {meta['name']}: {error.code} "
                f"{error.read().decode(errors='replace')[:300]}"
            ) from error
        current = api("GET", f"{base}/{meta['name']}")
        obj = {
            **obj,
            "metadata": {**meta, "resourceVersion": current["metadata"]["resourceVersion"]},
        }
        api("PUT", f"{base}/{meta['name']}", obj)


def cilium_crds() -> list[dict[str, Any]]:
    root = CILIUM_MODULE / "pkg" / "k8s" / "apis" / "cilium.io" / "client" / "crds"
    return [yaml.safe_load(path.read_text()) for path in sorted(root.glob("*/*.yaml"))]


def node() -> dict[str, Any] | None:
    try:
        return api("GET", f"/api/v1/nodes/{NODE_NAME}")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def node_problems() -> list[str]:
    try:
        current = node()
    except (OSError, ValueError) as error:
        return [f"cannot read node {NODE_NAME}: {error}"]
    if current is None:
        return [f"{NODE_NAME}: not registered"]
    ready = [c for c in current.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
    if not ready or ready[0]["status"] != "True":
        reason = ready[0].get("message", "") if ready else "no Ready condition"
        return [f"{NODE_NAME}: not Ready ({reason[:160]})"]
    return []


def wait_for(
    what: str, done: Callable[[], bool], *, within: float, log_file: Path, poll: float = 0.25
) -> None:
    limit = time.monotonic() + within
    while not done():
        if time.monotonic() > limit:
            raise fail(f"{what} within {within:.0f}s", log_file=log_file)
        time.sleep(poll)


def dns_ready() -> bool:
    try:
        pods = api("GET", "/api/v1/namespaces/kube-system/pods?labelSelector=k8s-app%3Dkube-dns")
    except (OSError, ValueError):
        return False
    for pod in pods.get("items", []):
        for condition in pod.get("status", {}).get("conditions", []):
            if condition["type"] == "Ready" and condition["status"] == "True":
                return True
    return False


def bring_up(started: float) -> None:
    """Start the worker on a running control plane (the caller holds the run lock)."""
    missing = missing_prerequisites()
    if missing:
        raise fail(
            "the real worker needs: "
            + "; ".join(missing)
            + " (apt-get install containerd runc containernetworking-plugins "
            "catatonit iptables ipset conntrack socat clang llvm; "
            "scripts/k8s-testbed build --real-worker)"
        )
    write_json(MARKER, {"node": NODE_NAME, "sysctls": host.read_sysctls(), "started": time.time()})
    write_files()
    write_credentials()
    host.ensure_bridge()
    host.mount_bpffs()
    by_name = {c.name: c for c in components()}

    def start(name: str) -> None:
        start_healthy(by_name[name])
        log(f"{name} healthy ({human(time.monotonic() - started)})")

    start("containerd")
    step = time.monotonic()
    imported = import_images()
    what = f"imported {', '.join(imported)}" if imported else "all current"
    log(f"images in containerd ({what}; {human(time.monotonic() - step)})")
    start("apiserver-relay")
    for obj in [*config.manifests("bootstrap.yaml"), *cilium_crds()]:
        apply(obj)
    start("kubelet")
    wait_for(
        "the real node did not register",
        lambda: node() is not None,
        within=60,
        log_file=by_name["kubelet"].log_file,
    )
    current = node() or {}
    if not current.get("spec", {}).get("podCIDR"):
        # Cilium's IPAM reads its router address range from here (pods use the bridge's).
        api_patch(
            f"/api/v1/nodes/{NODE_NAME}",
            {"spec": {"podCIDR": CILIUM_POD_CIDR, "podCIDRs": [CILIUM_POD_CIDR]}},
        )
    start("kube-proxy")
    start("cilium-agent")
    wait_for(
        "the real node did not become Ready",
        lambda: not node_problems(),
        within=90,
        log_file=by_name["kubelet"].log_file,
    )
    log(f"node {NODE_NAME} Ready ({human(time.monotonic() - started)})")
    for obj in config.manifests("dns.yaml"):
        apply(obj)
    wait_for(
        "CoreDNS did not become ready", dns_ready, within=90, log_file=by_name["kubelet"].log_file
    )
    log(f"cluster DNS ready ({human(time.monotonic() - started)})")


def health_report() -> list[tuple[str, bool, str]]:
    report = process_health(list(components()))
    if all(ok for _, ok, _ in report):
        problems = node_problems()
        report.append((f"node {NODE_NAME}", not problems, "; ".join(problems) or "Ready"))
    return report


def teardown() -> None:
    """Stop the worker and undo what it did to the host (idempotent)."""
    started = time.monotonic()
    record = read_json(MARKER)
    comps = {c.name: c for c in components()}
    for name in ("cilium-agent", "kube-proxy", "kubelet"):
        step = time.monotonic()
        stop(comps[name], grace=10)
        log(f"  {name} stopped ({human(time.monotonic() - step)})")
    step = time.monotonic()
    host.kill_runtime_tasks()
    log(f"  containers removed ({human(time.monotonic() - step)})")
    stop(comps["containerd"], grace=10)
    stop(comps["apiserver-relay"], grace=3)
    host.undo_host_changes(record.get("sysctls", {}))
    # The control plane may be gone already; the node object then goes with etcd's data.
    with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
        api("DELETE", f"/api/v1/nodes/{NODE_NAME}")
    MARKER.unlink(missing_ok=True)
    log(f"real worker stopped, host changes undone ({human(time.monotonic() - started)})")
