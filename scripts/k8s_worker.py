"""A real worker node for the Kubernetes testbed: pods really run, NetworkPolicy really holds.

``scripts/k8s-testbed up --real-worker`` (or ``FEDNODE_REAL_WORKER=1``) adds one node,
``fednode-worker-0``, beside the kwok nodes. Everything on it is real and local:

* **containerd** (Debian) with **runc**, ``restrict_oom_score_adj = true`` (root has no
  CAP_SYS_RESOURCE here, so negative oom_score_adj values must be clamped to 0), the
  cgroupfs driver, and a **pause** image built here from Debian's static ``catatonit``;
* the **CNI** ``bridge`` + ``host-local`` plugins (Debian, ``/usr/lib/cni``): one bridge
  ``fednode0``, pods in ``10.245.0.0/24``, the bridge address ``10.245.0.1`` is the node IP;
* **kubelet** and **kube-proxy** (iptables mode: this kernel has no IPVS) built from the
  same pinned ``k8s.io/kubernetes`` module as the control plane;
* **Cilium** (built from its Go module; BPF compiled at run time by Debian's clang),
  chained behind the bridge plugin (``generic-veth``), as the NetworkPolicy enforcer.
  kube-router, the first choice, is not served by the module proxy here;
* **CoreDNS** (built from its Go module with only the plugins a cluster DNS needs) as a
  pod ``k8s-app=kube-dns`` in ``kube-system`` behind the ``kube-dns`` Service
  ``10.96.0.10``, answering ``cluster.local`` only: nothing is forwarded anywhere;
* a TCP relay ``10.245.0.1:16443 -> 127.0.0.1:16443`` so pods reach the API server the way
  they do on any node (the ``kubernetes`` Service points at it); the control plane itself
  still listens on loopback only.

The node carries the label ``fednode.test/real=true`` and the taint
``fednode.test/real-worker=true:NoSchedule``: only pods that ask for it land there, so
kwok-targeted tests are unaffected. kwok manages nodes by annotation only, and this node
has none.

Images come from the local podman store (``podman save`` -> ``ctr images import``), so
nothing is pulled; containerd's image store is kept between ``down`` and ``up`` under
``~/.cache/fednode/k8s/containerd`` and an image is imported again only when podman's
image id changed.

The module is imported by ``k8s_testbed.py`` (which it imports back for its helpers); it
does nothing on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import k8s_testbed as tb

# --------------------------------------------------------------------------------------
# What the worker is
# --------------------------------------------------------------------------------------

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
    "apiserver-relay": tb.PORTS["kube-apiserver"],
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

WORKER_DIR = tb.RUN_DIR / "worker"
CONTAINERD_ROOT = tb.K8S_HOME / "containerd"  # image store, kept across down/up
CONTAINERD_SOCK = WORKER_DIR / "containerd.sock"
KUBELET_ROOT = WORKER_DIR / "kubelet"
CNI_BIN = WORKER_DIR / "cni-bin"
CNI_CONF = WORKER_DIR / "cni-conf"
CILIUM_STATE = Path("/var/run/cilium")  # cilium-cni only knows this socket path
CILIUM_LIB = WORKER_DIR / "cilium-lib"
MARKER = tb.RUN_DIR / "real-worker.json"

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


# --------------------------------------------------------------------------------------
# build: kubelet + kube-proxy in the kubernetes wrapper; cilium and coredns in their own
# --------------------------------------------------------------------------------------

CILIUM_WRAPPER = tb.VERSION_DIR / "wrapper-cilium"
COREDNS_WRAPPER = tb.VERSION_DIR / "wrapper-coredns"

_COREDNS_MAIN = """\
// Generated by fednode scripts/k8s_worker.py; safe to delete.
// A cluster DNS with only what the testbed needs: no forwarding to anything upstream.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "cache", "kubernetes"}
}

