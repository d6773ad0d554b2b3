"""The control plane's processes: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok, how they are started in order, and how their health is judged.

All listen on 127.0.0.1 with the fixed ports of ``testbed.layout``; the apiserver runs
RBAC and the default admission plugins (PodSecurity included), the controller-manager
every default controller with per-controller service-account credentials.
"""

from __future__ import annotations

import socket
import time
import urllib.error
from pathlib import Path

from testbed.apiclient import api
from testbed.console import fail, human, log
from testbed.kwok import kwok_argv, kwok_nodes
from testbed.layout import BIN_DIR, BINARIES, HOST, PKI, PORTS, RUN_DIR, SERVICE_CIDR
from testbed.process import Component, read_pid, start, start_healthy, stop, wait_healthy


def components() -> list[Component]:
    pki, run, b = PKI, RUN_DIR, BIN_DIR
    etcd_url = f"http://{HOST}:{PORTS['etcd-client']}"
    peer_url = f"http://{HOST}:{PORTS['etcd-peer']}"
    serving = [
        f"--tls-cert-file={pki / 'serving.crt'}",
        f"--tls-private-key-file={pki / 'serving.key'}",
    ]

    def client_of(name: str) -> list[str]:
        kubeconfig = run / f"{name}.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={HOST}",
            f"--secure-port={PORTS[name]}",
            "--leader-elect=false",
            *serving,
        ]

    return [
        Component(
            "etcd",
            [
                str(b / "etcd"),
                "--name=fednode-testbed",
                f"--data-dir={run / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=fednode-testbed={peer_url}",
                "--unsafe-no-fsync",  # a throwaway test store: speed over durability
                "--log-level=warn",
            ],
            f"{etcd_url}/health",
            timeout=30,
        ),
        Component(
            "kube-apiserver",
            [
                str(b / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={HOST}",
                f"--advertise-address={HOST}",
                f"--secure-port={PORTS['kube-apiserver']}",
                *serving,
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--cert-dir={run / 'apiserver'}",
                "--authorization-mode=RBAC",
                f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                # 127.0.0.1 may not back the `kubernetes` Service's endpoints; nothing in the
                # testbed runs in-cluster, so leave that Service without endpoints.
                "--endpoint-reconciler-type=none",
                # Logs and exec on the real worker: call kubelet at its address, not its name.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                # Default admission plugins (incl. PodSecurity, ServiceAccount, LimitRanger,
                # ResourceQuota, TaintNodesByCondition) stay on; privileged pods are allowed by the
                # API, so Pod Security labels on a namespace are what forbids them.
                "--allow-privileged=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--profiling=false",
                "--v=1",
            ],
            f"https://{HOST}:{PORTS['kube-apiserver']}/readyz",
            tls=True,
            timeout=120,
        ),
        Component(
            "kube-controller-manager",
            [
                str(b / "kube-controller-manager"),
                *client_of("kube-controller-manager"),
                "--controllers=*",  # job, garbage collector, ttl-after-finished, namespace, SA, ...
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--flex-volume-plugin-dir={run / 'flexvolume'}",  # it creates the directory
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--profiling=false",
                "--v=1",
            ],
            f"https://{HOST}:{PORTS['kube-controller-manager']}/healthz",
            tls=True,
        ),
        Component(
            "kube-scheduler",
            [
                str(b / "kube-scheduler"),
                *client_of("kube-scheduler"),
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--profiling=false",
                "--v=1",
            ],
            f"https://{HOST}:{PORTS['kube-scheduler']}/healthz",
            tls=True,
        ),
        Component(
            "kwok",
            kwok_argv(run / "kwok.kubeconfig", run / "kwok.yaml", PORTS["kwok"]),
            f"http://{HOST}:{PORTS['kwok']}/healthz",
            timeout=30,
        ),
    ]


def apiserver() -> Component:
    return next(c for c in components() if c.name == "kube-apiserver")


def node_problems() -> list[str]:
    """Why the kwok nodes are not usable yet (empty when all are Ready and untainted)."""
    wanted = {n["metadata"]["name"] for n in kwok_nodes()}
    try:
        items = api("GET", "/api/v1/nodes").get("items", [])
    except (OSError, ValueError) as error:
        return [f"cannot list nodes: {error}"]
    problems = []
    seen = {item["metadata"]["name"]: item for item in items}
    for name in sorted(wanted):
        node = seen.get(name)
        if node is None:
            problems.append(f"{name}: missing")
            continue
        ready = [c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
        if not ready or ready[0]["status"] != "True":
            problems.append(f"{name}: not Ready")
        taints = [
            t["key"]
            for t in node.get("spec", {}).get("taints", [])
            if t["key"].startswith("node.kubernetes.io/")
        ]
        if taints:
            problems.append(f"{name}: tainted {','.join(taints)}")
    return problems


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if not (BIN_DIR / name).is_file()]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def refresh_apiserver_flags() -> None:
    """Restart kube-apiserver if an older testbed started it with other flags.

    The real worker needs ``--kubelet-preferred-address-types`` (logs, exec); kwok does not
    care, so a kwok-only testbed started before that flag existed is restarted only here.
    """
    current = apiserver()
    pid = read_pid(current)
    if pid is None:
        return
    running = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    if running != [arg.encode() for arg in current.argv]:
        log("restarting kube-apiserver with the current flags (watches break and resume)")
        stop(current, grace=3)
        start_healthy(current)


def bring_up(started: float) -> None:
    """Start the five processes in order, create the kwok nodes, wait until pods can run."""
    by_name = {c.name: c for c in components()}
    for name in ("etcd", "kube-apiserver"):
        start_healthy(by_name[name])
        log(f"{name} healthy ({human(time.monotonic() - started)})")
    for node in kwok_nodes():
        api("POST", "/api/v1/nodes", node)
    later = ("kube-controller-manager", "kube-scheduler", "kwok")
    procs = {name: start(by_name[name]) for name in later}
    for name in later:
        wait_healthy(by_name[name], procs[name])
        log(f"{name} healthy ({human(time.monotonic() - started)})")
    limit = time.monotonic() + 60
    while problems := node_problems():
        if time.monotonic() > limit:
            raise fail(
                "kwok nodes not Ready within 60s: " + "; ".join(problems),
                log_file=by_name["kwok"].log_file,
            )
        time.sleep(0.2)
    log(f"kwok nodes Ready ({human(time.monotonic() - started)})")
    # Namespaces get their `default` ServiceAccount from the controller-manager; wait for the
    # one in `default` so that a healthy testbed means "pods can be created now".
    limit = time.monotonic() + 60
    while True:
        try:
            api("GET", "/api/v1/namespaces/default/serviceaccounts/default")
            break
        except urllib.error.HTTPError as error:
            if error.code != 404 or time.monotonic() > limit:
                raise fail(
                    "the default ServiceAccount did not appear (serviceaccount controller)",
                    log_file=by_name["kube-controller-manager"].log_file,
                ) from error
            time.sleep(0.2)
