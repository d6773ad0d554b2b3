"""The files the real worker's processes read, and cilium-agent's flags.

The configurations and manifests live as templates in ``files/`` (containerd.toml,
kubelet.yaml, kube-proxy.yaml, bootstrap.yaml, dns.yaml); ``render`` fills their
``${NAME}`` placeholders from ``values()``, the worker's layout, so a path or address is
written in one place only.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import yaml

from testbed.layout import BIN_DIR, HOST, RUN_DIR
from testbed.worker.layout import (
    BRIDGE,
    CILIUM_LIB,
    CILIUM_STATE,
    CLUSTER_DOMAIN,
    CNI_BIN,
    CNI_CONF,
    CONTAINERD_ROOT,
    CONTAINERD_SOCK,
    COREDNS_IMAGE,
    DNS_SERVICE_IP,
    NATIVE_ROUTING_CIDR,
    NODE_IP,
    NODE_NAME,
    PAUSE_IMAGE,
    POD_SUBNET,
    PORTS,
    REAL_LABEL,
    REAL_TAINT,
    WORKER_DIR,
)

FILES = Path(__file__).parent / "files"


def values() -> dict[str, str]:
    """What the templates in ``files/`` may name as ``${NAME}``."""
    return {
        "HOST": HOST,
        "RUN_DIR": str(RUN_DIR),
        "WORKER_DIR": str(WORKER_DIR),
        "CONTAINERD_ROOT": str(CONTAINERD_ROOT),
        "CONTAINERD_SOCK": str(CONTAINERD_SOCK),
        "CNI_BIN": str(CNI_BIN),
        "CNI_CONF": str(CNI_CONF),
        "PAUSE_IMAGE": PAUSE_IMAGE,
        "COREDNS_IMAGE": COREDNS_IMAGE,
        "NODE_NAME": NODE_NAME,
        "NODE_IP": NODE_IP,
        "NATIVE_ROUTING_CIDR": NATIVE_ROUTING_CIDR,
        "DNS_SERVICE_IP": DNS_SERVICE_IP,
        "CLUSTER_DOMAIN": CLUSTER_DOMAIN,
        "REAL_LABEL": REAL_LABEL,
        "REAL_TAINT_KEY": REAL_TAINT["key"],
        "KUBELET_PORT": str(PORTS["kubelet"]),
        "KUBELET_HEALTHZ_PORT": str(PORTS["kubelet-healthz"]),
        "KUBE_PROXY_HEALTHZ_PORT": str(PORTS["kube-proxy-healthz"]),
        "KUBE_PROXY_METRICS_PORT": str(PORTS["kube-proxy-metrics"]),
        "RELAY_PORT": str(PORTS["apiserver-relay"]),
    }


def render(name: str) -> str:
    """``files/<name>`` with its placeholders filled (a placeholder not known is an error)."""
    return string.Template((FILES / name).read_text()).substitute(values())


def _yaml_object(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load(render(name))
    if not isinstance(loaded, dict):
        raise TypeError(f"{FILES / name} is not one YAML mapping")
    return loaded


def containerd_config() -> str:
    return render("containerd.toml")


def kubelet_config() -> dict[str, Any]:
    return _yaml_object("kubelet.yaml")


def kube_proxy_config() -> dict[str, Any]:
    return _yaml_object("kube-proxy.yaml")


def manifests(name: str) -> list[dict[str, Any]]:
    """The objects of the multi-document ``files/<name>`` (bootstrap.yaml, dns.yaml)."""
    return [obj for obj in yaml.safe_load_all(render(name)) if obj]


def cni_config(*, with_cilium: bool) -> dict[str, Any]:
    plugins: list[dict[str, Any]] = [
        {
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "dataDir": str(WORKER_DIR / "cni-ipam"),
                "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ]
    if with_cilium:
        plugins.append({"type": "cilium-cni", "chaining-mode": "generic-veth"})
    return {"cniVersion": "0.4.0", "name": "fednode-worker", "plugins": plugins}


def cilium_argv() -> list[str]:
    return [
        str(BIN_DIR / "cilium-agent"),
        f"--k8s-kubeconfig-path={RUN_DIR / 'cilium.kubeconfig'}",
        f"--lib-dir={CILIUM_LIB}",
        f"--state-dir={CILIUM_STATE}",
        "--bpf-root=/sys/fs/bpf",
        # behind the bridge plugin: Cilium enforces policy, the bridge does the plumbing
        "--cni-chaining-mode=generic-veth",
        "--cni-exclusive=false",
        "--write-cni-conf-when-ready=",
        "--routing-mode=native",
        f"--ipv4-native-routing-cidr={NATIVE_ROUTING_CIDR}",
        "--ipam=kubernetes",
        "--enable-ipv4=true",
        "--enable-ipv6=false",
        "--enable-ipv4-masquerade=false",
        "--enable-bpf-masquerade=false",
        "--kube-proxy-replacement=false",
        "--enable-l7-proxy=false",
        "--enable-health-checking=false",
        "--enable-endpoint-health-checking=false",
        "--enable-hubble=false",
        "--identity-allocation-mode=crd",
        "--enable-policy=default",
        f"--agent-health-port={PORTS['cilium-health']}",
        "--prometheus-serve-addr=",
        "--cluster-name=fednode-testbed",
        "--enable-local-redirect-policy=false",
        "--enable-bandwidth-manager=false",
        "--auto-direct-node-routes=false",
        "--log-driver=",
    ]