func main() { coremain.Run() }
"""


#: This kernel has no loadable modules, so no /proc/modules, and cilium-agent stops at start
#: when it cannot read that file. The wrapper builds Cilium from a copy of its module (a
#: `replace` to a directory; the Go module cache itself is never touched) in which the one
#: function that reads the file treats a missing file as "nothing loaded" (the features it
#: looks for are built into this kernel; Cilium only logs a warning when it cannot find
#: them as modules). Go refuses `-overlay` replacements of module-cache files.
CILIUM_SOURCE = CILIUM_WRAPPER / "cilium"
_MODULES_FILE = Path("pkg/datapath/linux/modules/modules_linux.go")
_MODULES_OLD = """\
	fModules, err := os.Open(loadedModulesFilepath)
	if err != nil {
"""
_MODULES_NEW = """\
	fModules, err := os.Open(loadedModulesFilepath)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil // fednode testbed: a kernel built without loadable modules
	}
	if err != nil {
"""
CILIUM_PATCH = "fednode1"  # bump when the patch changes


def write_cilium_source() -> None:
    """The patched copy of the cilium module the wrapper builds from."""
    stamp = CILIUM_SOURCE / ".fednode-patch"
    if stamp.is_file() and stamp.read_text() == f"{CILIUM_VERSION}+{CILIUM_PATCH}":
        return
    shutil.rmtree(CILIUM_SOURCE, ignore_errors=True)
    shutil.copytree(cilium_module_dir(), CILIUM_SOURCE, symlinks=True)
    subprocess.run(["chmod", "-R", "u+w", str(CILIUM_SOURCE)], check=True)
    target = CILIUM_SOURCE / _MODULES_FILE
    text = target.read_text()
    if text.count(_MODULES_OLD) != 1:
        raise tb.fail(f"cannot patch {target}: the code that reads /proc/modules changed")
    target.write_text(text.replace(_MODULES_OLD, _MODULES_NEW))
    stamp.write_text(f"{CILIUM_VERSION}+{CILIUM_PATCH}")


def extra_targets(flags: tuple[str, ...]) -> list[tb.Target]:
    """The worker's binaries that are not built in the kubernetes wrapper."""
    cilium_ldflags = (
        f"-s -w -X github.com/cilium/cilium/pkg/version.ciliumVersion={CILIUM_VERSION.lstrip('v')}"
    )
    return [
        tb.Target(
            "cilium-agent",
            f"{CILIUM_VERSION}+{CILIUM_PATCH}",
            ("build", *flags, "-ldflags", cilium_ldflags, "github.com/cilium/cilium/daemon"),
            wrapper=CILIUM_WRAPPER,
        ),
        tb.Target(
            "cilium-cni",
            CILIUM_VERSION,
            ("build", *flags, "-ldflags", "-s -w", "github.com/cilium/cilium/plugins/cilium-cni"),
            wrapper=CILIUM_WRAPPER,
        ),
        tb.Target(
            "coredns",
            COREDNS_VERSION,
            ("build", *flags, "-ldflags", "-s -w", "."),
            wrapper=COREDNS_WRAPPER,
        ),
    ]


def prepare_wrappers(go: str, env: dict[str, str], todo: list[tb.Target]) -> None:
    """Write and resolve the cilium / coredns wrapper modules that ``todo`` needs."""
    wrappers = {t.wrapper for t in todo if t.wrapper in (CILIUM_WRAPPER, COREDNS_WRAPPER)}
    if CILIUM_WRAPPER in wrappers:
        CILIUM_WRAPPER.mkdir(parents=True, exist_ok=True)
        # Cilium's go.mod replaces only controller-tools (not built) and metallb (kept).
        (CILIUM_WRAPPER / "go.mod").write_text(
            "// Generated by fednode scripts/k8s_worker.py; safe to delete.\n"
            "module fednode.test/k8s-worker-cilium\n\ngo 1.23.0\n\n"
            f"require github.com/cilium/cilium {CILIUM_VERSION}\n\n"
            "replace (\n"
            "\tgithub.com/cilium/cilium => ./cilium\n"
            "\tgo.universe.tf/metallb => github.com/cilium/metallb "
            "v0.1.1-0.20220829170633-5d7dfb1129f7\n)\n"
        )
        (CILIUM_WRAPPER / "go.sum").unlink(missing_ok=True)
        step = time.monotonic()
        # The module must be in the cache before it can be copied.
        tb.run_logged(
            [go, "mod", "download", f"github.com/cilium/cilium@{CILIUM_VERSION}"],
            cwd=tb.CACHE,
            env=env,
            log_file=tb.BUILD_LOG_DIR / "cilium.log",
            what="downloading the cilium module",
        )
        write_cilium_source()
        tb.log(f"resolving the cilium {CILIUM_VERSION} wrapper module")
        tb.run_logged(
            [
                go,
                "get",
                f"github.com/cilium/cilium/daemon@{CILIUM_VERSION}",
                f"github.com/cilium/cilium/plugins/cilium-cni@{CILIUM_VERSION}",
            ],
            cwd=CILIUM_WRAPPER,
            env=env,
            log_file=tb.BUILD_LOG_DIR / "cilium.log",
            what="resolving the cilium wrapper module",
        )
        tb.log(f"  cilium wrapper resolved in {tb.human(time.monotonic() - step)}")
    if COREDNS_WRAPPER in wrappers:
        COREDNS_WRAPPER.mkdir(parents=True, exist_ok=True)
        (COREDNS_WRAPPER / "go.mod").write_text(
            "// Generated by fednode scripts/k8s_worker.py; safe to delete.\n"
            "module fednode.test/k8s-worker-coredns\n\ngo 1.25.0\n\n"
            f"require github.com/coredns/coredns {COREDNS_VERSION}\n"
        )
        (COREDNS_WRAPPER / "go.sum").unlink(missing_ok=True)
        (COREDNS_WRAPPER / "main.go").write_text(_COREDNS_MAIN)
        step = time.monotonic()
        tb.log(f"resolving the coredns {COREDNS_VERSION} wrapper module")
        tb.run_logged(
            [go, "mod", "tidy"],
            cwd=COREDNS_WRAPPER,
            env=env,
            log_file=tb.BUILD_LOG_DIR / "coredns.log",
            what="resolving the coredns wrapper module",
        )
        tb.log(f"  coredns wrapper resolved in {tb.human(time.monotonic() - step)}")


def install_packages() -> None:
    """Install the Debian packages the worker runs on (as scripts/podman-setup does)."""
    missing = [pkg for pkg, path in DEBIAN_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise tb.fail(
            f"the real worker needs these Debian packages: {' '.join(missing)} "
            "(install them as root)"
        )
    tb.log(f"installing from Debian: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log_file = tb.BUILD_LOG_DIR / "apt.log"
    tb.run_logged(
        ["apt-get", "update", "-qq"],
        cwd=tb.CACHE,
        env=env,
        log_file=log_file,
        what="apt-get update",
    )
    tb.run_logged(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        cwd=tb.CACHE,
        env=env,
        log_file=log_file,
        what="apt-get install",
    )


def cilium_module_dir() -> Path:
    return tb.GO_CACHE / "mod" / "github.com" / "cilium" / f"cilium@{CILIUM_VERSION}"


# --------------------------------------------------------------------------------------
# images: OCI archives written here (pause, coredns) and podman's, into containerd
# --------------------------------------------------------------------------------------


def oci_archive(
    ref: str, files: dict[str, tuple[bytes, int]], *, entrypoint: list[str], user: str = ""
) -> bytes:
    """A one-layer OCI image archive (``ctr images import`` format) holding ``files``.

    ``files`` maps a path in the image to (content, mode). Directories are implied.
    """

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for directory in dirs:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(info)
        for path, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(content), mode
            layer.addfile(info, io.BytesIO(content))
    layer_bytes = layer_buf.getvalue()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": user, "Env": ["PATH=/"]},
            "rootfs": {"type": "layers", "diff_ids": [digest(layer_bytes)]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(layer_bytes),
                    "size": len(layer_bytes),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest(manifest),
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for blob in (layer_bytes, config, manifest):
            add("blobs/sha256/" + digest(blob).split(":", 1)[1], blob)
    return out.getvalue()


def ctr(
    *args: str, check: bool = True, timeout: float = 300, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        ["/usr/bin/ctr", "--address", str(CONTAINERD_SOCK), "-n", "k8s.io", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise tb.fail(
            f"ctr {' '.join(args[:3])} failed: "
            f"{result.stderr.decode(errors='replace').strip()[-800:]}"
        )
    return result


def import_images(extra: tuple[str, ...] = ()) -> list[str]:
    """Bring the pause, coredns and podman images (and ``extra`` ones) into containerd.

    Returns the references imported; an image is imported again only when podman's image
    id changed since (the ids are recorded beside containerd's store).
    """
    stamps_file = CONTAINERD_ROOT / "fednode-imported.json"
    stamps = tb.read_json(stamps_file)
    done: list[str] = []

    def local(ref: str, key: str, build: Callable[[], bytes]) -> None:
        if stamps.get(ref) == key:
            return
        ctr("images", "import", "--no-unpack=false", "-", stdin=build())
        stamps[ref] = key
        done.append(ref)

    catatonit = Path("/usr/bin/catatonit").read_bytes()
    local(
        PAUSE_IMAGE,
        hashlib.sha256(catatonit).hexdigest(),
        lambda: oci_archive(
            PAUSE_IMAGE,
            {"pause": (catatonit, 0o755)},
            entrypoint=["/pause", "-P"],
            user="65535:65535",
        ),
    )
    coredns = (tb.BIN_DIR / "coredns").read_bytes()
    local(
        COREDNS_IMAGE,
        hashlib.sha256(coredns).hexdigest(),
        lambda: oci_archive(COREDNS_IMAGE, {"coredns": (coredns, 0o755)}, entrypoint=["/coredns"]),
    )

    wanted = [
        i.strip() for i in os.environ.get("FEDNODE_REAL_WORKER_IMAGES", "").split(",") if i.strip()
    ] or list(DEFAULT_IMAGES)
    wanted += [ref for ref in extra if ref not in wanted]
    todo: list[str] = []
    for ref in wanted:
        found = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Id}}", ref],
            capture_output=True,
            text=True,
            check=False,
        )
        if found.returncode != 0:
            if ref in extra:
                raise tb.fail(f"podman has no image {ref}")
            tb.log(f"  note: podman has no {ref} (scripts/podman-setup builds it); not imported")
            continue
        if stamps.get(ref) != found.stdout.strip():
            todo.append(ref)
            stamps[ref] = found.stdout.strip()
    if todo:
        archive = WORKER_DIR / "podman-images.tar"
        subprocess.run(
            ["podman", "save", "-m", "--format", "docker-archive", "-o", str(archive), *todo],
            check=True,
            capture_output=True,
        )
        try:
            ctr("images", "import", str(archive), timeout=600)
        finally:
            archive.unlink(missing_ok=True)
        done += todo
    tb.write_json(stamps_file, stamps)
    return done


# --------------------------------------------------------------------------------------
# configuration files
# --------------------------------------------------------------------------------------


def containerd_config() -> str:
    return f"""\
# Generated by fednode scripts/k8s_worker.py
version = 2
root = "{CONTAINERD_ROOT}"
state = "{WORKER_DIR / "containerd"}"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{CONTAINERD_SOCK}"
[ttrpc]
  address = "{CONTAINERD_SOCK}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{WORKER_DIR / "containerd-opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE here: a negative oom_score_adj (sandboxes, Guaranteed pods) fails
  # every RunPodSandbox unless containerd clamps it to 0.
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_apparmor = true
  enable_selinux = false
  max_container_log_line_size = 65536
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{CNI_CONF}"
    max_conf_num = 1
"""


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


def kubelet_config() -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": PORTS["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": tb.HOST,
        "healthzPort": PORTS["kubelet-healthz"],
        # The API server calls kubelet (logs, exec) without a client certificate; kubelet
        # listens on the bridge address only.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",  # no systemd
        "cgroupRoot": "/",
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCK}",
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(WORKER_DIR / "resolv.conf"),
        "podLogsDir": str(WORKER_DIR / "pod-logs"),
        "registerNode": True,
        "registerWithTaints": [REAL_TAINT],
        "maxPods": 50,
        "podPidsLimit": 4096,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "200Mi",
            "nodefs.available": "2%",
            "imagefs.available": "2%",
            "nodefs.inodesFree": "2%",
        },
        "evictionPressureTransitionPeriod": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "nodeStatusReportFrequency": "1m",
        "syncFrequency": "10s",
        "fileCheckFrequency": "20s",
        "runtimeRequestTimeout": "2m",
        "shutdownGracePeriod": "0s",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "protectKernelDefaults": False,
        "makeIPTablesUtilChains": True,
        "localStorageCapacityIsolation": True,
        "containerLogMaxSize": "5Mi",
        "enableDebuggingHandlers": True,
        "logging": {"format": "text"},
    }


