"""Pod Security for algorithm pods on Kubernetes: the namespace level and the pod's contexts.

Two halves of one rule ("isolation by default"):

* the runs namespace enforces the Pod Security Standard ``restricted`` through the
  ``pod-security.kubernetes.io/*`` labels, so the API server itself refuses any pod that
  is not locked down — :func:`namespace_labels` is what the chart (or operator) puts on it,
  :func:`pod_security_problems` is how the node checks it at start-up (a namespaced Role
  cannot create or relabel namespaces, so the node verifies rather than applies);
* every run pod is locked down to pass that standard: non-root with a fixed uid, no
  privilege escalation, every capability dropped, seccomp ``RuntimeDefault``, a read-only
  root file system — :func:`pod_security_context` and :func:`container_security_context`.

Pure functions returning plain dicts; no client library here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LABEL_PREFIX = "pod-security.kubernetes.io/"
MODES = ("enforce", "audit", "warn")
#: The levels, weakest first.
LEVELS = ("privileged", "baseline", "restricted")


def namespace_labels(level: str = "restricted", version: str = "latest") -> dict[str, str]:
    """The labels that make a namespace enforce, audit and warn at ``level``."""
    labels = {f"{LABEL_PREFIX}{mode}": level for mode in MODES}
    labels |= {f"{LABEL_PREFIX}{mode}-version": version for mode in MODES}
    return labels


def namespace_manifest(name: str, *, level: str = "restricted") -> dict[str, Any]:
    """A namespace for runs (for the chart or an operator; the node never creates it)."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": namespace_labels(level)},
    }


def pod_security_problems(labels: Mapping[str, str], *, level: str = "restricted") -> list[str]:
    """Why a namespace with ``labels`` does not enforce ``level`` (empty when it does)."""
    enforced = labels.get(f"{LABEL_PREFIX}enforce")
    if enforced is None:
        return [f"label {LABEL_PREFIX}enforce is missing (want {level!r})"]
    if enforced not in LEVELS:
        return [f"label {LABEL_PREFIX}enforce={enforced!r} is not a Pod Security level"]
    if LEVELS.index(enforced) < LEVELS.index(level):
        return [f"label {LABEL_PREFIX}enforce={enforced!r} is weaker than {level!r}"]
    return []


def enforces(labels: Mapping[str, str], level: str) -> bool:
    """Whether a namespace with ``labels`` enforces at least ``level``."""
    enforced = labels.get(f"{LABEL_PREFIX}enforce", "privileged")
    return enforced in LEVELS and LEVELS.index(enforced) >= LEVELS.index(level)


def pod_security_context(*, run_as_user: int, run_as_group: int) -> dict[str, Any]:
    """The pod-level context of a run pod (``restricted``)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "runAsGroup": run_as_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(*, run_as_user: int, run_as_group: int) -> dict[str, Any]:
    """The container-level context of the algorithm container (``restricted``)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "runAsGroup": run_as_group,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
