"""The ``scripts/k8s-testbed`` command line: parse, then hand over to ``build`` or ``cluster``.

``build`` imports only the standard library (it runs before any virtualenv exists); every
other command needs ``cryptography`` and PyYAML, so ``testbed.cluster`` is imported only
for them, with an error that says how to get them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import testbed
from testbed.console import fail
from testbed.layout import PORTS
from testbed.worker.layout import wanted_from_env


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="scripts/k8s-testbed",
        description=testbed.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build (or reuse) the pinned binaries")
    p_build.add_argument("--jobs", "-p", type=int, default=2, help="go build -p (default 2)")
    p_build.add_argument(
        "--real-worker",
        action="store_true",
        help="also build kubelet, kube-proxy, Cilium and CoreDNS (or FEDNODE_REAL_WORKER=1)",
    )
    p_kueue = sub.add_parser(
        "build-kueue", help="build (or reuse) Kueue from its Go module (scripts/kueue-setup)"
    )
    p_kueue.add_argument("--jobs", "-p", type=int, default=2, help="go build -p (default 2)")
    p_up = sub.add_parser("up", help="start the testbed (no-op when it is up and healthy)")
    p_up.add_argument(
        "--real-worker",
        action="store_true",
        help="add a real worker node (containerd, kubelet, Cilium) beside the "
        "kwok nodes (or FEDNODE_REAL_WORKER=1)",
    )
    p_up.add_argument(
        "--kueue",
        action="store_true",
        help="also run Kueue's controller-manager (scripts/kueue-setup builds it); "
        "no-op when it is up",
    )
    p_up.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="leave the processes running when start-up fails (to debug)",
    )
    sub.add_parser("down", help="stop everything and wipe the run state (keeps binaries)")
    sub.add_parser(
        "kueue-down", help="remove Kueue's webhooks and stop it (the testbed keeps running)"
    )
    sub.add_parser("status", help="health of each component; exit 0 when all are healthy")
    sub.add_parser("env", help="print `export KUBECONFIG=...`")
    p_import = sub.add_parser(
        "import-images",
        help="copy podman images into the real worker's containerd (only those that changed)",
    )
    p_import.add_argument("images", nargs="+", help="image references known to podman")
    sub.add_parser(
        "restart-apiserver",
        help="stop and start kube-apiserver only (watches break; state is kept)",
    )
    p_attach = sub.add_parser(
        "attach",
        help="run the kwok nodes and stages against another cluster (e.g. kind), in the foreground",
    )
    p_attach.add_argument("--kubeconfig", required=True, help="admin kubeconfig of that cluster")
    p_attach.add_argument(
        "--port",
        type=int,
        default=PORTS["kwok"] + 1,
        help=f"kwok's health port (default {PORTS['kwok'] + 1})",
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "build":
        from testbed.build import build

        build(jobs=args.jobs, real_worker=args.real_worker or wanted_from_env())
        return 0
    if args.command == "build-kueue":
        from testbed import kueue

        kueue.build(jobs=args.jobs)
        return 0
    try:
        from testbed import cluster
    except ImportError as error:
        raise fail(
            f"`{args.command}` needs cryptography and PyYAML ({error}); run scripts/dev-env, "
            "then use scripts/k8s-testbed (it picks .venv/bin/python)"
        ) from error
    if args.command == "up":
        cluster.up(real_worker=args.real_worker, keep_on_failure=args.keep_on_failure)
        if args.kueue:
            cluster.kueue_up()
    elif args.command == "kueue-down":
        cluster.kueue_down()
    elif args.command == "down":
        cluster.down()
    elif args.command == "status":
        return cluster.status()
    elif args.command == "attach":
        cluster.attach(kubeconfig=Path(args.kubeconfig), port=args.port)
    elif args.command == "restart-apiserver":
        cluster.restart_apiserver()
    elif args.command == "import-images":
        cluster.import_images(tuple(args.images))
    else:
        cluster.print_env()
    return 0


if __name__ == "__main__":
    sys.exit(main())