def kube_proxy_config() -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(tb.RUN_DIR / "kube-proxy.kubeconfig")},
        "hostnameOverride": NODE_NAME,
        "bindAddress": tb.HOST,
        "healthzBindAddress": f"{tb.HOST}:{PORTS['kube-proxy-healthz']}",
        "metricsBindAddress": f"{tb.HOST}:{PORTS['kube-proxy-metrics']}",
        "mode": "iptables",  # no IPVS in this kernel
        "clusterCIDR": NATIVE_ROUTING_CIDR,
        # Leave the conntrack sysctls and route_localnet as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        "nodePortAddresses": [f"{NODE_IP}/32"],
    }


def cilium_argv() -> list[str]:
    return [
        str(tb.BIN_DIR / "cilium-agent"),
        f"--k8s-kubeconfig-path={tb.RUN_DIR / 'cilium.kubeconfig'}",
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


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


@dataclass
class WorkerComponent(tb.Component):
    """A worker process; health is an HTTP URL or, when ``check`` is set, a callable."""

    check: Callable[[], tuple[bool, str]] | None = None
    cwd: Path | None = field(default=None)

    def healthy(self) -> tuple[bool, str]:
        if self.check is not None:
            return self.check()
        return super().healthy()


def _containerd_ready() -> tuple[bool, str]:
    if not CONTAINERD_SOCK.exists():
        return False, "no socket yet"
    result = subprocess.run(
        ["/usr/bin/ctr", "--address", str(CONTAINERD_SOCK), "version"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return result.returncode == 0, (result.stderr or result.stdout).strip()[-200:]


def _tcp_open(host: str, port: int) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        import socket

        try:
            with socket.create_connection((host, port), timeout=1):
                return True, "open"
        except OSError as error:
            return False, str(error)

    return check


def _http_json_healthy(url: str) -> Callable[[], tuple[bool, str]]:
    """kube-proxy answers /healthz with a JSON document, not "ok"."""

    def check() -> tuple[bool, str]:
        try:
            body = tb.http_get(url)
        except (OSError, ValueError) as error:
            return False, str(getattr(error, "reason", error))
        return '"healthy":true' in body.replace(" ", ""), body.strip()[:200]

    return check


def _http_ok(url: str) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        try:
            tb.http_get(url)
        except (OSError, ValueError) as error:
            return False, str(getattr(error, "reason", error))
        return True, "200"

    return check


def components() -> list[WorkerComponent]:
    b, run = tb.BIN_DIR, tb.RUN_DIR
    path_env = {"PATH": f"{CNI_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    return [
        WorkerComponent(
            "containerd",
            ["/usr/bin/containerd", "--config", str(WORKER_DIR / "containerd.toml")],
            "",
            timeout=30,
            env=path_env,
            check=_containerd_ready,
        ),
        WorkerComponent(
            "apiserver-relay",
            [
                "/usr/bin/socat",
                f"TCP-LISTEN:{PORTS['apiserver-relay']},bind={NODE_IP},fork,reuseaddr",
                f"TCP:{tb.HOST}:{tb.PORTS['kube-apiserver']}",
            ],
            "",
            timeout=10,
            check=_tcp_open(NODE_IP, PORTS["apiserver-relay"]),
        ),
        WorkerComponent(
            "kubelet",
            [
                str(b / "kubelet"),
                f"--config={WORKER_DIR / 'kubelet.yaml'}",
                f"--kubeconfig={run / 'kubelet.kubeconfig'}",
                f"--root-dir={KUBELET_ROOT}",
                f"--cert-dir={KUBELET_ROOT / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={REAL_LABEL}=true",
                "--v=1",
            ],
            f"http://{tb.HOST}:{PORTS['kubelet-healthz']}/healthz",
            timeout=90,
            env=path_env,
        ),
        WorkerComponent(
            "kube-proxy",
            [
                str(b / "kube-proxy"),
                f"--config={WORKER_DIR / 'kube-proxy.yaml'}",
                "--v=1",
            ],
            "",
            timeout=60,
            env=path_env,
            check=_http_json_healthy(f"http://{tb.HOST}:{PORTS['kube-proxy-healthz']}/healthz"),
        ),
        # Cilium's /healthz answers 200 with an empty body once the agent is up.
        WorkerComponent(
            "cilium-agent",
            cilium_argv(),
            "",
            timeout=180,
            env={**path_env, "K8S_NODE_NAME": NODE_NAME},
            check=_http_ok(f"http://{tb.HOST}:{PORTS['cilium-health']}/healthz"),
        ),
    ]


# --------------------------------------------------------------------------------------
# up
# --------------------------------------------------------------------------------------


def missing_prerequisites() -> list[str]:
    missing = [
        f"{pkg} ({path})" for pkg, path in DEBIAN_PACKAGES.items() if not Path(path).exists()
    ]
    missing += [
        f"{name} (scripts/k8s-testbed build --real-worker)"
        for name in WORKER_BINARIES
        if not (tb.BIN_DIR / name).is_file()
    ]
    if not cilium_module_dir().joinpath("bpf").is_dir():
        missing.append(f"cilium's BPF sources in {cilium_module_dir()} (build --real-worker)")
    return missing


def write_files() -> None:
    import yaml

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
    (WORKER_DIR / "containerd.toml").write_text(containerd_config())
    for plugin in ("bridge", "host-local", "loopback", "portmap"):
        link = CNI_BIN / plugin
        link.unlink(missing_ok=True)
        link.symlink_to(f"/usr/lib/cni/{plugin}")
    (CNI_BIN / "cilium-cni").unlink(missing_ok=True)
    (CNI_BIN / "cilium-cni").symlink_to(tb.BIN_DIR / "cilium-cni")
    (CILIUM_LIB / "bpf").unlink(missing_ok=True)
    (CILIUM_LIB / "bpf").symlink_to(cilium_module_dir() / "bpf")
    (CNI_CONF / "10-fednode-worker.conflist").write_text(
        json.dumps(cni_config(with_cilium=True), indent=2)
    )
    # Pods with dnsPolicy Default get this; nothing outside the cluster resolves.
    (WORKER_DIR / "resolv.conf").write_text(f"nameserver {DNS_SERVICE_IP}\n")
    (WORKER_DIR / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(), sort_keys=False))
    (WORKER_DIR / "kube-proxy.yaml").write_text(
        yaml.safe_dump(kube_proxy_config(), sort_keys=False)
    )


def write_credentials() -> None:
    """Client certificates: kubelet as system:node, kube-proxy, Cilium (cluster admin)."""
    tb.issue_client_cert("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
    tb.issue_client_cert("kube-proxy", "system:kube-proxy", None)
    tb.issue_client_cert("cilium", "fednode-testbed-cilium", "system:masters")
    for who in ("kubelet", "kube-proxy", "cilium"):
        path = tb.RUN_DIR / f"{who}.kubeconfig"
        path.write_text(
            tb.kubeconfig_text(who, cert=tb.PKI / f"{who}.crt", key=tb.PKI / f"{who}.key")
        )
        path.chmod(0o600)


def apply(obj: dict[str, Any]) -> None:
    """Create ``obj`` through the API, or replace what is there (idempotent)."""
    kind_paths = {
        "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
    }
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    if obj["kind"] in kind_paths:
        base = kind_paths[obj["kind"]]
    else:
        group_version = obj["apiVersion"]
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        plural = {
            "Endpoints": "endpoints",
            "EndpointSlice": "endpointslices",
            "Service": "services",
            "ServiceAccount": "serviceaccounts",
            "ConfigMap": "configmaps",
            "Deployment": "deployments",
            "Pod": "pods",
        }[obj["kind"]]
        base = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    try:
        tb.api("POST", base, obj)
    except urllib.error.HTTPError as error:
        if error.code != 409:
            raise tb.fail(
                f"creating {obj['kind']} {meta['name']}: {error.code} "
                f"{error.read().decode(errors='replace')[:300]}"
            ) from error
        current = tb.api("GET", f"{base}/{meta['name']}")
        obj = {
            **obj,
            "metadata": {**meta, "resourceVersion": current["metadata"]["resourceVersion"]},
        }
        tb.api("PUT", f"{base}/{meta['name']}", obj)


def bootstrap_objects() -> list[dict[str, Any]]:
    """RBAC for the worker's identities, the `kubernetes` endpoints, the DNS add-on."""
    relay = {"addresses": [NODE_IP]}
    dns_labels = {"k8s-app": "kube-dns"}
    corefile = (
        f"{CLUSTER_DOMAIN}:53 {{\n    errors\n    health :8080\n    ready :8181\n"
        f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{\n       pods insecure\n"
        f"       fallthrough in-addr.arpa\n    }}\n    cache 10\n}}\n"
        # Everything else: refused here, never forwarded (the testbed has no upstream)
        ".:53 {\n    errors\n}\n"
    )
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "fednode-testbed:nodes"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:node",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "fednode-testbed:kube-proxy"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:node-proxier",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "User",
                    "name": "system:kube-proxy",
                }
            ],
        },
        # The API server as pods see it: the `kubernetes` Service -> the relay on the node.
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"},
            },
            "subsets": [
                {
                    "addresses": [{"ip": NODE_IP}],
                    "ports": [
                        {"name": "https", "port": PORTS["apiserver-relay"], "protocol": "TCP"}
                    ],
                }
            ],
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {
                    "kubernetes.io/service-name": "kubernetes",
                    "endpointslice.kubernetes.io/managed-by": "fednode-testbed",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{**relay, "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": PORTS["apiserver-relay"], "protocol": "TCP"}],
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "fednode-testbed:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "fednode-testbed:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "fednode-testbed:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": dns_labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": dns_labels},
                "template": {
                    "metadata": {"labels": dns_labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "nodeSelector": {REAL_LABEL: "true"},
                        "tolerations": [REAL_TOLERATION],
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": COREDNS_IMAGE,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"containerPort": 53, "protocol": "UDP", "name": "dns"},
                                    {"containerPort": 53, "protocol": "TCP", "name": "dns-tcp"},
                                ],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 2,
                                },
                                "resources": {"limits": {"memory": "128Mi"}},
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": dns_labels},
            "spec": {
                "clusterIP": DNS_SERVICE_IP,
                "selector": dns_labels,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        },
    ]


