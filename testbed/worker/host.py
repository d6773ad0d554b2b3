"""What the real worker changes on the host, and how ``down`` undoes it.

Before start: the pod bridge with the node address, and the BPF filesystem Cilium pins its
maps in. After stop: containers and their network namespaces, mounts under the worker's
directory, the bridge and Cilium's links, the iptables chains kubelet, kube-proxy and
Cilium added (rule by rule), Cilium's pinned maps and state, the ``kubepods`` cgroups, and
the sysctls they rewrote. Every step is idempotent and ignores what is already gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from testbed.worker.images import ctr
from testbed.worker.layout import (
    BRIDGE,
    CILIUM_STATE,
    HOST_SYSCTLS,
    NODE_IP,
    POD_SUBNET,
    WORKER_DIR,
)
from testbed.worker.processes import containerd_ready


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


def kill_runtime_tasks() -> None:
    """Stop every container and sandbox containerd still runs (kubelet is gone by now)."""
    if not containerd_ready()[0]:
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


def _mounts_under(root: Path) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(f"{root}/"):
            mounts.append(point)
    return mounts


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


def undo_host_changes(sysctls: dict[str, str]) -> None:
    """Everything after the processes stopped: mounts, links, iptables, BPF, cgroups, sysctls."""
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
    for name, value in sysctls.items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / name).write_text(value)
