"""Shared by the chart tests (no tests here): the real helm, rendering, and value sets.

helm is built from its Go module by ``scripts/helm-setup`` (``scripts/setup-peers`` runs
it); a missing helm fails the test with the command to run, never skips it.

``FULL_VALUES`` and ``EXISTING_VALUES`` together set every key ``values.schema.json``
documents (tests/unit/test_helm_chart.py checks that they do), so ``helm template`` with
each of them renders every branch of the templates.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "fednode"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
HELM_SETUP = REPO / "scripts" / "helm-setup"

#: The least a release needs (the rest has defaults).
REQUIRED_VALUES: dict[str, Any] = {
    "server": {"url": "https://v6.example.org"},
    "apiKey": "node-api-key",
}

#: Every option that goes with a Secret, claim and namespace the chart makes.
FULL_VALUES: dict[str, Any] = {
    "nodeName": "hospital-a",
    "server": {"url": "https://v6.example.org", "port": 5000, "apiPath": "/api/v2"},
    "apiKey": "node-api-key",
    "secretKeys": {"apiKey": "key", "privateKey": "pem"},
    "encryption": {"enabled": True, "privateKey": "(set by private_key_pem())"},
    "namespace": {"create": True, "name": "fednode-a"},
    "taskVolume": {
        "storageClassName": "nfs",
        "size": "50Gi",
        "accessMode": "ReadWriteOnce",
        "keep": False,
    },
    "databases": [
        {
            "label": "default",
            "type": "csv",
            "file": "employees.csv",
            "claim": "hospital-data",
            "subPath": "exports",
        },
        {
            "label": "local",
            "type": "parquet",
            "file": "cohort.parquet",
            "hostPath": {"path": "/srv/data", "node": "worker-1", "size": "5Gi"},
        },
        {"label": "codes", "type": "csv", "file": "codes.csv", "configMap": "fednode-codes"},
        {"label": "images", "type": "folder", "claim": "imaging"},
        {
            "label": "warehouse",
            "type": "sql",
            "uri": "postgresql://warehouse.example.org/db",
            "egress": {"cidr": "10.0.4.7/32", "port": 5432},
        },
    ],
    "policies": {
        "allowedAlgorithms": ["^registry.example.org/.*$"],
        "allowedOrganizations": [1, 2000000],
        "allowedUsers": [3],
        "resources": {
            "defaultCpu": 0.5,
            "defaultMemoryMb": 512,
            "maxCpu": 8,
            "maxMemoryMb": 2000000,
            "defaultGpus": 1,
            "maxGpus": 2,
            "defaultDeadlineSeconds": 7200,
            "profiles": [
                {
                    "name": "training",
                    "images": ["registry\\.example\\.org/ml/.*"],
                    "cpu": 4,
                    "memoryMb": 16384,
                    "gpus": 2,
                    "gpuType": "NVIDIA-H100-80GB-HBM3",
                    "deadlineSeconds": 3600,
                }
            ],
        },
    },
    "maxConcurrentRuns": 8,
    "runs": {
        "runAsUser": 20001,
        "runAsGroup": 20002,
        "backoffLimit": 1,
        "ttlSecondsAfterFinished": 600,
        "imagePullPolicy": "Always",
        "imagePullSecrets": ["regcred"],
        "scratchSizeLimit": "2Gi",
        "priorityClassName": "low",
        "nodeSelector": {"pool": "analytics"},
        "tolerations": [
            {"key": "pool", "operator": "Equal", "value": "analytics", "effect": "NoSchedule"}
        ],
        "gpu": {
            "resourceName": "amd.com/gpu",
            "nodeSelector": {"gpu": "true"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "typeLabel": "nvidia.com/gpu.product",
        },
        "kueue": {"queueName": "gpu-runs", "priorityClass": "research"},
        "networkPolicies": True,
        "admissionPolicy": True,
        "requireRestrictedNamespace": True,
    },
    "proxy": {"port": 8654, "maxBodyMb": 32, "upstreamTimeoutSeconds": 120},
    "health": {"port": 8656},
    "peering": {
        "relayUrl": "wss://relay.example.org:8443/v1/connect",
        "firstPort": 9700,
        "ports": 4,
        "maxStreamsPerRun": 16,
        "idleSeconds": 300,
        "windowKb": 128,
        "imagePorts": [
            {
                "image": "registry\\.example\\.org/mpc/.*",
                "ports": [{"port": 5000, "label": "mpc"}, {"port": 5001}],
            }
        ],
    },
    "telemetry": {
        "otlpEndpoint": "http://jaeger-collector.tracing:4318",
        "serviceName": "fednode-a",
        "samplingRatio": 0.5,
        "otlpHeadersSecret": "otlp-headers",
    },
    "metrics": {
        "enabled": True,
        "podAnnotations": True,
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "scrapeTimeout": "5s",
            "labels": {"release": "kube-prometheus-stack"},
        },
    },
    "logging": {"level": "DEBUG", "format": "console"},
    "networkPolicy": {
        "enabled": True,
        "namespaceDefaultDeny": True,
        "dns": {"namespace": "dns-system", "podSelector": {"k8s-app": "coredns"}},
        "server": {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [5000]},
        "apiServer": {
            "to": [{"ipBlock": {"cidr": "198.51.100.1/32"}}],
            "ports": [6443],
            "cilium": "never",
        },
        "otlp": {
            "to": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tracing"}}}
            ]
        },
        "relay": {"to": [{"ipBlock": {"cidr": "192.0.2.11/32"}}]},
        "healthFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "extraEgress": [
            {
                "to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
                "ports": [{"port": 443, "protocol": "TCP"}],
            }
        ],
    },
    "image": {
        "repository": "registry.example.org/fednode/node",
        "tag": "0.1.0",
        "pullPolicy": "Always",
    },
    "imagePullSecrets": ["regcred"],
    "resources": {
        "requests": {"cpu": "200m", "memory": "300Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    },
    "probes": {
        "liveness": {
            "initialDelaySeconds": 1,
            "periodSeconds": 2,
            "timeoutSeconds": 3,
            "failureThreshold": 4,
            "successThreshold": 1,
        },
        "readiness": {
            "initialDelaySeconds": 1,
            "periodSeconds": 2,
            "timeoutSeconds": 3,
            "failureThreshold": 4,
            "successThreshold": 1,
        },
    },
    "podAnnotations": {"example.org/team": "research"},
    "podLabels": {"example.org/tier": "analytics"},
    "nodeSelector": {"pool": "system"},
    "tolerations": [
        {"key": "pool", "operator": "Equal", "value": "system", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}
                ]
            }
        }
    },
    "priorityClassName": "high",
    "terminationGracePeriodSeconds": 60,
    "extraEnv": [{"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "site=hospital-a"}],
    "extraConfig": {"proxy": {"max_body_mb": 64}},
}

#: The other branches: the operator's own Secret, claim and (release) namespace.
EXISTING_VALUES: dict[str, Any] = {
    "server": {"url": "http://v6.example.org"},
    "telemetry": {
        "otlpEndpoint": "https://otel-collector.tracing:4318",
        "tlsSecret": "otlp-tls",
        "clientCertificate": True,
    },
    "existingSecret": "hospital-a-node",
    "encryption": {"enabled": True},
    "namespace": {"create": False, "name": ""},
    "taskVolume": {"existingClaim": "shared-tasks", "accessMode": "ReadWriteMany"},
    "runs": {
        "networkPolicies": False,
        "admissionPolicy": False,
        "requireRestrictedNamespace": False,
    },
    "networkPolicy": {"enabled": False, "namespaceDefaultDeny": False},
    "image": {"repository": "localhost/fednode/node", "tag": ""},
}


def private_key_pem() -> str:
    """A throwaway RSA key in PEM (for the chart's Secret)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def helm_binary() -> Path:
    """The helm that scripts/helm-setup built; fails the test when it is missing."""
    result = subprocess.run([str(HELM_SETUP), "path"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(
            "helm is not built: run scripts/helm-setup (scripts/setup-peers does)", pytrace=False
        )
    return Path(result.stdout.strip())


def helm(
    *args: str,
    values: dict[str, Any] | None = None,
    tmp: Path | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run helm; ``values`` go in as a file (``-f``)."""
    command = [str(helm_binary()), *args]
    if values is not None:
        assert tmp is not None, "values need a temp directory"
        path = tmp / f"values-{len(list(tmp.glob('values-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        command += ["-f", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def render(
    values: dict[str, Any],
    tmp: Path,
    *,
    release: str = "fn",
    namespace: str = "fednode-system",
    api_versions: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """``helm template`` of the chart: the objects, in helm's order. ``api_versions``: what
    the cluster would serve beyond the built-in APIs (``--api-versions``)."""
    extra = [arg for version in api_versions for arg in ("--api-versions", version)]
    result = helm(
        "template", release, str(CHART), "--namespace", namespace, *extra, values=values, tmp=tmp
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


async def pre_bound_volume(
    admin: Any, *, name: str, namespace: str, claim: str, mode: str, host_path: dict[str, str]
) -> None:
    """A hostPath volume reserved for the claim the chart makes; the volume controller
    binds the claim as soon as it appears."""
    from kubernetes_asyncio import client

    core: Any = client.CoreV1Api(admin)
    await core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": {"fednode.test/owner": "pytest"}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": [mode],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": host_path,
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": namespace,
                    "name": claim,
                },
            },
        }
    )


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``)."""
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def node_yaml(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The node.yaml the chart's ConfigMap carries."""
    config: dict[str, Any] = yaml.safe_load(one(objects, "ConfigMap")["data"]["node.yaml"])
    return config


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of value layers, later ones winning."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def schema_leaves(
    node: dict[str, Any] = SCHEMA, path: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    """Every documented key: the leaves of the schema's closed objects."""
    leaves: list[tuple[str, ...]] = []
    for key, child in node.get("properties", {}).items():
        here = (*path, key)
        if child.get("type") == "object" and child.get("additionalProperties") is False:
            leaves += schema_leaves(child, here)
        else:
            leaves.append(here)
    return leaves
