"""The Helm chart as a real helm renders it: lint, defaults, every option, the schema's
refusals, and agreement with what it mirrors (the executor's Role in rbac.py, the Pod
Security labels, the node's and the executor's settings)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from executors.kubernetes.config import KubernetesSettings
from executors.kubernetes.executor import run_network_policy_manifests
from executors.kubernetes.rbac import ROLE_RULES, role_rules
from node.settings import PeeringSettings, load_settings
from policies.network import policy_name_prefix
from policies.pod_security import container_security_context, namespace_labels
from tests.peers.helm import (
    CHART,
    EXISTING_VALUES,
    FULL_VALUES,
    REPO,
    REQUIRED_VALUES,
    helm,
    merged,
    node_yaml,
    one,
    private_key_pem,
    render,
    schema_leaves,
)


@pytest.fixture(scope="module")
def full_values() -> dict[str, Any]:
    return merged(FULL_VALUES, {"encryption": {"privateKey": private_key_pem()}})


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def node_policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The node pod's own NetworkPolicy (the runs' two are the chart's too)."""
    name = one(objects, "Deployment")["metadata"]["name"] + "-node"
    return one(objects, "NetworkPolicy", name)


def pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    labels: dict[str, str] = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (node,) = pod_spec(objects)["containers"]
    return dict(node)


