"""The relay's Helm chart (helm/fednode-relay) as a real helm renders it: lint, the
command it runs, Pod Security restricted, its NetworkPolicy, TLS, and the one required
value refused with the fix. tests/e2e/test_peering_kubernetes.py installs it for real."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from policies.pod_security import container_security_context
from tests.peers.helm import helm, one
from tests.peers.helm_node import RELAY_CHART

pytestmark = pytest.mark.helm

VALUES: dict[str, Any] = {"server": {"url": "https://v6.example.org", "port": 443}}


def render(values: dict[str, Any], tmp: Path, *, check: bool = True) -> Any:
    result = helm(
        "template", "relay", str(RELAY_CHART), "--namespace", "v6-relay",
        values=values, tmp=tmp, check=check,
    )  # fmt: skip
    if not check:
        return result
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_helm_lint_passes(tmp_path: Path) -> None:
    result = helm("lint", "--strict", str(RELAY_CHART), values=VALUES, tmp=tmp_path)
    assert "0 chart(s) failed" in result.stdout


def test_the_relay_runs_fednode_relay_restricted_and_checks_identities_with_the_server(
    tmp_path: Path,
) -> None:
    objects = render(VALUES, tmp_path)
    assert sorted(o["kind"] for o in objects) == ["Deployment", "NetworkPolicy", "Service"]
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    (relay,) = spec["containers"]
    assert relay["args"] == [
        "relay",
        "--server=https://v6.example.org:443/api",
        "--host=0.0.0.0",
        "--port=7800",
        "--log-level=INFO",
    ]
    assert relay["image"] == "localhost/fednode/node:0.1.0"
    assert relay["readinessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "relay",
        "scheme": "HTTP",
    }
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    context = container_security_context(run_as_user=10001, run_as_group=10001)
    assert {k: relay["securityContext"][k] for k in relay["securityContext"]} == {
        k: v for k, v in context.items() if k not in ("runAsUser", "runAsGroup")
    }
    service = one(objects, "Service")["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [
        {"name": "relay", "port": 7800, "targetPort": "relay", "protocol": "TCP"}
    ]


def test_its_network_policy_takes_nodes_on_its_port_and_calls_only_dns_and_the_server(
    tmp_path: Path,
) -> None:
    values = {
        **VALUES,
        "networkPolicy": {
            "from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}],
            "server": {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}]},
        },
    }
    policy = one(render(values, tmp_path), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [
        {
            "ports": [{"port": 7800, "protocol": "TCP"}],
            "from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}],
        }
    ]
    dns, server = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert server == {
        "to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }


def test_tls_from_a_secret(tmp_path: Path) -> None:
    objects = render({**VALUES, "relay": {"tlsSecret": "relay-tls"}}, tmp_path)
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    (relay,) = spec["containers"]
    assert "--tls-cert=/var/run/secrets/fednode-relay/tls.crt" in relay["args"]
    assert "--tls-key=/var/run/secrets/fednode-relay/tls.key" in relay["args"]
    assert relay["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert spec["volumes"] == [
        {"name": "tls", "secret": {"secretName": "relay-tls", "defaultMode": 0o440}}
    ]


def test_without_the_server_url_it_says_which_value_to_set(tmp_path: Path) -> None:
    result = render({}, tmp_path, check=False)
    assert isinstance(result, subprocess.CompletedProcess) and result.returncode != 0
    assert "server.url is required" in result.stderr
