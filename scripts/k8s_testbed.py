"""The real Kubernetes testbed: a pinned control plane built from Go modules, plus kwok nodes.

fednode's Kubernetes executor is tested against a real kube-apiserver (admission, RBAC,
Pod Security, watch semantics), a real kube-controller-manager (Job controller, garbage
collector, service-account tokens) and a real kube-scheduler (resources, GPUs, taints).
No container runtime runs the pods: kwok plays the kubelet, moving pods through the phases
the tests ask for with annotations (see ``POD_BEHAVIOUR`` below and docs/testing.md).

Nothing here downloads release binaries: everything is compiled from the Go module proxy.

* ``build`` makes a throwaway wrapper module that requires ``k8s.io/kubernetes`` at the
  pinned tag and replaces every staging module (read from that tag's own go.mod) with its
  published ``v0.MINOR.PATCH`` twin; it builds kube-apiserver, kube-controller-manager,
  kube-scheduler and etcd (the version k8s itself requires) from it, one at a time, and
  kwok with ``go install``. Binaries land in ``~/.cache/fednode/k8s/<version>/bin``, with
  one stamp file each; a warm cache rebuilds nothing.
* ``up`` writes certificates (Python ``cryptography``), starts the five processes on
  127.0.0.1 with fixed ports, waits until each one is healthy and the kwok nodes are
  Ready, and records pids under ``~/.cache/fednode/k8s/run``. It is idempotent.
* ``down`` stops the recorded processes and wipes the run state; ``status`` checks health;
  ``env`` prints the ``export KUBECONFIG=...`` line.
* ``--real-worker`` (``build`` and ``up``; or ``FEDNODE_REAL_WORKER=1``) adds one real node
  beside the kwok nodes, where pods really run and NetworkPolicy is enforced: see
  ``scripts/k8s_worker.py``. ``import-images`` copies podman images to it.

Run it through ``scripts/k8s-testbed`` (which picks the project's virtualenv).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------
# Pinned versions and fixed locations
# --------------------------------------------------------------------------------------

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


def log(message: str) -> None:
    print(f"[k8s-testbed] {message}", flush=True)


def fail(message: str, *, log_file: Path | None = None, tail: int = 30) -> SystemExit:
    """Print a clear error (and the end of the log that explains it); return the exit."""
    print(f"[k8s-testbed] ERROR: {message}", file=sys.stderr, flush=True)
    if log_file is not None:
        if log_file.exists():
            lines = log_file.read_text(errors="replace").splitlines()[-tail:]
            print(f"[k8s-testbed] last {len(lines)} lines of {log_file}:", file=sys.stderr)
            for line in lines:
                print(f"    {line}", file=sys.stderr)
        # Repeat the verdict after the tail, so it is the last thing on screen.
        print(f"[k8s-testbed] ERROR: {message}; read {log_file}", file=sys.stderr)
    sys.stderr.flush()
    return SystemExit(1)


def human(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------


def go_binary() -> str:
    found = os.environ.get("GO") or shutil.which("go")
    if found:
        return found
    if Path("/usr/local/go/bin/go").exists():
        return "/usr/local/go/bin/go"
    raise fail("no `go` found (set GO=/path/to/go or put it on PATH); Go >= 1.24 is needed")


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOTOOLCHAIN="local",  # a newer `go` line anywhere must fail, not download a toolchain
        GOMODCACHE=str(GO_CACHE / "mod"),
        GOCACHE=str(GO_CACHE / "build"),
        GOWORK="off",
        GOFLAGS="-buildvcs=false",
        CGO_ENABLED="0",  # the upstream configuration for the control plane (static binaries)
    )
    return env


@dataclass(frozen=True)
class Target:
    """One binary to build: how, and the key that says whether a cached copy is current."""

    name: str
    version: str
    args: tuple[str, ...]  # go sub-command and arguments, without the output flag
    install: bool = False  # `go install pkg@version` (kwok) instead of building in the wrapper
    wrapper: Path = WRAPPER_DIR  # the module it is built in (the real worker adds two more)

    @property
    def key(self) -> str:
        return f"{self.name} {self.version} recipe={RECIPE}"

    @property
    def stamp(self) -> Path:
        return BIN_DIR / f".{self.name}.stamp"

    def is_current(self) -> bool:
        binary = BIN_DIR / self.name
        return (
            binary.is_file()
            and os.access(binary, os.X_OK)
            and self.stamp.is_file()
            and self.stamp.read_text().strip() == self.key
        )


def run_logged(
    argv: Sequence[str], *, cwd: Path, env: dict[str, str], log_file: Path, what: str
) -> None:
    """Run a (long) go command into a log file, printing progress every 30 s."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_file.open("a") as out:
        out.write(f"\n$ (cd {cwd} && {' '.join(argv)})\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while True:
            try:
                code = proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                log(f"  ... {what}: {human(time.monotonic() - started)}")
    if code != 0:
        raise fail(f"{what} failed (exit {code})", log_file=log_file)


def staging_replaces(gomod_text: str) -> list[str]:
    """The staging modules of a k8s tag: every `k8s.io/X => ./staging/src/k8s.io/X` line."""
    return re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/src/", gomod_text, re.M)


def required_version(gomod_text: str, module: str) -> str:
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", gomod_text, re.M)
    if not match:
        raise fail(f"{module} is not required by k8s.io/kubernetes {K8S_VERSION}'s go.mod")
    return match.group(1)


def kubernetes_gomod(go: str, env: dict[str, str]) -> tuple[str, str]:
    """Download the pinned k8s module's go.mod through the proxy; return (text, tag time)."""
    out = subprocess.run(
        [go, "mod", "download", "-json", f"k8s.io/kubernetes@{K8S_VERSION}"],
        env=env,
        cwd=CACHE,
        capture_output=True,
        text=True,
        check=False,
    )
    info = json.loads(out.stdout) if out.stdout.strip() else {}
    if out.returncode != 0 or "GoMod" not in info:
        raise fail(
            f"cannot fetch k8s.io/kubernetes@{K8S_VERSION} from the module proxy: "
            f"{info.get('Error') or out.stderr.strip()}"
        )
    released = json.loads(Path(info["Info"]).read_text()).get("Time", "")
    return Path(info["GoMod"]).read_text(), released


def write_wrapper(staging: list[str], minor_patch: str) -> None:
    """The throwaway module the control plane is built in (never committed anywhere)."""
    WRAPPER_DIR.mkdir(parents=True, exist_ok=True)
    replaces = "\n".join(f"\t{m} => {m} {minor_patch}" for m in staging)
    (WRAPPER_DIR / "go.mod").write_text(
        "// Generated by fednode scripts/k8s_testbed.py; safe to delete.\n"
        "module fednode.test/k8s-testbed\n\n"
        "go 1.24.0\n\n"
        "// Only the main module's godebug line counts: match upstream's runtime defaults.\n"
        "godebug default=go1.24\n\n"
        f"require k8s.io/kubernetes {K8S_VERSION}\n\n"
        f"replace (\n{replaces}\n)\n"
    )
    (WRAPPER_DIR / "go.sum").unlink(missing_ok=True)


def version_ldflags(released: str) -> str:
    """Upstream hack/lib/version.sh stamping, for component-base and client-go."""
    major, minor = K8S_VERSION.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": K8S_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        # The module proxy does not serve the tag's commit; leave it visibly unknown.
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": released or "1970-01-01T00:00:00Z",
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{name}={value}" for name, value in values.items()]
    return " ".join(flags)


def build(args: argparse.Namespace) -> None:
    started = time.monotonic()
    go = go_binary()
    env = go_env()
    for directory in (BIN_DIR, BUILD_LOG_DIR, GO_CACHE / "mod", GO_CACHE / "build"):
        directory.mkdir(parents=True, exist_ok=True)
    jobs = str(args.jobs)
    flags = ("-p", jobs, "-trimpath")
    kwok_ldflags = (
        f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION.lstrip('v')}"
        f" -X sigs.k8s.io/kwok/pkg/consts.KubeVersion={K8S_VERSION.lstrip('v')}"
    )
    kwok = Target(
        "kwok",
        KWOK_VERSION,
        ("install", *flags, "-ldflags", kwok_ldflags, f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"),
        True,
    )

    # The real worker's binaries are opt-in (`--real-worker`, FEDNODE_REAL_WORKER=1): they
    # add a few minutes to a cold build that kwok-only CI does not need.
    real_worker = args.real_worker or k8s_worker().wanted_from_env()
    commands = (*KUBE_COMMANDS, *(k8s_worker().WORKER_KUBE_COMMANDS if real_worker else ()))
    extra = k8s_worker().extra_targets(flags) if real_worker else []
    if real_worker:
        k8s_worker().install_packages()  # containerd, runc, CNI plugins, clang, ...

    # The etcd version comes from the k8s go.mod; read it only when something is missing.
    recorded = read_json(VERSION_DIR / "versions.json")
    etcd_version = recorded.get("etcd", "")
    kube = [Target(name, K8S_VERSION, ()) for name in commands]
    if (
        etcd_version
        and all(t.is_current() for t in (*kube, *extra))
        and kwok.is_current()
        and Target("etcd", etcd_version, ()).is_current()
    ):
        log(
            f"binaries are current in {BIN_DIR} (kubernetes {K8S_VERSION}, etcd {etcd_version},"
            f" kwok {KWOK_VERSION}{', real worker' if real_worker else ''}); nothing to build"
            f" ({human(time.monotonic() - started)})"
        )
        return

    log(
        f"building kubernetes {K8S_VERSION} + etcd + kwok {KWOK_VERSION} from Go modules "
        f"(logs in {BUILD_LOG_DIR}; -p {jobs}; a cold build takes many minutes)"
    )
    gomod, released = kubernetes_gomod(go, env)
    etcd_version = required_version(gomod, "go.etcd.io/etcd/server/v3")
    staging = staging_replaces(gomod)
    if len(staging) < 20:
        raise fail(f"found only {len(staging)} staging replaces in k8s {K8S_VERSION}'s go.mod")
    ldflags = version_ldflags(released)
    targets = [
        Target(
            "etcd",
            etcd_version,
            ("build", *flags, "-ldflags", "-s -w", "go.etcd.io/etcd/server/v3"),
        ),
        *(
            Target(
                name,
                K8S_VERSION,
                ("build", *flags, "-ldflags", ldflags, f"k8s.io/kubernetes/cmd/{name}"),
            )
            for name in commands
        ),
        kwok,
        *extra,
    ]
    todo = [t for t in targets if not t.is_current()]
    if any(not t.install and t.wrapper == WRAPPER_DIR for t in todo):
        step = time.monotonic()
        staging_version = "v0." + K8S_VERSION.split(".", 1)[1]  # v1.33.13 -> v0.33.13
        log(
            f"resolving the wrapper module ({len(staging)} staging modules -> "
            f"{staging_version}, etcd {etcd_version})"
        )
        write_wrapper(staging, staging_version)
        run_logged(
            [
                go,
                "get",
                *(f"k8s.io/kubernetes/cmd/{n}@{K8S_VERSION}" for n in commands),
                f"go.etcd.io/etcd/server/v3@{etcd_version}",
            ],
            cwd=WRAPPER_DIR,
            env=env,
            log_file=BUILD_LOG_DIR / "wrapper.log",
            what="resolving the wrapper module",
        )
        log(f"  wrapper resolved in {human(time.monotonic() - step)}")
    if extra:
        k8s_worker().prepare_wrappers(go, env, todo)

    timings: dict[str, float] = {}
    for target in targets:
        if target.is_current():
            log(f"{target.name} {target.version}: cached")
            continue
        step = time.monotonic()
        log(f"building {target.name} {target.version} ...")
        out = BIN_DIR / target.name
        tmp = BIN_DIR / f".{target.name}.tmp"
        if target.install:
            gobin = BIN_DIR / ".gobin"
            shutil.rmtree(gobin, ignore_errors=True)
            run_logged(
                [go, *target.args],
                cwd=CACHE,
                env={**env, "GOBIN": str(gobin)},
                log_file=BUILD_LOG_DIR / f"{target.name}.log",
                what=f"building {target.name}",
            )
            (gobin / target.name).replace(out)
            shutil.rmtree(gobin, ignore_errors=True)
        else:
            argv = [go, target.args[0], "-o", str(tmp), *target.args[1:]]
            run_logged(
                argv,
                cwd=target.wrapper,
                env=env,
                log_file=BUILD_LOG_DIR / f"{target.name}.log",
                what=f"building {target.name}",
            )
            tmp.replace(out)
        target.stamp.write_text(target.key + "\n")
        timings[target.name] = time.monotonic() - step
        log(
            f"  {target.name} built in {human(timings[target.name])} "
            f"({out.stat().st_size / 2**20:.0f} MiB)"
        )

    write_json(
        VERSION_DIR / "versions.json",
        {
            **recorded,
            "kubernetes": K8S_VERSION,
            "etcd": etcd_version,
            "kwok": KWOK_VERSION,
            "recipe": RECIPE,
            "built": {**recorded.get("built", {}), **timings},
        },
    )
    log(
        f"build done in {human(time.monotonic() - started)}: "
        + ", ".join(f"{n} {human(s)}" for n, s in timings.items())
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# kwok: fake nodes and the pod behaviour the tests choose with annotations
# --------------------------------------------------------------------------------------

#: Annotations that steer a pod on the kwok nodes (documented in docs/testing.md).
ANNOTATION_PREFIX = "fednode.test/"
POD_BEHAVIOUR = {
    "fednode.test/run-seconds": 'seconds the container "runs" before it exits (default 1; '
    'decimals allowed); "forever" = runs until deleted',
    "fednode.test/start-seconds": "seconds from scheduled to Running (default 0)",
    "fednode.test/exit-code": "exit code of the container(s); non-zero -> reason Error, "
    'phase Failed (default "0" -> Completed, Succeeded)',
    "fednode.test/oom-killed": '"true" -> exit code 137, reason OOMKilled, phase Failed',
    "fednode.test/image-missing": '"true" -> stays Pending, waiting reason ErrImagePull '
    '(also any image containing "/missing/" or ending ":missing")',
}

NODE_SELECTOR_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"


def kwok_nodes() -> list[dict[str, Any]]:
    """Three CPU nodes and one GPU node; status is kept from create (kwok keeps capacity)."""

    def node(name: str, *, gpus: int = 0) -> dict[str, Any]:
        capacity = {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        labels = {
            "type": "kwok",
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        spec: dict[str, Any] = {}
        if gpus:
            capacity[GPU_RESOURCE] = str(gpus)
            labels["fednode.test/gpu"] = "true"
            labels["nvidia.com/gpu.present"] = "true"
            spec["taints"] = [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {NODE_SELECTOR_ANNOTATION: "fake"},
            },
            "spec": spec,
            "status": {"capacity": capacity, "allocatable": dict(capacity)},
        }

    return [*(node(f"kwok-cpu-{i}") for i in range(3)), node("kwok-gpu-0", gpus=4)]


# The pod Stages, in the v1alpha1 schema of kwok v0.7.0 (jq selectors, `next.patches`).
# A config with any Pod stage replaces *all* of kwok's default pod stages, so this is the
# complete pod lifecycle. Selectors are disjoint, so exactly one stage matches a pod at a time:
#   scheduled --start--> Running --succeed|fail|oom-killed (after run-seconds)--> terminal
#   scheduled --image-missing--> Pending (ErrImagePull), until deleted
#   deletionTimestamp --terminate--> Failed (exit 143) --delete--> gone. Finalizers are
#   respected: the Job controller drops its tracking finalizer, then the object disappears.
# `@NAME@` markers are filled in by `kwok_stages()`; everything else is literal YAML and Go
# templates as kwok renders them.
_STAGE_PARTS = {
    "@IMAGE_MISSING@": (
        '(.metadata.annotations["fednode.test/image-missing"] == "true") or '
        'any(.spec.containers[]; .image | test("/missing/|:missing$"))'
    ),
    "@FINISHING@": """\
    - jq: {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - jq: {key: '.status.phase', operator: In, values: [Running]}
    - jq: {key: '.spec.restartPolicy', operator: NotIn, values: [Always]}
    - jq: {key: '.metadata.annotations["fednode.test/run-seconds"]', operator: NotIn,
           values: [forever]}""",
    "@RUN_DELAY@": """\
  delay:
    durationMilliseconds: 1000
    durationFrom:
      jq:
        expression: '(.metadata.annotations["fednode.test/run-seconds"] // "1") + "s"'""",
    "@POD_IPS@": """\
        hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
        podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}""",  # noqa: E501
}
_TERMINATED = """\
    patches:
    - subresource: status
      root: status
      template: |
        {{ $now := Now }}
        {{ $root := . }}
        conditions:
        - {type: Ready, status: "False", reason: @COND@, lastTransitionTime: {{ $now | Quote }}}
        - {type: ContainersReady, status: "False", reason: @COND@,
           lastTransitionTime: {{ $now | Quote }}}
        containerStatuses:
        {{ range .spec.containers }}
        - name: {{ .name | Quote }}
          image: {{ .image | Quote }}
          imageID: {{ printf "kwok://%s" .image | Quote }}
          containerID: {{ printf "kwok://%s/%s" $root.metadata.uid .name | Quote }}
          ready: false
          started: false
          restartCount: 0
          state:
            terminated:
              exitCode: @EXIT_CODE@
              reason: @REASON@
              message: @MESSAGE@
              startedAt: {{ or $root.status.startTime $now | Quote }}
              finishedAt: {{ $now | Quote }}
        {{ end }}
        phase: @PHASE@"""


def _terminated(*, cond: str, exit_code: str, reason: str, phase: str, message: str = '""') -> str:
    return (
        _TERMINATED.replace("@COND@", cond)
        .replace("@EXIT_CODE@", exit_code)
        .replace("@REASON@", reason)
        .replace("@MESSAGE@", message)
        .replace("@PHASE@", phase)
    )


_KWOK_STAGES = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: fednode-pod-start}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - jq: {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - jq: {key: '.status.podIP', operator: DoesNotExist}
    - jq: {key: '@IMAGE_MISSING@', operator: In, values: ["false"]}
  delay:
    durationMilliseconds: 0
    durationFrom:
      jq:
        expression: '(.metadata.annotations["fednode.test/start-seconds"] // "0") + "s"'
  next:
    event: {type: Normal, reason: Started, message: "Started container (kwok)"}
    patches:
    - subresource: status
      root: status
      template: |
        {{ $now := Now }}
        {{ $root := . }}
        conditions:
        - {type: PodReadyToStartContainers, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}
        containerStatuses:
        {{ range .spec.containers }}
        - name: {{ .name | Quote }}
          image: {{ .image | Quote }}
          imageID: {{ printf "kwok://%s" .image | Quote }}
          containerID: {{ printf "kwok://%s/%s" $root.metadata.uid .name | Quote }}
          ready: true
          started: true
          restartCount: 0
          state:
            running:
              startedAt: {{ $now | Quote }}
        {{ end }}
        {{ with .spec.initContainers }}
        initContainerStatuses:
        {{ range . }}
        - name: {{ .name | Quote }}
          image: {{ .image | Quote }}
          ready: true
          restartCount: 0
          state:
            terminated: {exitCode: 0, reason: Completed, startedAt: {{ $now | Quote }},
                         finishedAt: {{ $now | Quote }}}
        {{ end }}
        {{ end }}
@POD_IPS@
        phase: Running
        startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: fednode-pod-image-missing}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - jq: {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - jq: {key: '@IMAGE_MISSING@', operator: In, values: ["true"]}
    - jq: {key: '.status.containerStatuses[]?.state.waiting.reason', operator: NotIn,
           values: [ErrImagePull]}
  next:
    event: {type: Warning, reason: Failed, message: "Failed to pull image: not found (kwok)"}
    patches:
    - subresource: status
      root: status
      template: |
        {{ $now := Now }}
        conditions:
        - {type: PodReadyToStartContainers, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: Ready, status: "False", reason: ContainersNotReady,
           lastTransitionTime: {{ $now | Quote }}}
        - {type: ContainersReady, status: "False", reason: ContainersNotReady,
           lastTransitionTime: {{ $now | Quote }}}
        containerStatuses:
        {{ range .spec.containers }}
        - name: {{ .name | Quote }}
          image: {{ .image | Quote }}
          imageID: ""
          ready: false
          started: false
          restartCount: 0
          state:
            waiting:
              reason: ErrImagePull
              message: {{ printf "failed to pull and unpack image %q: not found" .image | Quote }}
        {{ end }}
@POD_IPS@
        phase: Pending
        startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: fednode-pod-succeed}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
@FINISHING@
    - jq: {key: '.metadata.annotations["fednode.test/oom-killed"]', operator: NotIn,
           values: ["true"]}
    - jq: {key: '.metadata.annotations["fednode.test/exit-code"] // "0"', operator: In,
           values: ["0"]}
@RUN_DELAY@
  next:
@SUCCEEDED@
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: fednode-pod-fail}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
@FINISHING@
    - jq: {key: '.metadata.annotations["fednode.test/oom-killed"]', operator: NotIn,
           values: ["true"]}
    - jq: {key: '.metadata.annotations["fednode.test/exit-code"] // "0"', operator: NotIn,
           values: ["0"]}
@RUN_DELAY@
  next:
@FAILED@
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: fednode-pod-oom-killed}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
@FINISHING@
    - jq: {key: '.metadata.annotations["fednode.test/oom-killed"]', operator: In,
           values: ["true"]}
