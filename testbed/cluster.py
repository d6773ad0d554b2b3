"""The testbed as a whole: ``up``, ``down``, ``status`` and the other commands that act on a
running testbed, control plane and (when it runs) the real worker together.

``up`` is idempotent and safe to race: every command that starts or stops processes holds
an exclusive lock on ``K8S_HOME/.run.lock`` (two pytest sessions, a developer). Once
started with the real worker, a plain ``up`` keeps it: another session may need it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from testbed import controlplane, kueue
from testbed.console import fail, human, log
from testbed.kwok import kwok_argv, kwok_nodes, kwok_stages
from testbed.layout import (
    BIN_DIR,
    K8S_HOME,
    K8S_VERSION,
    KUBECONFIG,
    KWOK_VERSION,
    PORTS,
    RUN_DIR,
)
from testbed.pki import write_kubeconfigs, write_pki
from testbed.process import health_report, read_pid, start_healthy, stop
from testbed.records import write_json
from testbed.worker import layout as worker_layout
from testbed.worker import node as worker
from testbed.worker.images import import_images as import_worker_images
from testbed.worker.processes import components as worker_components

Report = list[tuple[str, bool, str]]


@contextlib.contextmanager
def run_lock() -> Iterator[None]:
    """Serialise up/down between concurrent callers (two pytest sessions, a developer)."""
    K8S_HOME.mkdir(parents=True, exist_ok=True)
    with (K8S_HOME / ".run.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def healthy_report(*, worker_too: bool = True) -> Report:
    """Health of every component (and of the real worker's, when it runs and ``worker_too``)."""
    report = health_report(controlplane.components())
    if all(ok for _, ok, _ in report):
        problems = controlplane.node_problems()
        report.append(("kwok nodes", not problems, "; ".join(problems) or "4 Ready"))
    if worker_too and worker_layout.enabled():
        report += worker.health_report()
    if read_pid(kueue.component()) is not None:  # only when someone started it
        report += health_report([kueue.component()])
    return report


def up(*, real_worker: bool, keep_on_failure: bool) -> None:
    """Start the testbed, or say it is already up (and add the real worker if asked)."""
    started = time.monotonic()
    missing = controlplane.missing_binaries()
    if missing:
        raise fail(
            f"binaries missing in {BIN_DIR}: {', '.join(missing)}; "
            "run `scripts/k8s-testbed build` first"
        )
    want_worker = real_worker or worker_layout.wanted_from_env() or worker_layout.enabled()
    with run_lock():
        if RUN_DIR.exists():
            report = healthy_report(worker_too=False)
            if all(ok for _, ok, _ in report):
                _keep_or_add_worker(started, want_worker, keep_on_failure=keep_on_failure)
                return
            if any(read_pid(c) is not None for c in controlplane.components()):
                log(
                    "found a half-started or unhealthy testbed: "
                    + "; ".join(f"{n}: {d}" for n, ok, d in report if not ok)
                    + " -> stopping it and starting again"
                )
            else:
                log(f"removing the state of a stopped testbed in {RUN_DIR}")
            teardown()
        busy = [f"{name} {port}" for name, port in PORTS.items() if controlplane.port_in_use(port)]
        if busy:
            raise fail(
                "ports already in use by another process: "
                + ", ".join(busy)
                + " (an older testbed whose pid files were lost? stop it first)"
            )
        RUN_DIR.mkdir(parents=True)
        write_pki()
        write_kubeconfigs()
        (RUN_DIR / "kwok.yaml").write_text(kwok_stages())
        write_json(
            RUN_DIR / "state.json",
            {
                "kubernetes": K8S_VERSION,
                "kwok": KWOK_VERSION,
                "ports": PORTS,
                "kubeconfig": str(KUBECONFIG),
                "started": dt.datetime.now(dt.UTC).isoformat(),
            },
        )
        try:
            controlplane.bring_up(started)
        except SystemExit:
            if not keep_on_failure:
                log(
                    "stopping the half-started testbed (logs kept in "
                    f"{RUN_DIR / 'logs'}; pass --keep-on-failure to keep it running)"
                )
                teardown(keep_logs=True)
            raise
        if want_worker:
            start_worker(started, keep_on_failure=keep_on_failure)
    log(f"up in {human(time.monotonic() - started)}; admin kubeconfig: {KUBECONFIG}")
    print_env()


def _keep_or_add_worker(started: float, want_worker: bool, *, keep_on_failure: bool) -> None:
    """The control plane is up and healthy: keep it; (re)start the worker if it is wanted."""
    if want_worker:
        controlplane.refresh_apiserver_flags()
    worker_report = worker.health_report() if worker_layout.enabled() else []
    if not want_worker or (worker_report and all(ok for _, ok, _ in worker_report)):
        log(f"already up and healthy ({human(time.monotonic() - started)})")
        print_env()
        return
    if worker_layout.enabled():
        log(
            "the real worker is unhealthy: "
            + "; ".join(f"{n}: {d}" for n, ok, d in worker_report if not ok)
            + " -> stopping it and starting it again"
        )
        worker.teardown()
    else:
        log("the control plane is up; adding the real worker")
    start_worker(started, keep_on_failure=keep_on_failure)
    log(f"up in {human(time.monotonic() - started)}; admin kubeconfig: {KUBECONFIG}")
    print_env()


def start_worker(started: float, *, keep_on_failure: bool) -> None:
    """Add the real worker to a running control plane (the caller holds the run lock)."""
    began = time.monotonic()
    log(
        f"starting the real worker {worker_layout.NODE_NAME} (containerd, kubelet, kube-proxy, "
        "Cilium, CoreDNS)"
    )
    try:
        worker.bring_up(started)
    except SystemExit:
        if not keep_on_failure:
            log(
                "stopping the half-started real worker (logs kept in "
                f"{RUN_DIR / 'logs'}; pass --keep-on-failure to keep it running)"
            )
            worker.teardown()
        raise
    log(f"real worker up in {human(time.monotonic() - began)}")


def teardown(*, keep_logs: bool = False) -> None:
    """Stop the worker and the control plane; wipe the run state (or all of it but logs)."""
    if worker_layout.enabled() or any(read_pid(c) is not None for c in worker_components()):
        worker.teardown()
    stop(kueue.component())  # if it runs: it would only retry a gone API server
    for component in reversed(controlplane.components()):
        stop(component)
    if not RUN_DIR.exists():
        return
    if keep_logs:
        for child in RUN_DIR.iterdir():
            if child.name != "logs":
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
    else:
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def kueue_up() -> bool:
    """Start Kueue against the running testbed (no-op when up); whether it started now."""
    with run_lock():
        return kueue.up()


def kueue_down() -> None:
    with run_lock():
        kueue.down()


def down() -> None:
    started = time.monotonic()
    with run_lock():
        running = [c.name for c in controlplane.components() if read_pid(c) is not None]
        teardown()
    log(
        f"down ({'stopped ' + ', '.join(running) if running else 'nothing was running'}; "
        f"state wiped; binaries kept in {BIN_DIR}) in {human(time.monotonic() - started)}"
    )


def status() -> int:
    """Print the health of each component; 0 when all are healthy."""
    if not RUN_DIR.exists():
        log("down (no run state)")
        return 1
    report = healthy_report()
    for name, ok, detail in report:
        print(f"  {'OK ' if ok else 'BAD'}  {name:<24} {detail}")
    healthy = all(ok for _, ok, _ in report)
    log("healthy" if healthy else f"unhealthy (logs in {RUN_DIR / 'logs'})")
    if healthy:
        print(f"  kubeconfig: {KUBECONFIG}")
    return 0 if healthy else 1


def restart_apiserver() -> None:
    """Stop kube-apiserver and start it again; etcd and every other component stay up.

    Every watch breaks mid-stream and every client must reconnect: what a control-plane
    upgrade or a crashed apiserver does to a node (tests/integration/test_k8s_executor.py).
    """
    started = time.monotonic()
    with run_lock():
        apiserver = controlplane.apiserver()
        if read_pid(apiserver) is None:
            raise fail("kube-apiserver is not running; `scripts/k8s-testbed up` first")
        stop(apiserver, grace=3)  # its graceful drain of open watches would take ~10 s
        stopped = time.monotonic()
        start_healthy(apiserver)
    log(
        f"kube-apiserver restarted (down {human(time.monotonic() - stopped)}, "
        f"in all {human(time.monotonic() - started)})"
    )


def import_images(images: tuple[str, ...]) -> None:
    """Copy podman images into the real worker's containerd (nothing is ever pulled)."""
    if not worker_layout.enabled() or read_pid(worker_components()[0]) is None:
        raise fail("the real worker is not running; `scripts/k8s-testbed up --real-worker`")
    started = time.monotonic()
    with run_lock():
        done = import_worker_images(images)
    log(
        f"imported {', '.join(done) if done else 'nothing (all current)'} in "
        f"{human(time.monotonic() - started)}"
    )


def print_env() -> None:
    print(f"export KUBECONFIG={KUBECONFIG}")


def attach(*, kubeconfig: Path, port: int) -> None:
    """Give another cluster (e.g. kind) the testbed's kwok nodes and pod stages.

    Creates the four fake nodes with kubectl, then runs kwok in the foreground (Ctrl-C
    stops it; the nodes stay and turn NotReady).
    """
    kubeconfig = kubeconfig.expanduser().resolve()
    if not kubeconfig.is_file():
        raise fail(f"no kubeconfig at {kubeconfig}")
    if not (BIN_DIR / "kwok").is_file():
        raise fail(f"kwok is missing in {BIN_DIR}; run `scripts/k8s-testbed build` first")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise fail("kubectl is needed to create the kwok nodes")
    workdir = K8S_HOME / "attach"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "kwok.yaml").write_text(kwok_stages())
    nodes = json.dumps({"apiVersion": "v1", "kind": "List", "items": kwok_nodes()})
    created = subprocess.run(
        [kubectl, f"--kubeconfig={kubeconfig}", "apply", "-f", "-"],
        input=nodes,
        text=True,
        capture_output=True,
        check=False,
    )
    if created.returncode != 0:
        raise fail(f"creating the kwok nodes failed: {created.stderr.strip()}")
    log(f"kwok nodes created in the cluster of {kubeconfig}; running kwok (Ctrl-C stops it)")
    argv = kwok_argv(kubeconfig, workdir / "kwok.yaml", port)
    os.execv(argv[0], argv)
