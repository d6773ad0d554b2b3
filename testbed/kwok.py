"""kwok: the fake nodes, and the pod behaviour tests choose with annotations.

kwok plays the kubelet for three CPU nodes and one GPU node (it manages only nodes with
the ``kwok.x-k8s.io/node=fake`` annotation, so the real worker is left alone). Pods on them
follow the Stages in ``files/kwok-stages.yaml``: the annotations below choose how long a
pod runs, how it ends, or that its image is missing. ``tests/peers/kubernetes.py``
imports these names.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

from testbed.layout import BIN_DIR, HOST, POD_CIDR

FILES = Path(__file__).parent / "files"

POD_RUN_SECONDS = "fednode.test/run-seconds"  # "1" (default), "0.2", "forever"
POD_START_SECONDS = "fednode.test/start-seconds"  # "0" (default)
POD_EXIT_CODE = "fednode.test/exit-code"  # "3" -> terminated exitCode 3, phase Failed
POD_OOM_KILLED = "fednode.test/oom-killed"  # "true" -> exitCode 137, reason OOMKilled
POD_IMAGE_MISSING = "fednode.test/image-missing"  # "true" -> Pending, ErrImagePull

#: Annotations that steer a pod on the kwok nodes (documented in docs/testing.md).
POD_BEHAVIOUR = {
    POD_RUN_SECONDS: 'seconds the container "runs" before it exits (default 1; '
    'decimals allowed); "forever" = runs until deleted',
    POD_START_SECONDS: "seconds from scheduled to Running (default 0)",
    POD_EXIT_CODE: "exit code of the container(s); non-zero -> reason Error, "
    'phase Failed (default "0" -> Completed, Succeeded)',
    POD_OOM_KILLED: '"true" -> exit code 137, reason OOMKilled, phase Failed',
    POD_IMAGE_MISSING: '"true" -> stays Pending, waiting reason ErrImagePull '
    '(also any image containing "/missing/" or ending ":missing")',
}

NODE_SELECTOR_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
CPU_NODES = tuple(f"kwok-cpu-{i}" for i in range(3))
GPU_NODE = "kwok-gpu-0"  # advertises nvidia.com/gpu: 4, label fednode.test/gpu=true
GPU_LABEL = "fednode.test/gpu"

#: How the terminated-pod patch (TERMINATED in kwok-stage-parts.yaml) is filled for each
#: stage that ends a pod.
_TERMINATED_AS = {
    "SUCCEEDED": {"COND": "PodCompleted", "EXIT_CODE": "0", "REASON": "Completed"}
    | {"PHASE": "Succeeded", "MESSAGE": '""'},
    "FAILED": {
        "COND": "PodFailed",
        "EXIT_CODE": '{{ index $root.metadata.annotations "fednode.test/exit-code" }}',
        "REASON": "Error",
        "PHASE": "Failed",
        "MESSAGE": '""',
    },
    "OOM_KILLED": {"COND": "PodFailed", "EXIT_CODE": "137", "REASON": "OOMKilled"}
    | {"PHASE": "Failed", "MESSAGE": '""'},
    "KILLED": {"COND": "PodFailed", "EXIT_CODE": "143", "REASON": "Error", "PHASE": "Failed"}
    | {"MESSAGE": '"terminated on pod deletion"'},
}


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
            labels[GPU_LABEL] = "true"
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

    return [*(node(name) for name in CPU_NODES), node(GPU_NODE, gpus=4)]


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace each ``@NAME@`` in ``template``: a line of only a marker takes a block,
    indented to that line; a marker inside a line takes a one-line value."""

    def block(match: re.Match[str]) -> str:
        return textwrap.indent(values[match.group(2)], match.group(1))

    text = re.sub(r"^( *)@([A-Z_]+)@$", block, template, flags=re.M)
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], text)


def kwok_stages() -> str:
    """The multi-document kwok config: every pod Stage (node stages stay kwok's defaults)."""
    import yaml  # `up` and `attach` run in the project's virtualenv; `build` does not

    parts: dict[str, str] = yaml.safe_load((FILES / "kwok-stage-parts.yaml").read_text())
    terminated = parts.pop("TERMINATED")
    for name, values in _TERMINATED_AS.items():
        parts[name] = _fill(terminated, values)
    return _fill((FILES / "kwok-stages.yaml").read_text(), parts)


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