@RUN_DELAY@
  next:
@OOM_KILLED@
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: fednode-pod-terminate}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - jq: {key: '.metadata.deletionTimestamp', operator: Exists}
    - jq: {key: '.status.phase', operator: NotIn, values: [Succeeded, Failed]}
  next:
    event: {type: Normal, reason: Killing, message: "Stopping container (kwok)"}
@KILLED@
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: fednode-pod-delete}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - jq: {key: '.metadata.deletionTimestamp', operator: Exists}
    - jq: {key: '.status.phase', operator: In, values: [Succeeded, Failed]}
    # once deleted with grace 0, a pod only waits for its finalizers: do not delete it again
    - jq: {key: '(.metadata.deletionGracePeriodSeconds // 1) > 0', operator: In,
           values: ["true"]}
  next:
    delete: true
"""


def kwok_stages() -> str:
    """The multi-document kwok config: every pod Stage (node stages stay kwok's defaults)."""
    parts = {
        **_STAGE_PARTS,
        "@SUCCEEDED@": _terminated(
            cond="PodCompleted", exit_code="0", reason="Completed", phase="Succeeded"
        ),
        "@FAILED@": _terminated(
            cond="PodFailed",
            reason="Error",
            phase="Failed",
            exit_code='{{ index $root.metadata.annotations "fednode.test/exit-code" }}',
        ),
        "@OOM_KILLED@": _terminated(
            cond="PodFailed", exit_code="137", reason="OOMKilled", phase="Failed"
        ),
        "@KILLED@": _terminated(
            cond="PodFailed",
            exit_code="143",
            reason="Error",
            phase="Failed",
            message='"terminated on pod deletion"',
        ),
    }
    text = _KWOK_STAGES
    for marker, value in parts.items():
        text = text.replace(marker, value)
    return text


# --------------------------------------------------------------------------------------
# certificates and kubeconfigs
# --------------------------------------------------------------------------------------

PKI = RUN_DIR / "pki"


def write_pki() -> None:
    """CA, one serving cert for every component, client certs, the SA signing key pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    PKI.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    expires = now + dt.timedelta(days=365)

    def save_key(name: str, key: Any) -> None:
        path = PKI / f"{name}.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    def make_ca(file: str, cn: str) -> tuple[Any, x509.Name]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = name(cn)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(expires + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        save_key(file, key)
        (PKI / f"{file}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, subject

    ca_key, ca_name = make_ca("ca", "fednode-testbed-ca")
    # The aggregation layer's own CA (requestheader authentication of proxied requests).
    proxy_ca_key, proxy_ca_name = make_ca("front-proxy-ca", "fednode-testbed-front-proxy-ca")

    def issue(
        file: str,
        subject: x509.Name,
        *,
        server: bool,
        ca_key: Any = ca_key,
        ca_name: x509.Name = ca_name,
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(expires)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            service_ip = next(ipaddress.ip_network(SERVICE_CIDR).hosts())
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        *(
                            x509.DNSName(d)
                            for d in (
                                "kubernetes",
                                "kubernetes.default",
                                "kubernetes.default.svc",
                                "kubernetes.default.svc.cluster.local",
                                "localhost",
                            )
                        ),
                        x509.IPAddress(ipaddress.ip_address(HOST)),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                        x509.IPAddress(service_ip),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        save_key(file, key)
        (PKI / f"{file}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    issue("serving", name("fednode-testbed-apiserver"), server=True)
    issue("admin", name("fednode-testbed-admin", "system:masters"), server=False)
    issue("kube-controller-manager", name("system:kube-controller-manager"), server=False)
    issue("kube-scheduler", name("system:kube-scheduler"), server=False)
    issue("kwok", name("fednode-testbed-kwok", "system:masters"), server=False)
    issue(
        "front-proxy-client",
        name("front-proxy-client"),
        server=False,
        ca_key=proxy_ca_key,
        ca_name=proxy_ca_name,
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    save_key("sa", sa_key)
    (PKI / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def issue_client_cert(file: str, common_name: str, organization: str | None) -> None:
    """One more client certificate from the testbed CA (written to ``PKI/<file>.crt/.key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((PKI / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((PKI / "ca.crt").read_bytes())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_path = PKI / f"{file}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    (PKI / f"{file}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def kubeconfig_text(
    user: str,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> str:
    """A kubeconfig with everything embedded (client certs or a bearer token)."""
    import base64

    import yaml

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    credentials: dict[str, str] = {}
    if cert is not None and key is not None:
        credentials = {"client-certificate-data": b64(cert), "client-key-data": b64(key)}
    elif token is not None:
        credentials = {"token": token}
    context: dict[str, str] = {"cluster": "fednode-testbed", "user": user}
    if namespace:
        context["namespace"] = namespace
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fednode-testbed",
                    "cluster": {
                        "server": f"https://{HOST}:{PORTS['kube-apiserver']}",
                        "certificate-authority-data": b64(PKI / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "fednode-testbed", "context": context}],
            "current-context": "fednode-testbed",
        },
        sort_keys=False,
    )


def write_kubeconfigs() -> None:
    for who in ("admin", "kube-controller-manager", "kube-scheduler", "kwok"):
        path = RUN_DIR / f"{who}.kubeconfig"
        path.write_text(kubeconfig_text(who, cert=PKI / f"{who}.crt", key=PKI / f"{who}.key"))
        path.chmod(0o600)


# --------------------------------------------------------------------------------------
# talking to the components (stdlib only: the testbed must not depend on what it tests)
# --------------------------------------------------------------------------------------


def tls_context(*, client: str | None = "admin") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    if client:
        ctx.load_cert_chain(PKI / f"{client}.crt", PKI / f"{client}.key")
    return ctx


def http_get(url: str, *, ctx: ssl.SSLContext | None = None, timeout: float = 3) -> str:
    with urllib.request.urlopen(url, context=ctx, timeout=timeout) as response:
        return str(response.read().decode())


def api(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request to kube-apiserver as the admin; raises urllib.error.HTTPError on failure."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"https://{HOST}:{PORTS['kube-apiserver']}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, context=tls_context(), timeout=10) as response:
        result = json.loads(response.read() or b"{}")
    return result if isinstance(result, dict) else {}


def api_patch(path: str, patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch as the admin."""
    request = urllib.request.Request(
        f"https://{HOST}:{PORTS['kube-apiserver']}{path}",
        data=json.dumps(patch).encode(),
        method="PATCH",
        headers={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, context=tls_context(), timeout=10) as response:
        result = json.loads(response.read() or b"{}")
    return result if isinstance(result, dict) else {}


# --------------------------------------------------------------------------------------
# the components
# --------------------------------------------------------------------------------------


@dataclass
class Component:
    """One process of the testbed: how to start it and how to tell it is healthy."""

    name: str
    argv: list[str]
    health_url: str
    tls: bool = False
    timeout: float = 60
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return RUN_DIR / "logs" / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return RUN_DIR / "pids" / f"{self.name}.pid"

    def healthy(self) -> tuple[bool, str]:
        try:
            ctx = tls_context() if self.tls else None
            body = http_get(self.health_url, ctx=ctx)
        except (OSError, ValueError) as error:  # URLError, HTTPError, ssl errors, refused
            return False, str(getattr(error, "reason", error))
        if self.name == "etcd":
            return ('"health":"true"' in body.replace(" ", "")), body.strip()
        return body.strip() == "ok", body.strip()[:200]


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


def kwok_argv(kubeconfig: Path, config: Path, port: int) -> list[str]:
    return [
        str(BIN_DIR / "kwok"),
        f"--kubeconfig={kubeconfig}",
        f"--config={config}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={NODE_SELECTOR_ANNOTATION}=fake",
        f"--cidr={POD_CIDR}",
        "--node-ip=10.99.0.1",
        "--node-lease-duration-seconds=40",
        f"--server-address={HOST}:{port}",
    ]


def read_pid(component: Component) -> int | None:
    """The recorded pid, if that process is still ours (guards against pid reuse)."""
    try:
        record = json.loads(component.pid_file.read_text())
        pid = int(record["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError):
        return None
    if not cmdline or cmdline[0].decode(errors="replace") != record.get("exe"):
        return None
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return None
    return pid


def start(component: Component) -> subprocess.Popen[bytes]:
    for directory in (component.log_file.parent, component.pid_file.parent):
        directory.mkdir(parents=True, exist_ok=True)
    with component.log_file.open("ab") as out:
        proc = subprocess.Popen(
            component.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=RUN_DIR,
            env={**os.environ, **component.env},
            start_new_session=True,  # outlives this script and the pytest run that started it
        )
    write_json(component.pid_file, {"pid": proc.pid, "exe": component.argv[0]})
    return proc


def wait_healthy(component: Component, proc: subprocess.Popen[bytes]) -> None:
    limit = time.monotonic() + component.timeout
    reason = ""
    while time.monotonic() < limit:
        if proc.poll() is not None:
            raise fail(
                f"{component.name} exited during start-up (exit {proc.returncode})",
                log_file=component.log_file,
            )
        ok, reason = component.healthy()
        if ok:
            return
        time.sleep(0.2)
    raise fail(
        f"{component.name} did not become healthy within {component.timeout:.0f}s "
        f"(last answer: {reason})",
        log_file=component.log_file,
    )


def stop(component: Component, *, grace: float = 10) -> None:
    pid = read_pid(component)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        limit = time.monotonic() + grace
        while time.monotonic() < limit and read_pid(component) is not None:
            time.sleep(0.1)
        if read_pid(component) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    component.pid_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# up / down / status / env
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_lock() -> Iterator[None]:
    """Serialise up/down between concurrent callers (two pytest sessions, a developer)."""
    import fcntl

    K8S_HOME.mkdir(parents=True, exist_ok=True)
    with (K8S_HOME / ".run.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def healthy_report(*, worker: bool = True) -> list[tuple[str, bool, str]]:
    """Health of every component (and of the real worker's, when it runs and ``worker``)."""
    report = []
    for component in components():
        if read_pid(component) is None:
            report.append((component.name, False, "not running"))
            continue
        ok, detail = component.healthy()
        report.append((component.name, ok, "healthy" if ok else f"unhealthy: {detail}"))
    if all(ok for _, ok, _ in report):
        problems = node_problems()
        report.append(("kwok nodes", not problems, "; ".join(problems) or "4 Ready"))
    if worker and k8s_worker().enabled():
        report += k8s_worker().health_report()
    return report


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if not (BIN_DIR / name).is_file()]


def up(args: argparse.Namespace) -> None:
    started = time.monotonic()
    try:
        import cryptography  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as error:
        raise fail(
            f"`up` needs cryptography and PyYAML ({error}); run scripts/dev-env, "
            "then use scripts/k8s-testbed (it picks .venv/bin/python)"
        ) from error
    missing = missing_binaries()
    if missing:
        raise fail(
            f"binaries missing in {BIN_DIR}: {', '.join(missing)}; "
            "run `scripts/k8s-testbed build` first"
        )
    worker = k8s_worker()
    # Once started with the real worker, a plain `up` keeps it (another session may need it).
    want_worker = args.real_worker or worker.wanted_from_env() or worker.enabled()
    with run_lock():
        if RUN_DIR.exists():
            report = healthy_report(worker=False)
            if all(ok for _, ok, _ in report):
                if want_worker:
                    refresh_apiserver_flags()
                worker_report = worker.health_report() if worker.enabled() else []
                if not want_worker or (worker_report and all(ok for _, ok, _ in worker_report)):
                    log(f"already up and healthy ({human(time.monotonic() - started)})")
                    print_env()
                    return
                if worker.enabled():
                    log(
                        "the real worker is unhealthy: "
                        + "; ".join(f"{n}: {d}" for n, ok, d in worker_report if not ok)
                        + " -> stopping it and starting it again"
                    )
                    worker.teardown()
                else:
                    log("the control plane is up; adding the real worker")
                start_worker(started, keep_on_failure=args.keep_on_failure)
                log(f"up in {human(time.monotonic() - started)}; admin kubeconfig: {KUBECONFIG}")
                print_env()
                return
            if any(read_pid(c) is not None for c in components()):
                log(
                    "found a half-started or unhealthy testbed: "
                    + "; ".join(f"{n}: {d}" for n, ok, d in report if not ok)
                    + " -> stopping it and starting again"
                )
            else:
                log(f"removing the state of a stopped testbed in {RUN_DIR}")
            teardown()
        busy = [f"{name} {port}" for name, port in PORTS.items() if port_in_use(port)]
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
            bring_up(started)
        except SystemExit:
            if not args.keep_on_failure:
                log(
                    "stopping the half-started testbed (logs kept in "
                    f"{RUN_DIR / 'logs'}; pass --keep-on-failure to keep it running)"
                )
                teardown(keep_logs=True)
            raise
        if want_worker:
            start_worker(started, keep_on_failure=args.keep_on_failure)
    log(f"up in {human(time.monotonic() - started)}; admin kubeconfig: {KUBECONFIG}")
    print_env()


def refresh_apiserver_flags() -> None:
    """Restart kube-apiserver if an older testbed started it with other flags.

    The real worker needs ``--kubelet-preferred-address-types`` (logs, exec); kwok does not
    care, so a kwok-only testbed started before that flag existed is restarted only here.
    """
    apiserver = next(c for c in components() if c.name == "kube-apiserver")
    pid = read_pid(apiserver)
    if pid is None:
        return
    running = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    if running != [arg.encode() for arg in apiserver.argv]:
        log("restarting kube-apiserver with the current flags (watches break and resume)")
        stop(apiserver, grace=3)
        wait_healthy(apiserver, start(apiserver))


def start_worker(started: float, *, keep_on_failure: bool) -> None:
    """Add the real worker to a running control plane (the caller holds the run lock)."""
    worker = k8s_worker()
    began = time.monotonic()
    log(
        f"starting the real worker {worker.NODE_NAME} (containerd, kubelet, kube-proxy, "
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


def bring_up(started: float) -> None:
    by_name = {c.name: c for c in components()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name in ("etcd", "kube-apiserver"):
        procs[name] = start(by_name[name])
        wait_healthy(by_name[name], procs[name])
        log(f"{name} healthy ({human(time.monotonic() - started)})")
    for node in kwok_nodes():
        api("POST", "/api/v1/nodes", node)
    for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
        procs[name] = start(by_name[name])
    for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
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


def port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def teardown(*, keep_logs: bool = False) -> None:
    worker = k8s_worker()
    if worker.enabled() or any(read_pid(c) is not None for c in worker.components()):
        worker.teardown()
    for component in reversed(components()):
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


def down(_: argparse.Namespace) -> None:
    started = time.monotonic()
    with run_lock():
        running = [c.name for c in components() if read_pid(c) is not None]
        teardown()
    log(
        f"down ({'stopped ' + ', '.join(running) if running else 'nothing was running'}; "
        f"state wiped; binaries kept in {BIN_DIR}) in {human(time.monotonic() - started)}"
    )


def status(_: argparse.Namespace) -> int:
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


def restart_apiserver(_: argparse.Namespace) -> None:
    """Stop kube-apiserver and start it again; etcd and every other component stay up.

    Every watch breaks mid-stream and every client must reconnect: what a control-plane
    upgrade or a crashed apiserver does to a node (tests/integration/test_k8s_executor.py).
    """
    started = time.monotonic()
    with run_lock():
        apiserver = next(c for c in components() if c.name == "kube-apiserver")
        if read_pid(apiserver) is None:
            raise fail("kube-apiserver is not running; `scripts/k8s-testbed up` first")
        stop(apiserver, grace=3)  # its graceful drain of open watches would take ~10 s
        stopped = time.monotonic()
        wait_healthy(apiserver, start(apiserver))
    log(
        f"kube-apiserver restarted (down {human(time.monotonic() - stopped)}, "
        f"in all {human(time.monotonic() - started)})"
    )


def import_images(args: argparse.Namespace) -> None:
    """Copy podman images into the real worker's containerd (nothing is ever pulled)."""
    worker = k8s_worker()
    if not worker.enabled() or read_pid(worker.components()[0]) is None:
        raise fail("the real worker is not running; `scripts/k8s-testbed up --real-worker`")
    started = time.monotonic()
    with run_lock():
        done = worker.import_images(tuple(args.images))
    log(
        f"imported {', '.join(done) if done else 'nothing (all current)'} in "
        f"{human(time.monotonic() - started)}"
    )


def print_env(_: argparse.Namespace | None = None) -> None:
    print(f"export KUBECONFIG={KUBECONFIG}")


def attach(args: argparse.Namespace) -> None:
    """Give another cluster (e.g. kind) the testbed's kwok nodes and pod stages.

    Creates the four fake nodes with kubectl, then runs kwok in the foreground (Ctrl-C
    stops it; the nodes stay and turn NotReady).
    """
    kubeconfig = Path(args.kubeconfig).expanduser().resolve()
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
    argv = kwok_argv(kubeconfig, workdir / "kwok.yaml", args.port)
    os.execv(argv[0], argv)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def k8s_worker() -> Any:
    """The real-worker module (scripts/k8s_worker.py), imported on first use.

    It imports this module back for its helpers; run as a script, this module is
    ``__main__``, so it is registered under its own name first (one module, not two).
    """
    sys.modules.setdefault("k8s_testbed", sys.modules[__name__])
    import k8s_worker as worker

    return worker


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/k8s-testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build (or reuse) the pinned binaries")
    p_build.add_argument("--jobs", "-p", type=int, default=2, help="go build -p (default 2)")
    p_build.add_argument(
        "--real-worker",
        action="store_true",
        help="also build kubelet, kube-proxy, Cilium and CoreDNS (or FEDNODE_REAL_WORKER=1)",
    )
    p_up = sub.add_parser("up", help="start the testbed (no-op when it is up and healthy)")
    p_up.add_argument(
        "--real-worker",
        action="store_true",
        help="add a real worker node (containerd, kubelet, Cilium) beside the "
        "kwok nodes (or FEDNODE_REAL_WORKER=1)",
    )
    p_up.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="leave the processes running when start-up fails (to debug)",
    )
    sub.add_parser("down", help="stop everything and wipe the run state (keeps binaries)")
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
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args)
    elif args.command == "up":
        up(args)
    elif args.command == "down":
        down(args)
    elif args.command == "status":
        return status(args)
    elif args.command == "attach":
        attach(args)
    elif args.command == "restart-apiserver":
        restart_apiserver(args)
    elif args.command == "import-images":
        import_images(args)
    else:
        print_env(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