def cilium_crds() -> list[dict[str, Any]]:
    import yaml

    root = cilium_module_dir() / "pkg" / "k8s" / "apis" / "cilium.io" / "client" / "crds"
    return [yaml.safe_load(path.read_text()) for path in sorted(root.glob("*/*.yaml"))]


def ensure_bridge() -> None:
    """The bridge and its address exist before any pod, so the relay can bind to them."""
    links = subprocess.run(
        ["ip", "-j", "addr", "show", "dev", BRIDGE], capture_output=True, text=True, check=False
    )
    if links.returncode != 0:
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        links = subprocess.run(
            ["ip", "-j", "addr", "show", "dev", BRIDGE], capture_output=True, text=True, check=True
        )
    addresses = [
        a["local"]
        for link in json.loads(links.stdout)
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    prefix = ipaddress.ip_network(POD_SUBNET).prefixlen
    if NODE_IP not in addresses:
        subprocess.run(["ip", "addr", "add", f"{NODE_IP}/{prefix}", "dev", BRIDGE], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)


def mount_bpffs() -> None:
    mounts = Path("/proc/self/mounts").read_text()
    if " /sys/fs/bpf bpf " not in mounts:
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)


def read_sysctls() -> dict[str, str]:
    return {
        name: (Path("/proc/sys") / name).read_text().strip()
        for name in HOST_SYSCTLS
        if (Path("/proc/sys") / name).exists()
    }


