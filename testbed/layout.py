"""Where the testbed is: pinned versions, cache paths, the address and ports it listens on.

Everything else in the package (and ``tests/peers``) reads these; none of them may change
without rebuilding or restarting what depends on them. The build stamps key on the versions
and ``RECIPE`` (``testbed.gobuild.Target``); the cache layout under ``FEDNODE_CACHE_DIR``
(default ``~/.cache/fednode``) is shared with CI's cache and ``scripts/helm-setup``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Newest 1.33 patch the module proxy serves (checked 2026-11: v1.33.13).
K8S_VERSION = "v1.33.13"
#: kwok v0.7.0: go.mod says `go 1.24.0` and k8s.io/* v0.33, matching the control plane.
KWOK_VERSION = "v0.7.0"
#: Bump when the build recipe (flags, wrapper shape) changes, so warm caches rebuild.
RECIPE = "1"

CACHE = Path(os.environ.get("FEDNODE_CACHE_DIR", Path.home() / ".cache" / "fednode"))
K8S_HOME = CACHE / "k8s"
VERSION_DIR = K8S_HOME / K8S_VERSION
BIN_DIR = VERSION_DIR / "bin"
WRAPPER_DIR = VERSION_DIR / "wrapper"
BUILD_LOG_DIR = VERSION_DIR / "logs"
GO_CACHE = CACHE / "go"
RUN_DIR = K8S_HOME / "run"
PKI = RUN_DIR / "pki"
#: The admin (system:masters) kubeconfig of a running testbed.
KUBECONFIG = RUN_DIR / "admin.kubeconfig"

HOST = "127.0.0.1"
PORTS = {
    "etcd-client": 16379,
    "etcd-peer": 16380,
    "kube-apiserver": 16443,
    "kube-controller-manager": 16457,
    "kube-scheduler": 16459,
    "kwok": 16480,
}
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"

KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
BINARIES = ("etcd", *KUBE_COMMANDS, "kwok")
