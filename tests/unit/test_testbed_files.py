"""The testbed's YAML and configuration templates render into what kwok and the real
worker's processes read: every marker filled, every document well-formed.

The real check is the testbed itself (tests/integration/test_k8s_testbed.py drives pods
through every stage); these catch a broken template in seconds, without a cluster.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import kwok
from testbed.layout import PORTS
from testbed.worker import config
from testbed.worker.layout import (
    COREDNS_IMAGE,
    NODE_IP,
    NODE_NAME,
    REAL_LABEL,
    REAL_TAINT,
    REAL_TOLERATION,
)


def test_the_kwok_stages_are_the_whole_pod_lifecycle_with_no_marker_left() -> None:
    text = kwok.kwok_stages()
    assert not re.search(r"@[A-Z_]+@", text)
    stages = [doc for doc in yaml.safe_load_all(text) if doc]
    assert [s["metadata"]["name"] for s in stages] == [
        "fednode-pod-start",
        "fednode-pod-image-missing",
        "fednode-pod-succeed",
        "fednode-pod-fail",
        "fednode-pod-oom-killed",
        "fednode-pod-terminate",
        "fednode-pod-delete",
    ]
    assert {s["kind"] for s in stages} == {"Stage"}


def test_each_ending_stage_reports_its_own_exit_code_reason_and_phase() -> None:
    stages = {s["metadata"]["name"]: s for s in yaml.safe_load_all(kwok.kwok_stages()) if s}

    def template(name: str) -> str:
        return str(stages[name]["spec"]["next"]["patches"][0]["template"])

    assert "exitCode: 0\n" in template("fednode-pod-succeed")
    assert "phase: Succeeded" in template("fednode-pod-succeed")
    assert f'"{kwok.POD_EXIT_CODE}"' in template("fednode-pod-fail")
    assert "reason: OOMKilled" in template("fednode-pod-oom-killed")
    assert "exitCode: 137" in template("fednode-pod-oom-killed")
    assert 'message: "terminated on pod deletion"' in template("fednode-pod-terminate")


def test_the_annotations_the_stages_read_are_the_ones_tests_are_given() -> None:
    text = kwok.kwok_stages()
    for annotation in kwok.POD_BEHAVIOUR:
        assert annotation in text, annotation


def test_the_worker_configurations_name_the_worker_layout() -> None:
    kubelet = config.kubelet_config()
    assert kubelet["address"] == NODE_IP
    assert kubelet["registerWithTaints"] == [REAL_TAINT]
    proxy = config.kube_proxy_config()
    assert proxy["hostnameOverride"] == NODE_NAME
    assert proxy["nodePortAddresses"] == [f"{NODE_IP}/32"]
    containerd = config.containerd_config()
    assert "${" not in containerd
    assert 'sandbox_image = "localhost/fednode/pause:1"' in containerd


def test_the_manifests_point_the_kubernetes_service_at_the_relay_and_dns_at_the_worker() -> None:
    bootstrap = config.manifests("bootstrap.yaml")
    assert [o["kind"] for o in bootstrap] == [
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "Endpoints",
        "EndpointSlice",
    ]
    (slice_,) = [o for o in bootstrap if o["kind"] == "EndpointSlice"]
    assert slice_["endpoints"][0]["addresses"] == [NODE_IP]
    assert slice_["ports"][0]["port"] == PORTS["kube-apiserver"]
    dns = {o["kind"]: o for o in config.manifests("dns.yaml")}
    pod = dns["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {REAL_LABEL: "true"}
    assert pod["tolerations"] == [REAL_TOLERATION]
    assert pod["containers"][0]["image"] == COREDNS_IMAGE
    assert dns["ConfigMap"]["data"]["Corefile"].startswith("cluster.local:53 {\n")


def test_kueues_webhooks_are_called_at_its_local_url_and_its_job_hooks_only_in_marked_namespaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testbed import kueue

    (tmp_path / "ca.crt").write_bytes(b"the testbed CA")
    monkeypatch.setattr(kueue, "PKI", tmp_path)

    def hook(name: str, group: str, resource: str) -> dict[str, Any]:
        path = f"/mutate-{name}"
        rule = {"apiGroups": [group], "resources": [resource], "operations": ["CREATE"]}
        service = {"name": "webhook-service", "namespace": "system", "path": path}
        return {"name": name, "clientConfig": {"service": service}, "rules": [rule]}

    manifests = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mutating-webhook-configuration"},
            "webhooks": [
                hook("mjob.kb.io", "batch", "jobs"),
                hook("mpod.kb.io", "", "pods"),  # the pod integration is off
                hook("mworkload.kb.io", "kueue.x-k8s.io", "workloads"),
            ],
        }
    ]
    (config,) = kueue.webhook_configurations(manifests)
    assert config["metadata"] == {"name": "fednode-testbed-kueue-mutating"}
    hooks = {h["name"]: h for h in config["webhooks"]}
    assert set(hooks) == {"mjob.kb.io", "mworkload.kb.io"}
    assert hooks["mjob.kb.io"]["clientConfig"] == {
        "url": f"https://127.0.0.1:{kueue.WEBHOOK_PORT}/mutate-mjob.kb.io",
        "caBundle": "dGhlIHRlc3RiZWQgQ0E=",
    }
    assert hooks["mjob.kb.io"]["namespaceSelector"] == {
        "matchLabels": {kueue.NAMESPACE_LABEL: "true"}
    }
    assert "namespaceSelector" not in hooks["mworkload.kb.io"]  # only Kueue's own objects
    assert (
        kueue.config()["managedJobsNamespaceSelector"] == hooks["mjob.kb.io"]["namespaceSelector"]
    )
    assert len({kueue.WEBHOOK_PORT, kueue.HEALTH_PORT, *PORTS.values()}) == len(PORTS) + 2
