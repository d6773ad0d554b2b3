"""The real worker's processes: containerd, the API server relay, kubelet, kube-proxy and
cilium-agent, each with the health check that fits it."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from testbed.apiclient import http_get
from testbed.layout import BIN_DIR, HOST, RUN_DIR
from testbed.layout import PORTS as CONTROL_PLANE_PORTS
from testbed.process import Component
from testbed.worker.config import cilium_argv
from testbed.worker.layout import (
    CNI_BIN,
    CONTAINERD_SOCK,
    KUBELET_ROOT,
    NODE_IP,
    NODE_NAME,
    PORTS,
    REAL_LABEL,
    WORKER_DIR,
)

Check = Callable[[], tuple[bool, str]]


@dataclass
class WorkerComponent(Component):
    """A worker process; health is an HTTP URL or, when ``check`` is set, a callable."""

    check: Check | None = None

    def healthy(self) -> tuple[bool, str]:
        if self.check is not None:
            return self.check()
        return super().healthy()


def containerd_ready() -> tuple[bool, str]:
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


def _tcp_open(host: str, port: int) -> Check:
    def check() -> tuple[bool, str]:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True, "open"
        except OSError as error:
            return False, str(error)

    return check


def _http_json_healthy(url: str) -> Check:
    """kube-proxy answers /healthz with a JSON document, not "ok"."""

    def check() -> tuple[bool, str]:
        try:
            body = http_get(url)
        except (OSError, ValueError) as error:
            return False, str(getattr(error, "reason", error))
        return '"healthy":true' in body.replace(" ", ""), body.strip()[:200]

    return check


def _http_ok(url: str) -> Check:
    def check() -> tuple[bool, str]:
        try:
            http_get(url)
        except (OSError, ValueError) as error:
            return False, str(getattr(error, "reason", error))
        return True, "200"

    return check


def components() -> list[WorkerComponent]:
    b, run = BIN_DIR, RUN_DIR
    path_env = {"PATH": f"{CNI_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    return [
        WorkerComponent(
            "containerd",
            ["/usr/bin/containerd", "--config", str(WORKER_DIR / "containerd.toml")],
            "",
            timeout=30,
            env=path_env,
            check=containerd_ready,
        ),
        WorkerComponent(
            "apiserver-relay",
            [
                "/usr/bin/socat",
                f"TCP-LISTEN:{PORTS['apiserver-relay']},bind={NODE_IP},fork,reuseaddr",
                f"TCP:{HOST}:{CONTROL_PLANE_PORTS['kube-apiserver']}",
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
            f"http://{HOST}:{PORTS['kubelet-healthz']}/healthz",
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
            check=_http_json_healthy(f"http://{HOST}:{PORTS['kube-proxy-healthz']}/healthz"),
        ),
        # Cilium's /healthz answers 200 with an empty body once the agent is up.
        WorkerComponent(
            "cilium-agent",
            cilium_argv(),
            "",
            timeout=180,
            env={**path_env, "K8S_NODE_NAME": NODE_NAME},
            check=_http_ok(f"http://{HOST}:{PORTS['cilium-health']}/healthz"),
        ),
    ]
