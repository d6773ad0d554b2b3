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
* NetworkPolicies: ``create`` and ``patch`` (server-side apply at start-up);
* Namespaces: ``get`` — bound in the runs namespace, a Role grants reading *that*
  namespace only (its Pod Security labels are checked at start-up); creating or labelling
  it is the chart's or the operator's job.

Nothing cluster-scoped: no ClusterRole, no nodes, no other namespaces.
"""

from __future__ import annotations

from typing import Any

ROLE_NAME = "fednode-executor"

ROLE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]},
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["create", "patch"],
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
]


def role_manifest(namespace: str, *, name: str = ROLE_NAME) -> dict[str, Any]:
    """The Role in the runs namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": [dict(rule) for rule in ROLE_RULES],
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
