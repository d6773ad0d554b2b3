"""The least privilege the Kubernetes executor needs: one namespaced Role, written down once.

This is the single source of truth for the node's permissions; the Helm chart renders
:func:`role_manifest` and :func:`role_binding_manifest`, and the integration tests run the
executor with a token of a service account bound to exactly these rules — never as admin.

Every verb below is used, and nothing else is granted:

* Jobs: ``create`` (start), ``delete`` (kill, cleanup, give up on a bad image), ``list`` and
  ``watch`` (the shared informer), ``get`` (an idempotent start that met an existing Job
  the informer has not shown yet);
* Pods: ``list`` and ``watch`` (waiting reasons, exit codes, OOM); ``pods/log``: ``get``;
* Secrets: ``create`` (the run's token, created owned by its Job so it goes with the Job)
  and ``delete``; no ``get``/``list``/``patch`` (a patch answers with the Secret's data):
  the node cannot read any secret, its own included;
* NetworkPolicies: ``get`` of the node's own runs' policies only (the two, the peer
  streams' one with ``peering``, and one per network database; ``resourceNames``,
  :func:`network_policy_rule`): the chart renders them, the node checks at start-up that
  they are there and unchanged. It cannot create, change or delete any NetworkPolicy, so
  a compromised node cannot open its runs' egress. Only with ``network_policies: apply``
  (out of a cluster, development) does the executor write them itself; that needs
  :data:`APPLY_NETWORK_POLICIES_RULE` (``get``, ``create``, ``patch``) instead;
* Namespaces: ``get`` — bound in the runs namespace, a Role grants reading *that*
  namespace only (its Pod Security labels are checked at start-up); creating or labelling
  it is the chart's or the operator's job;
* Services: ``get`` of the proxy's own Service only (``resourceNames``,
  :func:`proxy_service_rule`): its ClusterIP is the address runs are given
  (:mod:`executors.kubernetes.proxy_address`).

* Kueue Workloads (only with ``executor.kueue``, :data:`KUEUE_RULE`): ``list`` and
  ``watch`` — why a queued run waits. Nothing is written: Kueue itself creates, admits and
  deletes Workloads; the node only labels and suspends its Jobs.

Nothing cluster-scoped: no ClusterRole, no nodes, no other namespaces.

What a stolen node token could still do with ``jobs: create`` — run a pod that mounts the
node's own Secret, or runs under another service account — is closed by admission, not by
RBAC (which cannot look inside a Job): the chart's ValidatingAdmissionPolicies
(``helm/fednode/templates/admission-policy.yaml``) pin the Jobs and Secrets this service
account may create to the shape :mod:`executors.kubernetes.manifests` gives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from policies.network import (
    database_policy_name,
    peers_policy_name,
    policy_name_prefix,
    run_network_policy_names,
)

ROLE_NAME = "fednode-executor"

#: The rules that do not depend on the node's name (the chart's ``files/role-rules.yaml``);
#: :func:`role_rules` adds the NetworkPolicy rule, which names the node's policies.
ROLE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
]

#: Instead of :func:`network_policy_rule`, for ``network_policies: apply`` only (the
#: executor applies the runs' policies itself; ``create`` cannot be limited by name).
APPLY_NETWORK_POLICIES_RULE: dict[str, Any] = {
    "apiGroups": ["networking.k8s.io"],
    "resources": ["networkpolicies"],
    "verbs": ["get", "create", "patch"],
}


#: Reading Kueue's Workloads in the runs namespace (``executor.kueue`` only).
KUEUE_RULE: dict[str, Any] = {
    "apiGroups": ["kueue.x-k8s.io"],
    "resources": ["workloads"],
    "verbs": ["list", "watch"],
}


def network_policy_rule(
    node_name: str, *, databases: Sequence[str] = (), peers: bool = False
) -> dict[str, Any]:
    """Reading the node's runs' NetworkPolicies (the two, the peer streams' one with
    ``peers``, and one per network database label in ``databases``), by name, and
    nothing else."""
    prefix = policy_name_prefix(node_name)
    return {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "resourceNames": [
            *run_network_policy_names(prefix),
            *([peers_policy_name(prefix)] if peers else []),
            *(database_policy_name(prefix, label) for label in databases),
        ],
        "verbs": ["get"],
    }


def proxy_service_rule(service: str) -> dict[str, Any]:
    """Reading the proxy's Service, by name, and nothing else (for its ClusterIP)."""
    return {
        "apiGroups": [""],
        "resources": ["services"],
        "resourceNames": [service],
        "verbs": ["get"],
    }


def role_rules(
    node_name: str,
    *,
    proxy_service: str | None = None,
    apply_network_policies: bool = False,
    databases: Sequence[str] = (),
    kueue: bool = False,
    peers: bool = False,
) -> list[dict[str, Any]]:
    """Every rule of the node's Role (what the chart renders for ``nodeName`` and its proxy
    Service, both in the one namespace of node and runs; ``databases``: the labels of the
    network databases whose egress policies it reads; ``kueue``: with :data:`KUEUE_RULE`)."""
    extra = (
        APPLY_NETWORK_POLICIES_RULE
        if apply_network_policies
        else network_policy_rule(node_name, databases=databases, peers=peers)
    )
    rules = [dict(rule) for rule in ROLE_RULES] + [dict(extra)]
    if proxy_service is not None:
        rules.append(proxy_service_rule(proxy_service))
    if kueue:
        rules.append(dict(KUEUE_RULE))
    return rules


def role_manifest(
    namespace: str, *, node_name: str, proxy_service: str | None = None, name: str = ROLE_NAME
) -> dict[str, Any]:
    """The Role in the runs namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": role_rules(node_name, proxy_service=proxy_service),
    }


def role_binding_manifest(
    namespace: str,
    *,
    service_account: str,
    service_account_namespace: str,
    name: str = ROLE_NAME,
) -> dict[str, Any]:
    """Binds the node's service account (possibly in another namespace) to the Role."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": service_account,
                "namespace": service_account_namespace,
            }
        ],
    }
