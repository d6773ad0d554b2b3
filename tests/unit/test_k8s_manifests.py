"""What a run looks like on Kubernetes, and the isolation objects and Role around it."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from executors.kubernetes.config import DatabaseVolume, KubernetesSettings
from executors.kubernetes.manifests import (
    ManifestError,
    job_name,
    run_job,
    sealed_token_of,
    token_secret,
)
from executors.kubernetes.proxy_address import ProxyServiceError, proxy_endpoint_of
from executors.kubernetes.rbac import (
    APPLY_NETWORK_POLICIES_RULE,
    ROLE_RULES,
    role_binding_manifest,
    role_manifest,
    role_rules,
)
from executors.spec import DatabaseMount, Resources, RunSpec
from policies.network import (
    PeerAccess,
    RunIsolation,
    peers_policy_name,
    policy_differences,
    policy_name_prefix,
    proxy_peer,
    run_network_policies,
)
from policies.pod_security import enforces, namespace_labels, pod_security_problems

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def spec(**fields: Any) -> RunSpec:
    values: dict[str, Any] = {
        "run_id": 12,
        "task_id": 34,
        "organization_id": 1,
        "collaboration_id": 2,
        "image": "harbor.example/algo:1",
        "token": SecretStr("t0ken"),
        "environment": {"HOST": "http://proxy", "PORT": "7654"},
        "resources": Resources(cpu=1.5, memory_mb=512),
        **fields,
    }
    return RunSpec(**values)


def job_for(
    run: RunSpec,
    settings: KubernetesSettings | None = None,
    pin: str | None = None,
    *,
    token_secret: str | None = "j-token",
) -> dict[str, Any]:
    return run_job(
        run,
        settings=settings or KubernetesSettings(),
        namespace="runs",
        name="j",
        labels={"a": "b"},
        token_secret_name=token_secret,
        pin_to_node=pin,
    )


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = job["spec"]["template"]["spec"]
    return pod


def test_the_pod_is_locked_down_as_pod_security_restricted_requires() -> None:
    pod = pod_of(job_for(spec()))
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"] == {
        "requests": {"cpu": "1500m", "memory": "512Mi"},
        "limits": {"cpu": "1500m", "memory": "512Mi"},
    }
    assert {"name": "HOST", "value": "http://proxy"} in container["env"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "hostPath" not in str(volumes)
    assert volumes["token"]["secret"]["secretName"] == "j-token"


def test_the_run_sees_its_three_files_one_by_one_and_may_write_only_its_output() -> None:
    """Never the run's folder: a run that could write there could put a link in place of
    its output (issue 13). Only the output is writable."""
    for secret in ("j-token", None):
        job = job_for(spec(), token_secret=secret)
        mounts = {
            m["mountPath"]: m
            for m in pod_of(job)["containers"][0]["volumeMounts"]
            if m["mountPath"].startswith("/mnt/task")
        }
        assert set(mounts) == {"/mnt/task/input", "/mnt/task/output", "/mnt/task/token"}
        writable = {path for path, mount in mounts.items() if not mount.get("readOnly")}
        assert writable == {"/mnt/task/output"}
        assert mounts["/mnt/task/input"]["subPath"] == "run-12/input"
        assert mounts["/mnt/task/output"]["subPath"] == "run-12/output"
        token = mounts["/mnt/task/token"]
        if secret:
            assert (token["name"], token["subPath"]) == ("token", "token")
        else:
            assert (token["name"], token["subPath"]) == ("task", "run-12/token")


def test_a_gpu_run_asks_for_the_resource_and_goes_where_gpus_are() -> None:
    settings = KubernetesSettings(
        gpu_node_selector={"gpu": "yes"},
        node_selector={"zone": "a"},
        gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        gpu_type_label="nvidia.com/gpu.product",
    )
    pod = pod_of(job_for(spec(resources=Resources(gpus=2, gpu_type="A100")), settings))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"zone": "a", "gpu": "yes", "nvidia.com/gpu.product": "A100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_only = pod_of(job_for(spec(), settings))
    assert cpu_only["nodeSelector"] == {"zone": "a"} and "tolerations" not in cpu_only


def test_read_write_once_pins_the_run_to_the_nodes_kubernetes_node() -> None:
    pod = pod_of(job_for(spec(), pin="worker-3"))
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["worker-3"]


def test_databases_are_mounted_read_only_from_their_configured_volumes() -> None:
    settings = KubernetesSettings(
        databases={
            "default": DatabaseVolume(claim="data", sub_path="csv"),
            "notes": DatabaseVolume(config_map="notes"),
        }
    )
    run = spec(
        databases=(
            DatabaseMount(label="default", type="csv", uri="/srv/data/a.csv", is_local_path=True),
            DatabaseMount(label="notes", type="folder", uri="/srv/notes", is_local_path=True),
            DatabaseMount(label="pg", type="sql", uri="postgres://db", is_local_path=False),
        )
    )
    pod = pod_of(job_for(run, settings))
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert (
        mounts["/mnt/data/default"]["readOnly"] and mounts["/mnt/data/default"]["subPath"] == "csv"
    )
    assert mounts["/mnt/data/notes"]["readOnly"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/mnt/data/default"]["name"]]["persistentVolumeClaim"] == {
        "claimName": "data",
        "readOnly": True,
    }
    assert not any(p.startswith("/mnt/data/pg") for p in mounts)
    with pytest.raises(ManifestError, match="no volume"):
        job_for(run)


def test_the_job_carries_ids_trace_and_safety_nets() -> None:
    job = job_for(
        spec(
            parent_task_id=5,
            deadline_seconds=60,
            trace_context={"traceparent": "00-ab-cd-01", "tracestate": "x=1"},
        )
    )
    annotations = job["metadata"]["annotations"]
    assert annotations["fednode.io/run-id"] == "12"
    assert annotations["fednode.io/parent-task-id"] == "5"
    assert annotations["fednode.io/traceparent"] == "00-ab-cd-01"
    assert annotations["fednode.io/tracestate"] == "x=1"
    assert job["spec"]["activeDeadlineSeconds"] == 61  # never before the deadline
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600


def test_the_job_carries_the_sealed_token_back_but_never_the_token() -> None:
    job = job_for(spec(sealed_token="v1.c2VhbGVk"))
    annotations = job["metadata"]["annotations"]
    assert sealed_token_of(annotations) == "v1.c2VhbGVk"
    assert "t0ken" not in str(job)  # the token itself is only in the Secret
    assert sealed_token_of(job_for(spec())["metadata"]["annotations"]) is None


def test_a_run_without_token_has_no_secret_mount_and_the_secret_is_immutable() -> None:
    run = spec(token=None)
    pod = pod_of(
        run_job(
            run,
            settings=KubernetesSettings(),
            namespace="n",
            name="j",
            labels={},
            token_secret_name=None,
            pin_to_node=None,
        )
    )
    assert all(v["name"] != "token" for v in pod["volumes"])
    job = {"metadata": {"name": "j", "uid": "u-1"}}
    secret = token_secret(spec(), namespace="n", name="s", labels={}, owner=job)
    assert secret["immutable"] is True and secret["data"]["token"] == "dDBrZW4="
    # Created already owned by its Job: it goes with the Job, and no patch is needed.
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_job_names_are_stable_dns_labels_per_node_and_run() -> None:
    name = job_name("hospital A", 123456789012)
    assert name == job_name("hospital A", 123456789012) != job_name("hospital B", 123456789012)
    assert DNS_LABEL.match(name) and len(name) <= 52  # room for the pod name's suffix


def test_database_volume_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError):
        DatabaseVolume()
    with pytest.raises(ValidationError):
        DatabaseVolume(claim="a", config_map="b")
    with pytest.raises(ValidationError):
        DatabaseVolume(config_map="b", sub_path="x")


# -- isolation objects and the Role -------------------------------------------------------


def test_network_policies_deny_everything_then_allow_only_the_proxy_not_dns() -> None:
    deny, egress = run_network_policies(
        RunIsolation(
            namespace="runs",
            run_selector={"node": "n"},
            allowed=(proxy_peer(namespace="fednode", pod_selector={"app": "node"}, port=7654),),
        )
    )
    assert deny["spec"] == {
        "podSelector": {"matchLabels": {"node": "n"}},
        "policyTypes": ["Ingress", "Egress"],
    }
    (proxy,) = egress["spec"]["egress"]  # no rule for port 53: DNS is a way around the proxy
    assert proxy == {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fednode"}},
                "podSelector": {"matchLabels": {"app": "node"}},
            }
        ],
        "ports": [{"port": 7654, "protocol": "TCP"}],
    }
    assert "ingress" not in egress["spec"]


def test_with_peering_the_node_may_reach_the_runs_and_the_runs_its_forwarders_only() -> None:
    isolation = RunIsolation(
        namespace="runs",
        run_selector={"node": "n"},
        allowed=(proxy_peer(namespace="fednode", pod_selector={"app": "node"}, port=7654),),
        peers=PeerAccess(
            namespace="fednode", node_selector={"app": "node"}, forwarder_ports=(7700, 7701)
        ),
        name_prefix="p",
    )
    _, _, peers = run_network_policies(isolation)
    assert peers["metadata"]["name"] == peers_policy_name("p") == "p-peers"
    node_pods = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fednode"}},
        "podSelector": {"matchLabels": {"app": "node"}},
    }
    assert peers["spec"] == {
        "podSelector": {"matchLabels": {"node": "n"}},
        "policyTypes": ["Ingress", "Egress"],
        # the node connects to a run's declared port (any: the image chooses it) ...
        "ingress": [{"from": [node_pods]}],
        # ... and runs reach the forwarder ports on the node pod, nothing else (no other run)
        "egress": [
            {
                "to": [node_pods],
                "ports": [{"port": 7700, "protocol": "TCP"}, {"port": 7701, "protocol": "TCP"}],
            }
        ],
    }
    # without peering there is no such policy, and the Role reads it only with peering
    assert len(run_network_policies(isolation.model_copy(update={"peers": None}))) == 2
    (rule,) = [r for r in role_rules("n", peers=True) if r["resources"] == ["networkpolicies"]]
    assert rule["resourceNames"][-1] == "fednode-runs-n-peers"


def test_pod_security_levels_are_checked_not_assumed() -> None:
    assert pod_security_problems(namespace_labels("restricted")) == []
    assert "missing" in pod_security_problems({})[0]
    assert "weaker" in pod_security_problems(namespace_labels("baseline"))[0]
    assert enforces(namespace_labels("restricted"), "baseline")
    assert not enforces({}, "baseline")


def test_the_role_is_namespaced_and_grants_only_what_the_executor_uses() -> None:
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in ROLE_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted == {
        ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
        ("", "pods"): {"list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "secrets"): {"create", "delete"},
        ("", "namespaces"): {"get"},
    }
    assert role_manifest("runs", node_name="n")["kind"] == "Role"
    binding = role_binding_manifest(
        "runs", service_account="fednode", service_account_namespace="fednode"
    )
    assert binding["roleRef"]["kind"] == "Role"


def test_the_node_may_only_read_its_own_runs_policies_unless_told_to_apply_them() -> None:
    (rule,) = [r for r in role_rules("Hospital_A.node") if r["resources"] == ["networkpolicies"]]
    assert rule["verbs"] == ["get"]
    assert rule["resourceNames"] == [
        "fednode-runs-hospital-a-node-default-deny",
        "fednode-runs-hospital-a-node-egress",
    ]
    (applying,) = [
        r
        for r in role_rules("n", apply_network_policies=True)
        if r["resources"] == ["networkpolicies"]
    ]
    assert applying == APPLY_NETWORK_POLICIES_RULE
    assert set(applying["verbs"]) == {"get", "create", "patch"}
    assert len(policy_name_prefix("x" * 63)) <= 40


def test_the_node_may_read_the_proxy_service_by_name_and_no_other_service() -> None:
    assert not [r for r in role_rules("n") if r["resources"] == ["services"]]
    (rule,) = [
        r for r in role_rules("n", proxy_service="fn-proxy") if r["resources"] == ["services"]
    ]
    assert rule == {
        "apiGroups": [""],
        "resources": ["services"],
        "resourceNames": ["fn-proxy"],
        "verbs": ["get"],
    }


def service(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "fn-proxy"}, "spec": spec}


def test_runs_are_given_the_proxy_services_cluster_ip_and_port() -> None:
    chart = service(
        type="ClusterIP",
        clusterIP="10.96.12.34",
        ports=[{"name": "proxy", "port": 7654, "targetPort": "proxy", "protocol": "TCP"}],
    )
    endpoint = proxy_endpoint_of(chart, proxy_port=7654)
    assert (endpoint.host, endpoint.port) == ("10.96.12.34", 7654)
    # one unnamed port, forwarding to the proxy's port (the test peers' relay Service)
    relay = service(clusterIP="10.96.0.99", ports=[{"port": 8000, "targetPort": 7654}])
    assert proxy_endpoint_of(relay, proxy_port=7654).port == 8000
    # among several, the one named proxy
    named = service(
        clusterIP="fd00::12",
        ports=[{"name": "metrics", "port": 9000}, {"name": "proxy", "port": 7654}],
    )
    assert proxy_endpoint_of(named, proxy_port=7654).host == "fd00::12"


@pytest.mark.parametrize(
    ("spec_", "says"),
    [
        ({"clusterIP": "None", "ports": [{"port": 7654}]}, "headless"),
        ({"type": "ExternalName", "externalName": "x.example"}, "no cluster IP"),
        ({"clusterIP": "10.0.0.1", "ports": [{"port": 1}, {"port": 2}]}, "name the proxy's"),
        ({"clusterIP": "10.0.0.1", "ports": [{"port": 80, "targetPort": 8080}]}, "pod port 8080"),
    ],
)
def test_a_service_that_cannot_carry_runs_to_the_proxy_is_refused(
    spec_: dict[str, Any], says: str
) -> None:
    with pytest.raises(ProxyServiceError, match=says):
        proxy_endpoint_of(service(**spec_), proxy_port=7654)


def test_a_policy_differs_only_in_substance() -> None:
    isolation = RunIsolation(
        namespace="runs",
        run_selector={"fednode.io/node": "n"},
        allowed=(
            proxy_peer(namespace="fednode", pod_selector={"app": "node"}, port=7654),
            proxy_peer(namespace="fednode", pod_selector={"app": "node"}, port=7655),
        ),
    )
    _, egress = run_network_policies(isolation)
    # what the API server gives back: its own metadata, rules in another order
    found = {
        "metadata": {"name": "x", "uid": "u", "labels": {"other": "label"}},
        "spec": {
            **egress["spec"],
            "egress": list(reversed(egress["spec"]["egress"])),
            "ingress": [],
        },
    }
    assert policy_differences(egress, found) == []
    opened = {
        "spec": {
            **egress["spec"],
            "egress": [*egress["spec"]["egress"], {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
        }
    }
    (problem,) = policy_differences(egress, opened)
    assert problem.startswith("spec.egress is") and "0.0.0.0/0" in problem
    narrowed = {"spec": {**egress["spec"], "podSelector": {"matchLabels": {"run": "1"}}}}
    assert [p.split(" ")[0] for p in policy_differences(egress, narrowed)] == ["spec.podSelector"]


# -- Kueue -----------------------------------------------------------------------------------


def test_with_kueue_the_job_is_created_suspended_with_its_queue_and_priority_labels() -> None:
    plain = job_for(spec(resources=Resources(gpus=1)))
    assert "suspend" not in plain["spec"]
    assert plain["metadata"]["labels"] == {"a": "b"}

    settings = KubernetesSettings(kueue={"queue_name": "gpu-runs", "priority_class": "low"})
    job = job_for(spec(resources=Resources(gpus=1)), settings)
    assert job["spec"]["suspend"] is True  # Kueue unsuspends it on admission; we never do
    assert job["metadata"]["labels"] == {
        "a": "b",
        "kueue.x-k8s.io/queue-name": "gpu-runs",
        "kueue.x-k8s.io/priority-class": "low",
    }
    # the pod's labels stay the run's (the runs' NetworkPolicies select on them)
    assert job["spec"]["template"]["metadata"]["labels"] == {"a": "b"}
    assert pod_of(job)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    without_priority = job_for(spec(), KubernetesSettings(kueue={"queue_name": "q"}))
    assert "kueue.x-k8s.io/priority-class" not in without_priority["metadata"]["labels"]


@pytest.mark.parametrize("queue", ["", "Upper", "-dash", "a" * 64, "has space"])
def test_a_queue_name_that_cannot_be_a_label_value_is_refused(queue: str) -> None:
    with pytest.raises(ValidationError, match=r"kueue\.queue_name"):
        KubernetesSettings.model_validate({"kueue": {"queue_name": queue}})


def test_kueues_rule_lets_the_node_read_workloads_and_nothing_more() -> None:
    assert not any(r["apiGroups"] == ["kueue.x-k8s.io"] for r in role_rules("n"))
    (rule,) = [r for r in role_rules("n", kueue=True) if r["apiGroups"] == ["kueue.x-k8s.io"]]
    assert rule == {
        "apiGroups": ["kueue.x-k8s.io"],
        "resources": ["workloads"],
        "verbs": ["list", "watch"],
    }