def node() -> dict[str, Any] | None:
    try:
        return tb.api("GET", f"/api/v1/nodes/{NODE_NAME}")
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
            raise tb.fail(f"{what} within {within:.0f}s", log_file=log_file)
        time.sleep(poll)


def dns_ready() -> bool:
    try:
        pods = tb.api("GET", "/api/v1/namespaces/kube-system/pods?labelSelector=k8s-app%3Dkube-dns")
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
        raise tb.fail(
            "the real worker needs: "
            + "; ".join(missing)
            + " (apt-get install containerd runc containernetworking-plugins "
            "catatonit iptables ipset conntrack socat clang llvm; "
            "scripts/k8s-testbed build --real-worker)"
        )
    tb.write_json(MARKER, {"node": NODE_NAME, "sysctls": read_sysctls(), "started": time.time()})
    write_files()
    write_credentials()
    ensure_bridge()
    mount_bpffs()
    by_name = {c.name: c for c in components()}

    def start(name: str) -> None:
        component = by_name[name]
        tb.wait_healthy(component, tb.start(component))
        tb.log(f"{name} healthy ({tb.human(time.monotonic() - started)})")

    start("containerd")
    step = time.monotonic()
    imported = import_images()
    what = f"imported {', '.join(imported)}" if imported else "all current"
    tb.log(f"images in containerd ({what}; {tb.human(time.monotonic() - step)})")
    start("apiserver-relay")
    for obj in [*bootstrap_objects()[:4], *cilium_crds()]:
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
        tb.api_patch(
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
    tb.log(f"node {NODE_NAME} Ready ({tb.human(time.monotonic() - started)})")
    for obj in bootstrap_objects()[4:]:
        apply(obj)
    wait_for(
        "CoreDNS did not become ready", dns_ready, within=90, log_file=by_name["kubelet"].log_file
    )
    tb.log(f"cluster DNS ready ({tb.human(time.monotonic() - started)})")


def health_report() -> list[tuple[str, bool, str]]:
    report = []
    for component in components():
        if tb.read_pid(component) is None:
            report.append((component.name, False, "not running"))
            continue
        ok, detail = component.healthy()
        report.append((component.name, ok, "healthy" if ok else f"unhealthy: {detail}"))
    if all(ok for _, ok, _ in report):
        problems = node_problems()
        report.append((f"node {NODE_NAME}", not problems, "; ".join(problems) or "Ready"))
    return report


# --------------------------------------------------------------------------------------
# down
# --------------------------------------------------------------------------------------


def _mounts_under(root: Path) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(f"{root}/"):
            mounts.append(point)
    return mounts


def _kill_runtime_tasks() -> None:
    """Stop every container and sandbox containerd still runs (kubelet is gone by now)."""
    if not _containerd_ready()[0]:
        return
    listed = ctr("tasks", "ls", "-q", check=False, timeout=30)
    tasks = listed.stdout.decode().split()
    for task in tasks:
        ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False, timeout=30)
    # containerd's CRI plugin deletes a task itself once it has exited.
    limit = time.monotonic() + 15
    while tasks and time.monotonic() < limit:
        time.sleep(0.1)
        tasks = ctr("tasks", "ls", "-q", check=False, timeout=30).stdout.decode().split()
    for task in tasks:
        ctr("tasks", "delete", "--force", task, check=False, timeout=30)
    for container in ctr("containers", "ls", "-q", check=False, timeout=30).stdout.decode().split():
        info = ctr("containers", "info", container, check=False, timeout=30)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            spec = json.loads(info.stdout)["Spec"]
            for namespace in spec["linux"]["namespaces"]:
                path = namespace.get("path", "")
                if namespace["type"] == "network" and path.startswith("/var/run/netns/cni-"):
                    subprocess.run(
                        ["ip", "netns", "delete", Path(path).name], capture_output=True, check=False
                    )
        ctr("containers", "rm", container, check=False, timeout=30)


