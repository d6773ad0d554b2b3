"""What the real worker is: its name, label and taint, addresses, ports, versions and paths.

``tests/peers/kubernetes.py`` imports the node name, label, toleration and address from
here, so a test pins its pods to the node the testbed really started.
"""

from __future__ import annotations

import os
from pathlib import Path

from testbed.layout import GO_CACHE, K8S_HOME, RUN_DIR, VERSION_DIR
from testbed.layout import PORTS as CONTROL_PLANE_PORTS

NODE_NAME = "fednode-worker-0"
REAL_LABEL = "fednode.test/real"  # value "true": pin a pod here with a nodeSelector
REAL_TAINT = {"key": "fednode.test/real-worker", "value": "true", "effect": "NoSchedule"}
REAL_TOLERATION = {
    "key": REAL_TAINT["key"],
    "operator": "Equal",
    "value": "true",
    "effect": "NoSchedule",
}

BRIDGE = "fednode0"
POD_SUBNET = "10.245.0.0/24"
NODE_IP = "10.245.0.1"  # the bridge's address: where pods reach the host
CILIUM_POD_CIDR = "10.245.1.0/24"  # Cilium's own router address only (pods use POD_SUBNET)
NATIVE_ROUTING_CIDR = "10.245.0.0/16"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"

PORTS = {
    "kubelet": 16250,
    "kubelet-healthz": 16248,
    "kube-proxy-healthz": 16256,
    "kube-proxy-metrics": 16249,
    "cilium-health": 16279,
    "apiserver-relay": CONTROL_PLANE_PORTS["kube-apiserver"],
}

#: Pinned versions of what is built beside kubernetes (the proxy serves these; see docs).
CILIUM_VERSION = "v1.15.19"
COREDNS_VERSION = "v1.14.3"
WORKER_KUBE_COMMANDS = ("kubelet", "kube-proxy")
WORKER_BINARIES = (*WORKER_KUBE_COMMANDS, "cilium-agent", "cilium-cni", "coredns")

PAUSE_IMAGE = "localhost/fednode/pause:1"
COREDNS_IMAGE = f"localhost/fednode/coredns:{COREDNS_VERSION.lstrip('v')}"
#: Podman images imported into containerd (FEDNODE_REAL_WORKER_IMAGES, comma separated,
#: overrides; images podman does not have are skipped with a note).
DEFAULT_IMAGES = (
    "localhost/fednode/python-base:latest",
    "localhost/fednode/average:latest",
    "localhost/fednode/diagnostics:latest",
)

WORKER_DIR = RUN_DIR / "worker"
CONTAINERD_ROOT = K8S_HOME / "containerd"  # image store, kept across down/up
CONTAINERD_SOCK = WORKER_DIR / "containerd.sock"
KUBELET_ROOT = WORKER_DIR / "kubelet"
CNI_BIN = WORKER_DIR / "cni-bin"
CNI_CONF = WORKER_DIR / "cni-conf"
CILIUM_STATE = Path("/var/run/cilium")  # cilium-cni only knows this socket path
CILIUM_LIB = WORKER_DIR / "cilium-lib"
MARKER = RUN_DIR / "real-worker.json"

CILIUM_WRAPPER = VERSION_DIR / "wrapper-cilium"
COREDNS_WRAPPER = VERSION_DIR / "wrapper-coredns"
#: The patched copy of the cilium module the wrapper builds from (``testbed.worker.build``).
CILIUM_SOURCE = CILIUM_WRAPPER / "cilium"
CILIUM_MODULE = GO_CACHE / "mod" / "github.com" / "cilium" / f"cilium@{CILIUM_VERSION}"

#: Debian packages the worker needs (binaries checked at `up`).
DEBIAN_PACKAGES = {
    "containerd": "/usr/bin/containerd",
    "runc": "/usr/sbin/runc",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "catatonit": "/usr/bin/catatonit",
    "iptables": "/usr/sbin/iptables",
    "ipset": "/usr/sbin/ipset",
    "conntrack": "/usr/sbin/conntrack",
    "socat": "/usr/bin/socat",
    "clang": "/usr/bin/clang",
    "llvm": "/usr/bin/llc",
    "bpftool": "/usr/sbin/bpftool",
    "iproute2": "/usr/sbin/ip",
    "podman": "/usr/bin/podman",
}

#: Kernel settings kubelet (protectKernelDefaults=false) and Cilium rewrite at start; `down`
#: puts back what was there before (kernel.unprivileged_bpf_disabled=1 is one-way: the
#: kernel refuses to lower it again).
HOST_SYSCTLS = (
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/timer_migration",
    "kernel/unprivileged_bpf_disabled",
    "net/core/bpf_jit_enable",
    "net/ipv4/conf/all/rp_filter",
    "net/ipv4/fib_multipath_use_neigh",
)


def enabled() -> bool:
    """Whether this testbed runs with the real worker (set by `up --real-worker`)."""
    return MARKER.is_file()


def wanted_from_env() -> bool:
    return os.environ.get("FEDNODE_REAL_WORKER", "") not in ("", "0", "false", "no")