def load_node_yaml(config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The chart's node.yaml through the node's own loader (the key comes from the env)."""
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("FEDNODE_API_KEY", "from-the-secret")
    return load_settings(path)


# -- generated files --------------------------------------------------------------------


def test_the_generated_role_rules_and_values_reference_are_current() -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "gen-helm-docs"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_role_rules_file_is_rbac_py() -> None:
    rules = yaml.safe_load((CHART / "files" / "role-rules.yaml").read_text())
    assert rules == ROLE_RULES


def test_the_value_sets_set_every_documented_key() -> None:
    def has(values: dict[str, Any], path: tuple[str, ...]) -> bool:
        for key in path:
            if not isinstance(values, dict) or key not in values:
                return False
            values = values[key]
        return True

    missing = [
        ".".join(p)
        for p in schema_leaves()
        if not has(FULL_VALUES, p) and not has(EXISTING_VALUES, p)
    ]
    assert missing == []
    item_keys = set().union(*(db.keys() for db in FULL_VALUES["databases"]))
    documented = set(CHART_SCHEMA_DATABASE_KEYS)
    assert documented - item_keys == set()


CHART_SCHEMA_DATABASE_KEYS = tuple(
    yaml.safe_load((CHART / "values.schema.json").read_text())["properties"]["databases"]["items"][
        "properties"
    ]
)


def test_the_charts_app_version_is_fednodes_version_and_the_node_images_tag() -> None:
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]  # scripts/node-image tags it so


# -- lint ---------------------------------------------------------------------------------


@pytest.mark.helm
@pytest.mark.parametrize("which", ["required", "full", "existing"])
def test_helm_lint_passes(which: str, full_values: dict[str, Any], tmp_path: Path) -> None:
    values = {"required": REQUIRED_VALUES, "full": full_values, "existing": EXISTING_VALUES}
    result = helm("lint", "--strict", str(CHART), values=values[which], tmp=tmp_path)
    assert "0 chart(s) failed" in result.stdout


# -- defaults -----------------------------------------------------------------------------


#: Cluster-scoped objects the chart makes (the admission policies bind to its namespace).
CLUSTER_SCOPED = {
    "Namespace",
    "PersistentVolume",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


@pytest.mark.helm
def test_defaults_render_one_namespaced_node_and_its_admission_policies(tmp_path: Path) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)

    assert kinds(objects) == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "Secret",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Role",
            "RoleBinding",
            "Service",
            "NetworkPolicy",  # the node pod's
            "NetworkPolicy",  # the namespace's default deny
            "NetworkPolicy",  # the runs' default deny
            "NetworkPolicy",  # the runs' egress to the proxy
            "Deployment",
            "ValidatingAdmissionPolicy",  # what the node's Jobs may look like
            "ValidatingAdmissionPolicyBinding",
            "ValidatingAdmissionPolicy",  # and its Secrets
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    namespaced = [o for o in objects if o["kind"] not in CLUSTER_SCOPED]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"fednode"}
    assert not [o for o in objects if o["kind"].startswith("Cluster")]  # no ClusterRole
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["name"] == "fednode"
    assert namespace["metadata"]["labels"].items() >= namespace_labels("restricted").items()
    assert namespace["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.helm
def test_the_role_is_rbac_py_bound_to_the_node_service_account_only(tmp_path: Path) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)

    role, binding = one(objects, "Role"), one(objects, "RoleBinding")
    # reads its runs' NetworkPolicies and its proxy Service, by name
    assert role["rules"] == role_rules("fn", proxy_service="fn-fednode-proxy")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = one(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "fednode"}
    ]
    assert pod_spec(objects)["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False
    assert pod_spec(objects)["automountServiceAccountToken"] is True


@pytest.mark.helm
def test_the_node_pod_is_restricted_like_its_runs(tmp_path: Path) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)
    deployment = one(objects, "Deployment")
    spec, node = pod_spec(objects), container(objects)

    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["fsGroup"] == 10001
    # the same container context the executor gives every run, with the runs' uid/gid
    assert node["securityContext"] == container_security_context(
        run_as_user=10001, run_as_group=10001
    )
    mounts = {m["mountPath"]: m for m in node["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/fednode"]["readOnly"] is True
    assert node["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert node["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert node["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert node["image"] == "localhost/fednode/node:0.1.0"  # the chart's appVersion
    assert node["args"] == ["start", "-c", "/etc/fednode/node.yaml"]
    api_key = next(e for e in node["env"] if e["name"] == "FEDNODE_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"] == {"name": "fn-fednode", "key": "api-key"}


@pytest.mark.helm
def test_the_proxy_service_and_the_runs_policies_select_labels_the_node_pod_carries(
    tmp_path: Path,
) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)
    labels = pod_labels(objects)
    config = node_yaml(objects)
    service = one(objects, "Service")
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}

    assert service["spec"]["selector"].items() <= labels.items()
    assert config["executor"]["proxy_pod_selector"].items() <= labels.items()
    assert config["executor"]["proxy_namespace"] == "fednode"
    assert (
        service["spec"]["ports"][0]["port"]
        == ports["proxy"]
        == config["executor"]["proxy_port"]
        == config["proxy"]["port"]
        == 7654
    )
    assert service["spec"]["ports"][0]["targetPort"] == "proxy"
    assert config["proxy"]["host"] == "0.0.0.0"
    # runs are given the Service's ClusterIP, which the node reads by the Service's name
    assert "advertise_host" not in config["proxy"]
    assert config["executor"]["proxy_service"] == service["metadata"]["name"]
    assert service["spec"]["ports"][0]["name"] == "proxy"  # proxy_address.PROXY_PORT_NAME
    assert config["health"] == {
        "enabled": True,
        "host": "0.0.0.0",
        "port": ports["health"],
        "metrics": True,
    }
    # the runs' own selector (executors/base.py run_labels) is not the node pod's
    assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.helm
@pytest.mark.parametrize("values", ["required", "full"])
def test_the_chart_renders_exactly_the_runs_policies_the_node_verifies(
    values: str,
    full_values: dict[str, Any],
    tmp_path: Path,
) -> None:
    objects = render(REQUIRED_VALUES if values == "required" else full_values, tmp_path)
    config = node_yaml(objects)
    executor = KubernetesSettings.model_validate(config["executor"])
    assert executor.network_policies == "verify"

    peering = PeeringSettings.model_validate(config.get("peering", {}))
    assert bool(peering.forwarder_ports) == (values == "full")
    expected = run_network_policy_manifests(
        executor, node_name=config["name"], peer_ports=peering.forwarder_ports
    )
    rendered = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}
    for policy in expected:
        name = policy["metadata"]["name"]
        assert rendered[name]["spec"] == policy["spec"]
        assert rendered[name]["metadata"]["namespace"] == policy["metadata"]["namespace"]
    prefix = policy_name_prefix(config["name"])
    runs_policies = {name for name in rendered if name.startswith(f"{prefix}-")}
    assert runs_policies == {p["metadata"]["name"] for p in expected}  # none missing, none more
    # and the Role may read those by name, and write no NetworkPolicy at all
    (rule,) = [r for r in one(objects, "Role")["rules"] if r["resources"] == ["networkpolicies"]]
    assert sorted(rule.pop("resourceNames")) == sorted(p["metadata"]["name"] for p in expected)
    assert rule == {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get"],
    }


@pytest.mark.helm
def test_the_default_node_yaml_is_a_valid_kubernetes_node_configuration(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)
    claim = one(objects, "PersistentVolumeClaim")

    settings = load_node_yaml(node_yaml(objects), tmp_path, monkeypatch)

    assert settings.api_key.get_secret_value() == "from-the-secret"
    assert settings.name == "fn"
    assert settings.server_api_url == "https://v6.example.org:443/api"
    assert str(settings.task_dir) == "/var/lib/fednode/tasks"
    executor = settings.executor
    assert isinstance(executor, KubernetesSettings)
    assert executor.kubeconfig is None  # in-cluster service account
    assert executor.namespace == "fednode"
    assert executor.task_volume_claim == claim["metadata"]["name"]
    assert executor.task_volume_access == "ReadWriteMany" == claim["spec"]["accessModes"][0]
    assert executor.run_as_user == 10001 and executor.run_as_group == 10001
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes[mounts["/var/lib/fednode/tasks"]]["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"]
    }


@pytest.mark.helm
def test_the_namespace_denies_every_pod_that_no_other_policy_opens(tmp_path: Path) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)
    policy = one(objects, "NetworkPolicy", "fn-fednode-default-deny")

    assert policy["metadata"]["namespace"] == "fednode"
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # the node pod's own policy opens what the node needs (NetworkPolicies add up)
    assert node_policy(objects)["spec"]["egress"]
    off = render(
        merged(REQUIRED_VALUES, {"networkPolicy": {"namespaceDefaultDeny": False}}), tmp_path
    )
    assert not [o for o in off if o["metadata"]["name"] == "fn-fednode-default-deny"]


@pytest.mark.helm
def test_the_runs_policies_open_no_dns(tmp_path: Path) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)
    egress = one(objects, "NetworkPolicy", "fednode-runs-fn-egress")["spec"]["egress"]

    assert [p["port"] for rule in egress for p in rule["ports"]] == [7654]


@pytest.mark.helm
def test_the_admission_policies_match_only_the_node_service_account_in_its_namespace(
    tmp_path: Path,
) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)
    policies = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    bindings = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"]

    assert {p["metadata"]["name"] for p in policies} == {
        "fednode-fn-fednode-jobs",
        "fednode-fn-fednode-secrets",
    }
    resources = {
        p["metadata"]["name"]: p["spec"]["matchConstraints"]["resourceRules"] for p in policies
    }
    assert resources["fednode-fn-fednode-jobs"][0]["resources"] == ["jobs"]
    assert resources["fednode-fn-fednode-secrets"][0]["resources"] == ["secrets"]
    for policy in policies:
        assert policy["spec"]["failurePolicy"] == "Fail"
        (condition,) = policy["spec"]["matchConditions"]
        assert condition["expression"] == (
            "request.userInfo.username == 'system:serviceaccount:fednode:fn-fednode'"
        )
    assert {b["spec"]["policyName"] for b in bindings} == {p["metadata"]["name"] for p in policies}
    for binding in bindings:
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert binding["spec"]["matchResources"] == {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fednode"}}
        }


@pytest.mark.helm
def test_the_node_network_policy_lets_in_its_runs_and_out_dns_api_server_and_server(
    tmp_path: Path,
) -> None:
    objects = render(REQUIRED_VALUES, tmp_path)
    policy = node_policy(objects)["spec"]

    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(objects).items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    from_runs, health = policy["ingress"]
    assert from_runs["from"] == [
        {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/managed-by": "fednode", "fednode.io/node": "fn"}
            }
        }
    ]
    assert from_runs["ports"] == [{"port": 7654, "protocol": "TCP"}]
    assert health == {"ports": [{"port": 7656, "protocol": "TCP"}]}
    dns, api_server, server = policy["egress"]
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }
    assert {p["port"] for p in dns["ports"]} == {53}
    # offline (helm template) the API server's address is unknown
    assert api_server == {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
        "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
    }
    assert server["ports"] == [{"port": 443, "protocol": "TCP"}]
    # no Cilium here (helm template knows only the built-in APIs): no CiliumNetworkPolicy
    assert not [o for o in objects if o["kind"] == "CiliumNetworkPolicy"]


@pytest.mark.helm
def test_under_cilium_the_node_pod_also_gets_egress_to_the_api_server_entity(
    tmp_path: Path,
) -> None:
    """Cilium gives the API server an identity no ipBlock selects: without this policy the
    node pod's requests to it time out and the node cannot start (seen on the testbed's
    real worker, tests/e2e/test_helm_real_worker.py)."""
    values = merged(REQUIRED_VALUES, {"networkPolicy": {"apiServer": {"ports": [16443]}}})
    objects = render(values, tmp_path, api_versions=("cilium.io/v2/CiliumNetworkPolicy",))
    never = merged(values, {"networkPolicy": {"apiServer": {"cilium": "never"}}})
    always = merged(REQUIRED_VALUES, {"networkPolicy": {"apiServer": {"cilium": "always"}}})

    policy = one(objects, "CiliumNetworkPolicy", "fn-fednode-node-apiserver")
    assert policy["apiVersion"] == "cilium.io/v2"
    assert policy["metadata"]["namespace"] == "fednode"
    assert (
        policy["spec"]["endpointSelector"]["matchLabels"]
        == node_policy(objects)["spec"]["podSelector"]["matchLabels"]
    )
    assert policy["spec"]["egress"] == [
        {
            "toEntities": ["kube-apiserver"],
            "toPorts": [{"ports": [{"port": "16443", "protocol": "TCP"}]}],
        }
    ]
    assert not [o for o in render(never, tmp_path) if o["kind"] == "CiliumNetworkPolicy"]
    assert [o["kind"] for o in render(always, tmp_path)].count("CiliumNetworkPolicy") == 1


# -- every option -------------------------------------------------------------------------


@pytest.mark.helm
def test_every_option_reaches_the_objects_and_node_yaml(
    full_values: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render(full_values, tmp_path)
    config = node_yaml(objects)
    spec, node = pod_spec(objects), container(objects)

    # the node's settings (databases and key checked below: their files exist in the pod)
    assert config["encryption"] == {
        "enabled": True,
        "private_key": "/var/run/secrets/fednode/private-key.pem",
    }
    key = tmp_path / "private-key.pem"
    key.write_text(full_values["encryption"]["privateKey"])
    # the pod's own IP, where runs reach the peering forwarders (the Downward API's)
    (advertise,) = [e for e in node["env"] if e["name"] == "FEDNODE_PEERING__ADVERTISE_HOST"]
    assert advertise["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    monkeypatch.setenv("FEDNODE_PEERING__ADVERTISE_HOST", "10.1.2.3")
    settings = load_node_yaml(
        {**config, "databases": [], "encryption": {"enabled": True, "private_key": str(key)}},
        tmp_path,
        monkeypatch,
    )
    assert settings.name == "hospital-a"
    assert settings.server_api_url == "https://v6.example.org:5000/api/v2"
    assert settings.policies.allowed_algorithms == ["^registry.example.org/.*$"]
    assert settings.policies.allowed_organizations == [1, 2000000]
    assert settings.policies.resources.max_memory_mb == 2000000  # not 2e+06
    (profile,) = settings.policies.resources.profiles
    assert (profile.name, profile.images) == ("training", [r"registry\.example\.org/ml/.*"])
    assert (profile.cpu, profile.memory_mb, profile.gpus) == (4, 16384, 2)
    assert (profile.gpu_type, profile.deadline_seconds) == ("NVIDIA-H100-80GB-HBM3", 3600)
    assert settings.policies.resources.default_gpus == 1
    assert settings.max_concurrent_runs == 8
    assert settings.proxy.max_body_mb == 64  # extraConfig wins
    assert settings.proxy.upstream_timeout_seconds == 120
    assert settings.peering.relay_url == "wss://relay.example.org:8443/v1/connect"
    assert settings.peering.forwarder_ports == (9700, 9701, 9702, 9703)
    assert (settings.peering.max_streams_per_run, settings.peering.window_kb) == (16, 128)
    (rule,) = settings.peering.image_ports
    assert [(p.port, p.label) for p in rule.ports] == [(5000, "mpc"), (5001, None)]
    assert settings.telemetry.otlp_endpoint == "http://jaeger-collector.tracing:4318"
    assert settings.telemetry.sampling_ratio == 0.5
    assert settings.logging.level == "DEBUG"
    executor = settings.executor
    assert isinstance(executor, KubernetesSettings)
    assert (executor.run_as_user, executor.run_as_group) == (20001, 20002)
    assert executor.task_volume_access == "ReadWriteOnce"
    assert executor.gpu_resource_name == "amd.com/gpu"
    assert executor.gpu_type_label == "nvidia.com/gpu.product"
    assert executor.priority_class_name == "low"
    assert executor.kueue is not None
    assert (executor.kueue.queue_name, executor.kueue.priority_class) == ("gpu-runs", "research")
    role = one(objects, "Role")
    assert role["rules"] == role_rules(
        "hospital-a",
        proxy_service=executor.proxy_service,
        databases=sorted(executor.database_egress),
        kueue=True,
        peers=True,
    )
    assert executor.image_pull_secrets == ["regcred"]
    assert executor.proxy_port == 8654
    assert {label: v.model_dump(exclude_none=True) for label, v in executor.databases.items()} == {
        "default": {"claim": "hospital-data", "sub_path": "exports"},
        "local": {"claim": "fn-fednode-db-local"},
        "codes": {"config_map": "fednode-codes"},
        "images": {"claim": "imaging"},
    }
    assert {k: v.model_dump() for k, v in executor.database_egress.items()} == {
        "warehouse": {"cidr": "10.0.4.7/32", "port": 5432}
    }
    assert config["databases"] == [
        {"label": "default", "type": "csv", "uri": "/mnt/data/default/employees.csv"},
        {"label": "local", "type": "parquet", "uri": "/mnt/data/local/cohort.parquet"},
        {"label": "codes", "type": "csv", "uri": "/mnt/data/codes/codes.csv"},
        {"label": "images", "type": "folder", "uri": "/mnt/data/images"},
        {"label": "warehouse", "type": "sql", "uri": "postgresql://warehouse.example.org/db"},
    ]

    # the node pod mounts each file database where node.yaml says it is
    mounts = {m["mountPath"]: m for m in node["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["/mnt/data/default"]["subPath"] == "exports"
    assert volumes[mounts["/mnt/data/local"]["name"]]["persistentVolumeClaim"]["claimName"] == (
        "fn-fednode-db-local"
    )
    assert volumes[mounts["/mnt/data/codes"]["name"]]["configMap"] == {"name": "fednode-codes"}
    assert all(mounts[f"/mnt/data/{label}"]["readOnly"] for label in ("default", "images"))
    keys = volumes[mounts["/var/run/secrets/fednode"]["name"]]["secret"]
    assert keys["items"] == [{"key": "pem", "path": "private-key.pem"}]
    secret = one(objects, "Secret")
    assert set(secret["data"]) == {"key", "pem"}

    # a hostPath database: a volume pinned to its node, and a claim bound to it
    volume = one(objects, "PersistentVolume")
    claim = one(objects, "PersistentVolumeClaim", "fn-fednode-db-local")
    assert volume["spec"]["hostPath"] == {"path": "/srv/data", "type": "Directory"}
    assert volume["spec"]["claimRef"]["name"] == "fn-fednode-db-local"
    assert volume["spec"]["claimRef"]["namespace"] == "fednode-a"
    assert volume["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][
        0
    ]["values"] == ["worker-1"]
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert volume["spec"]["capacity"] == {"storage": "5Gi"}

    # ReadWriteOnce: runs are pinned to the node pod's Kubernetes node
    env = {e["name"]: e for e in node["env"]}
    assert env["FEDNODE_EXECUTOR__KUBERNETES_NODE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "spec.nodeName"}
    }
    assert env["FEDNODE_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "key"
    assert env["OTEL_RESOURCE_ATTRIBUTES"]["value"] == "site=hospital-a"
    tasks = one(objects, "PersistentVolumeClaim", "fn-fednode-tasks")
    assert tasks["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "nfs",
        "resources": {"requests": {"storage": "50Gi"}},
    }
    assert "annotations" not in tasks["metadata"]  # keep: false

    # the node pod
    assert node["image"] == "registry.example.org/fednode/node:0.1.0"
    assert node["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert node["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert node["livenessProbe"]["failureThreshold"] == 4
    assert node["securityContext"]["runAsUser"] == 20001
    assert spec["securityContext"]["fsGroup"] == 20002
    assert spec["nodeSelector"] == {"pool": "system"}
    assert spec["tolerations"][0]["value"] == "system"
    assert spec["affinity"] == FULL_VALUES["affinity"]
    assert spec["priorityClassName"] == "high"
    assert spec["terminationGracePeriodSeconds"] == 60
    template = one(objects, "Deployment")["spec"]["template"]["metadata"]
    assert template["labels"]["example.org/tier"] == "analytics"
    assert template["annotations"]["example.org/team"] == "research"
    assert {"checksum/config", "checksum/secret"} <= set(template["annotations"])

    # the node's network policy
    policy = node_policy(objects)["spec"]
    assert policy["ingress"][1]["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    # runs reach the proxy and the peering forwarders on the node pod
    assert [p["port"] for p in policy["ingress"][0]["ports"]] == [8654, 9700, 9701, 9702, 9703]
    dns, api_server, server, otlp, relay, runs, extra = policy["egress"]
    assert relay == {
        "to": [{"ipBlock": {"cidr": "192.0.2.11/32"}}],
        "ports": [{"port": 8443, "protocol": "TCP"}],
    }
    # the node connects peer streams to its own runs' ports (which the images choose)
    selector = {"app.kubernetes.io/managed-by": "fednode", "fednode.io/node": "hospital-a"}
    assert runs == {"to": [{"podSelector": {"matchLabels": selector}}]}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "coredns"}
    assert api_server == {
        "to": [{"ipBlock": {"cidr": "198.51.100.1/32"}}],
        "ports": [{"port": 6443, "protocol": "TCP"}],
    }
    assert server["to"] == [{"ipBlock": {"cidr": "192.0.2.10/32"}}]
    assert otlp["ports"] == [{"port": 4318, "protocol": "TCP"}]
    assert extra == FULL_VALUES["networkPolicy"]["extraEgress"][0]
    assert config["executor"]["proxy_service"] == "fn-fednode-proxy"

    # the admission policies know the run's volumes, pull Secrets and uid/gid
    jobs = one(objects, "ValidatingAdmissionPolicy", "fednode-a-fn-fednode-jobs")["spec"]
    variables = {v["name"]: v["expression"] for v in jobs["variables"]}
    assert yaml.safe_load(variables["claims"]) == [
        "fn-fednode-tasks",
        "hospital-data",
        "fn-fednode-db-local",
        "imaging",
    ]
    assert yaml.safe_load(variables["configMaps"]) == ["fednode-codes"]
    assert yaml.safe_load(variables["pullSecrets"]) == ["regcred"]
    contexts = " ".join(v["expression"] for v in jobs["validations"])
    assert "runAsUser == 20001" in contexts and "runAsGroup == 20002" in contexts
    assert "variables.labels['fednode.io/node'] == 'hospital-a'" in contexts


@pytest.mark.helm
def test_existing_secret_claim_and_namespace_are_used_not_made(tmp_path: Path) -> None:
    objects = render(EXISTING_VALUES, tmp_path, namespace="hospital")
    config = node_yaml(objects)
    node = container(objects)

    assert "Secret" not in kinds(objects)
    assert "PersistentVolumeClaim" not in kinds(objects)
    assert "Namespace" not in kinds(objects)
    assert "NetworkPolicy" not in kinds(objects)
    assert "ValidatingAdmissionPolicy" not in kinds(objects)  # runs.admissionPolicy: false
    assert {o["metadata"]["namespace"] for o in objects} == {"hospital"}
    env = {e["name"]: e for e in node["env"]}
    assert env["FEDNODE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "hospital-a-node",
        "key": "api-key",
    }
    assert "FEDNODE_EXECUTOR__KUBERNETES_NODE" not in env
    assert config["executor"]["task_volume_claim"] == "shared-tasks"
    assert config["executor"]["network_policies"] == "off"
    assert not any(r["resources"] == ["networkpolicies"] for r in one(objects, "Role")["rules"])
    assert config["executor"]["require_restricted_namespace"] is False
    keys = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "keys")
    assert keys["secret"]["secretName"] == "hospital-a-node"
    template = one(objects, "Deployment")["spec"]["template"]["metadata"]
    assert "checksum/secret" not in template["annotations"]
    assert node["image"] == "localhost/fednode/node:0.1.0"


@pytest.mark.helm
def test_metrics_scraping_options_render_annotations_a_service_and_a_service_monitor(
    full_values: dict[str, Any], tmp_path: Path
) -> None:
    objects = render(full_values, tmp_path)
    template = one(objects, "Deployment")["spec"]["template"]
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service", "fn-fednode-metrics")
    off = render(merged(full_values, {"metrics": {"enabled": False}}), tmp_path)

    assert (
        template["metadata"]["annotations"].items()
        >= {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "8656",
            "prometheus.io/path": "/metrics",
        }.items()
    )
    assert node_yaml(objects)["health"]["metrics"] is True
    assert service["spec"]["selector"].items() <= pod_labels(objects).items()
    assert service["spec"]["ports"] == [
        {"name": "health", "port": 8656, "targetPort": "health", "protocol": "TCP"}
    ]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"] == [
        {"port": "health", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}
    ]
    assert "ServiceMonitor" not in kinds(off)
    assert (
        "prometheus.io/scrape"
        not in one(off, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    )
    assert node_yaml(off)["health"]["metrics"] is False


@pytest.mark.helm
def test_otlp_headers_and_tls_come_from_the_operators_secrets(
    full_values: dict[str, Any], tmp_path: Path
) -> None:
    headers = {e["name"]: e for e in container(render(full_values, tmp_path))["env"]}
    objects = render(EXISTING_VALUES, tmp_path, namespace="hospital")
    telemetry = node_yaml(objects)["telemetry"]
    mounts = {m["name"]: m for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}

    assert headers["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {
        "name": "otlp-headers",
        "key": "headers",
    }
    assert telemetry["otlp_endpoint"] == "https://otel-collector.tracing:4318"
    directory = mounts["otlp-tls"]["mountPath"]
    assert telemetry["otlp_certificate"] == f"{directory}/ca.crt"
    assert telemetry["otlp_client_certificate"] == f"{directory}/tls.crt"
    assert telemetry["otlp_client_key"] == f"{directory}/tls.key"
    assert volumes["otlp-tls"]["secret"]["secretName"] == "otlp-tls"
    assert [i["key"] for i in volumes["otlp-tls"]["secret"]["items"]] == [
        "ca.crt",
        "tls.crt",
        "tls.key",
    ]


# -- wrong values -------------------------------------------------------------------------


@pytest.mark.helm
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"servr": {"url": "https://x.org"}}, "additional properties 'servr' not allowed"),
        ({"server": {"url": "ftp://v6.example.org"}}, "at '/server/url'"),
        ({"server": {"url": "https://v6.example.org:5000"}}, "at '/server/url'"),
        ({"server": {"port": 70000}}, "at '/server/port'"),
        ({"proxy": {"port": "7654"}}, "at '/proxy/port'"),
        ({"taskVolume": {"accessMode": "ReadOnlyMany"}}, "at '/taskVolume/accessMode'"),
        ({"taskVolume": {"size": "ten gigs"}}, "at '/taskVolume/size'"),
        ({"runs": {"runAsUser": 0}}, "at '/runs/runAsUser'"),
        ({"logging": {"level": "LOUD"}}, "at '/logging/level'"),
        ({"databases": [{"label": "1st", "type": "csv"}]}, "at '/databases/0/label'"),
        ({"databases": [{"label": "x", "type": "xml"}]}, "at '/databases/0/type'"),
        ({"networkPolicy": {"server": {"to": []}}}, "at '/networkPolicy/server/to'"),
        ({"nodeName": "Hospital A"}, "at '/nodeName'"),
        ({"apiKey": ""}, "apiKey or existingSecret is required"),
        ({"server": {"url": ""}}, "server.url is required"),
        ({"existingSecret": "mine"}, "give apiKey or existingSecret, not both"),
        (
            {"encryption": {"enabled": True}},
            "encryption.enabled needs the organization's private key",
        ),
        ({"encryption": {"enabled": True, "privateKey": "not a key"}}, "is not a PEM private key"),
        ({"namespace": {"create": True, "name": "fednode-system"}}, "is the release namespace"),
        ({"namespace": {"create": True, "name": ""}}, "namespace.create needs namespace.name"),
        (
            {"databases": [{"label": "a", "type": "csv", "file": "a.csv"}]},
            "needs exactly one of claim, hostPath, configMap",
        ),
        ({"databases": [{"label": "a", "type": "csv", "claim": "c"}]}, "needs file"),
        ({"databases": [{"label": "a", "type": "sql"}]}, "needs uri"),
        ({"databases": [{"label": "a", "type": "sql", "uri": "x", "claim": "c"}]}, "is not a file"),
        (
            {
                "databases": [
                    {
                        "label": "a",
                        "type": "csv",
                        "file": "a.csv",
                        "claim": "c",
                        "egress": {"cidr": "10.0.0.1/32", "port": 1},
                    }
                ]
            },
            "egress only applies to network databases",
        ),
        (
            {
                "databases": [
                    {"label": "a", "type": "csv", "file": "a.csv", "configMap": "m", "subPath": "d"}
                ]
            },
            "subPath only applies to a claim",
        ),
        (
            {
                "databases": [
                    {"label": "a", "type": "sql", "uri": "db-x"},
                    {"label": "a", "type": "sql", "uri": "db-y"},
                ]
            },
            'label "a" is used twice',
        ),
    ],
)
def test_a_wrong_value_fails_helm_template_with_a_message_naming_it(
    values: dict[str, Any],
    message: str,
    tmp_path: Path,
) -> None:
    result = helm(
        "template",
        "fn",
        str(CHART),
        "--namespace",
        "fednode-system",
        values=merged(REQUIRED_VALUES, values),
        tmp=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