def _iptables_chains_cleanup() -> None:
    """Remove the rules and chains kubelet, kube-proxy and Cilium left, rule by rule.

    Never a whole-table restore: podman (netavark) may be changing its own rules meanwhile.
    """
    ours = ("KUBE-", "CILIUM_")
    for family in ("iptables", "ip6tables"):
        for backend in ("nft", "legacy"):
            save, tool = f"{family}-{backend}-save", f"{family}-{backend}"
            if shutil.which(save) is None:
                continue
            dump = subprocess.run([save], capture_output=True, text=True, check=False).stdout
            table, chains, jumps = "", [], []
            for line in dump.splitlines():
                if line.startswith("*"):
                    table = line[1:]
                elif line.startswith(":") and line[1:].startswith(ours):
                    chains.append((table, line[1:].split()[0]))
                elif (
                    line.startswith("-A ")
                    and not line.split()[1].startswith(ours)
                    and any(f"-j {prefix}" in line for prefix in ours)
                ):
                    jumps.append((table, shlex.split(line)[1:]))
            for table, rule in jumps:
                subprocess.run(
                    [tool, "-w", "-t", table, "-D", *rule], capture_output=True, check=False
                )
            for verb in ("-F", "-X"):
                for table, chain in chains:
                    subprocess.run(
                        [tool, "-w", "-t", table, verb, chain], capture_output=True, check=False
                    )


