"""What the informers keep of each Job and Pod: only the fields the executor reads.

client-go lets an informer be given a *transform* that trims every object before it is
cached and handed to the handlers; this module is that, for the two kinds the Kubernetes
executor follows. A Job as the API server sends it is mostly its spec (the pod template:
containers, env, volumes, security context) and a Pod is that again plus a long status;
the executor reads a few dozen bytes of either. With 2,000 runs in flight the whole
objects were most of the node's memory (benchmarks/k8s_executor.py).

What is kept, and who reads it:

* ``metadata`` (both kinds): ``name``, ``namespace``, ``uid``, ``resourceVersion`` (the
  informer's relist diff and resumption), ``creationTimestamp`` (the newest pod of a
  run), ``deletionTimestamp`` (a pod being deleted is no crash), ``ownerReferences``, and
  *all* ``labels`` and ``annotations`` — the run id, task id and trace context live
  there, and whatever else a restarted node must find on its runs' objects;
* Jobs: ``spec.backoffLimit``, ``spec.suspend`` (held by Kueue) and ``status.conditions``
  (type, status, reason, message) — :mod:`~executors.kubernetes.observe`; the uid is also
  what makes the Job the token Secret's owner (:func:`~executors.kubernetes.manifests.owner_patch`);
* Kueue Workloads: ``status.conditions`` — why a run waits for admission;
* Pods: ``status.phase`` and ``status.message``, and per container ``name``, ``state`` and
  ``lastState`` — ``waiting`` (reason, message) and ``terminated`` (exitCode, reason,
  message, signal) — :mod:`~executors.kubernetes.observe`; ``status.podIP``, where the
  node connects peer streams to a run (``run_address``, docs/networking.md).

Everything else is dropped, so a field read from the cache that is not listed here reads
as missing: a reader that needs one more field adds it here (tests/unit/test_k8s_transform.py
checks that :func:`~executors.kubernetes.observe.observe` judges trimmed objects as it
judges whole ones). The dicts keep the API's shape, so readers need not know an object was
trimmed. Label and annotation *keys* repeat on every object and are shared (a bounded
memo), not stored once per object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.types import Json

#: An informer's transform: the object as it will be cached and handed to the handler.
Transform = Callable[[Json], Json]

_METADATA = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "ownerReferences",
)
_CONDITION = ("type", "status", "reason", "message")
_WAITING = ("reason", "message")
_TERMINATED = ("exitCode", "reason", "message", "signal")

#: Label and annotation keys seen so far, to share one string per key across objects.
_KEYS: dict[str, str] = {}
_KEYS_MAX = 4096


def without_managed_fields(obj: Json) -> Json:
    """The default transform: the whole object less ``metadata.managedFields``."""
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
    return obj


def slim_job(job: Json) -> Json:
    """A Job as the executor reads it (see the module docstring)."""
    slim: Json = {"metadata": _metadata(job.get("metadata"))}
    spec = job.get("spec")
    if isinstance(spec, dict):
        kept = _pick(spec, ("backoffLimit", "suspend"))
        if kept:
            slim["spec"] = kept
    _conditions(job, slim)
    return slim


def slim_workload(workload: Json) -> Json:
    """A Kueue Workload as the executor reads it: whose it is, and its conditions."""
    slim: Json = {"metadata": _metadata(workload.get("metadata"))}
    _conditions(workload, slim)
    return slim


def _conditions(obj: Json, slim: Json) -> None:
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, dict) else None
    if conditions:
        slim["status"] = {
            "conditions": [_pick(c, _CONDITION) for c in conditions if isinstance(c, dict)]
        }


def slim_pod(pod: Json) -> Json:
    """A Pod as the executor reads it (see the module docstring)."""
    slim: Json = {"metadata": _metadata(pod.get("metadata"))}
    status = pod.get("status")
    if isinstance(status, dict):
        kept = _pick(status, ("phase", "message", "podIP"))
        containers = status.get("containerStatuses")
        if containers:
            kept["containerStatuses"] = [_container(c) for c in containers if isinstance(c, dict)]
        if kept:
            slim["status"] = kept
    return slim


def _metadata(metadata: Any) -> Json:
    if not isinstance(metadata, dict):
        return {}
    slim = _pick(metadata, _METADATA)
    for key in ("labels", "annotations"):
        values = metadata.get(key)
        if values:
            slim[key] = {_shared(k): v for k, v in values.items()}
    return slim


def _container(status: Json) -> Json:
    slim = _pick(status, ("name",))
    for key in ("state", "lastState"):
        state = status.get(key)
        if not isinstance(state, dict):
            continue
        kept: Json = {}
        waiting, ended = state.get("waiting"), state.get("terminated")
        if isinstance(waiting, dict):
            kept["waiting"] = _pick(waiting, _WAITING)
        if isinstance(ended, dict):
            kept["terminated"] = _pick(ended, _TERMINATED)
        if "running" in state:
            kept["running"] = {}
        if kept:
            slim[key] = kept
    return slim


def _pick(source: Json, keys: tuple[str, ...]) -> Json:
    return {key: source[key] for key in keys if key in source}


def _shared(key: str) -> str:
    shared = _KEYS.get(key)
    if shared is not None:
        return shared
    if len(_KEYS) < _KEYS_MAX:
        _KEYS[key] = key
    return key