def _remove_cgroups() -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "kubepods"
        if not top.is_dir():
            continue
        for directory in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def teardown() -> None:
    """Stop the worker and undo what it did to the host (idempotent)."""
    started = time.monotonic()
    record = tb.read_json(MARKER)
    comps = {c.name: c for c in components()}
    for name in ("cilium-agent", "kube-proxy", "kubelet"):
        step = time.monotonic()
        tb.stop(comps[name], grace=10)
        tb.log(f"  {name} stopped ({tb.human(time.monotonic() - step)})")
    step = time.monotonic()
    _kill_runtime_tasks()
    tb.log(f"  containers removed ({tb.human(time.monotonic() - step)})")
    tb.stop(comps["containerd"], grace=10)
    tb.stop(comps["apiserver-relay"], grace=3)
    for point in sorted(_mounts_under(WORKER_DIR), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    for link in (BRIDGE, "cilium_host", "cilium_net", "cilium_vxlan"):
        subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
    _iptables_chains_cleanup()
    bpf_globals = Path("/sys/fs/bpf/tc/globals")
    if bpf_globals.is_dir():
        for pinned in bpf_globals.glob("cilium_*"):
            pinned.unlink(missing_ok=True)
    shutil.rmtree(CILIUM_STATE, ignore_errors=True)
    _remove_cgroups()
    for name, value in record.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / name).write_text(value)
    with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
        tb.api("DELETE", f"/api/v1/nodes/{NODE_NAME}")
    MARKER.unlink(missing_ok=True)
    tb.log(f"real worker stopped, host changes undone ({tb.human(time.monotonic() - started)})")
