"""What one run looks like on Kubernetes: its Job (and pod template) and its token Secret.

Pure functions from a :class:`~executors.spec.RunSpec` and the settings to plain dicts, so
the shape of a run can be read (and tested) in one place:

* a ``batch/v1`` Job named after the run (so a second ``start`` meets ``409`` instead of
  starting it twice), labelled with :func:`~executors.base.run_labels` (what the informers
  select on) and annotated with the ids, the trace context and the node's sealed copy of
  the token (what a restarted node rebuilds its state from; it may not read the Secret);
  ``backoffLimit`` from the settings, ``activeDeadlineSeconds`` from the run's deadline
  (never early), ``ttlSecondsAfterFinished`` as a safety net; with ``kueue`` set, created
  suspended with the queue-name (and priority-class) label, so Kueue admits it under quota
  and unsuspends it (the node never sets ``suspend: false`` itself);
* a pod that passes Pod Security ``restricted`` (:mod:`policies.pod_security`), with no
  service-account token and no service links, CPU/memory requests and limits, GPUs as an
  extended-resource limit plus the GPU nodes' selector and tolerations;
* the run's three files of the shared task volume, each by itself (``subPath
  run-<id>/<file>``): ``/mnt/task/input`` read-only, ``/mnt/task/output`` the only
  writable one, ``/mnt/task/token`` read-only (from the token Secret when there is one).
  The folder itself is never mounted, so a run cannot put a link (to
  ``/proc/self/environ``, to another run's input) where the node reads its output; an
  emptyDir at ``/tmp``; databases read-only at ``/mnt/data/<label>``.
"""

from __future__ import annotations

import base64
import hashlib

from common.types import Json
from executors.base import (
    ANNOTATION_SEALED_TOKEN,
    ANNOTATION_TRACEPARENT,
    LABEL_MANAGED_BY,
    LABEL_NODE,
    MANAGED_BY,
)
from executors.kubernetes.config import DatabaseVolume, KubernetesSettings
from executors.spec import (
    CONTAINER_DATA_DIR,
    CONTAINER_SCRATCH_DIR,
    CONTAINER_TASK_DIR,
    INPUT_FILE_NAME,
    OUTPUT_FILE_NAME,
    TOKEN_FILE_NAME,
    RunSpec,
)
from policies.pod_security import container_security_context, pod_security_context

CONTAINER_NAME = "algorithm"

ANNOTATION_RUN = "fednode.io/run-id"
ANNOTATION_TASK = "fednode.io/task-id"
ANNOTATION_ORGANIZATION = "fednode.io/organization-id"
ANNOTATION_COLLABORATION = "fednode.io/collaboration-id"
ANNOTATION_PARENT_TASK = "fednode.io/parent-task-id"
ANNOTATION_IMAGE = "fednode.io/image"
ANNOTATION_TRACESTATE = "fednode.io/tracestate"

#: Kueue's labels on a Job: its LocalQueue, and its WorkloadPriorityClass.
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"

_TASK_VOLUME = "task"
_TOKEN_VOLUME = "token"
_SCRATCH_VOLUME = "scratch"


class ManifestError(ValueError):
    """The run cannot be expressed with this configuration (e.g. a database without volume)."""


def node_selector_labels(node_name: str) -> dict[str, str]:
    """The labels every object of this node carries (what the informers select on)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_NODE: node_name}


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels.items())


def job_name(node_name: str, run_id: int) -> str:
    """The run's Job name: fixed by node and run, so a repeated start finds it."""
    digest = hashlib.sha256(node_name.encode()).hexdigest()[:6]
    return f"fednode-run-{run_id}-{digest}"


def run_of_job_name(node_name: str, name: str) -> int | None:
    """The run whose Job (of this node) ``name`` is; ``None`` for any other name."""
    prefix, _, rest = name.partition("fednode-run-")
    run, _, _ = rest.partition("-")
    if prefix or not run.isdigit() or job_name(node_name, int(run)) != name:
        return None
    return int(run)


def secret_name(node_name: str, run_id: int) -> str:
    return f"{job_name(node_name, run_id)}-token"


def run_directory(run_id: int) -> str:
    """The run's folder on the task volume (as :class:`executors.runfiles.RunFiles`)."""
    return f"run-{run_id}"


def job_annotations(spec: RunSpec) -> dict[str, str]:
    annotations = {
        ANNOTATION_RUN: str(spec.run_id),
        ANNOTATION_TASK: str(spec.task_id),
        ANNOTATION_ORGANIZATION: str(spec.organization_id),
        ANNOTATION_COLLABORATION: str(spec.collaboration_id),
        ANNOTATION_IMAGE: spec.image,
    }
    if spec.parent_task_id is not None:
        annotations[ANNOTATION_PARENT_TASK] = str(spec.parent_task_id)
    if "traceparent" in spec.trace_context:
        annotations[ANNOTATION_TRACEPARENT] = spec.trace_context["traceparent"]
    if "tracestate" in spec.trace_context:
        annotations[ANNOTATION_TRACESTATE] = spec.trace_context["tracestate"]
    if spec.sealed_token:
        annotations[ANNOTATION_SEALED_TOKEN] = spec.sealed_token
    return annotations


def trace_context_of(annotations: dict[str, str]) -> dict[str, str]:
    """The W3C trace context a Job carries (the inverse of :func:`job_annotations`)."""
    context = {}
    if ANNOTATION_TRACEPARENT in annotations:
        context["traceparent"] = annotations[ANNOTATION_TRACEPARENT]
    if ANNOTATION_TRACESTATE in annotations:
        context["tracestate"] = annotations[ANNOTATION_TRACESTATE]
    return context


def sealed_token_of(annotations: dict[str, str]) -> str | None:
    """The node's sealed copy of the run's token a Job carries (see :func:`job_annotations`)."""
    return annotations.get(ANNOTATION_SEALED_TOKEN) or None


def token_secret(
    spec: RunSpec, *, namespace: str, name: str, labels: dict[str, str], owner: Json
) -> Json:
    """The run's container token, as an immutable Secret owned by the run's Job ``owner``.

    Created after the Job, already owned by it, so it goes with the Job and the node never
    needs ``patch`` on Secrets (a patch answers with the Secret's data: reading by patching).
    """
    token = spec.token.get_secret_value() if spec.token else ""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            **owner_patch(owner)["metadata"],
        },
        "type": "Opaque",
        "immutable": True,
        "data": {TOKEN_FILE_NAME: base64.b64encode(token.encode()).decode()},
    }


def owner_patch(job: Json) -> Json:
    """A merge patch making ``job`` the owner of another object (garbage-collected with it)."""
    metadata = job["metadata"]
    return {
        "metadata": {
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": metadata["name"],
                    "uid": metadata["uid"],
                }
            ]
        }
    }


def run_job(
    spec: RunSpec,
    *,
    settings: KubernetesSettings,
    namespace: str,
    name: str,
    labels: dict[str, str],
    token_secret_name: str | None,
    pin_to_node: str | None,
) -> Json:
    """The run's Job; raises :class:`ManifestError` when the run cannot be expressed."""
    uid, gid = settings.run_as_user, settings.run_as_group
    mounts, volumes = _storage(spec, settings, token_secret_name)
    container: Json = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": [{"name": key, "value": value} for key, value in spec.environment.items()],
        "resources": _resources(spec, settings),
        "securityContext": container_security_context(run_as_user=uid, run_as_group=gid),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: Json = {
        "restartPolicy": "Never",
        # A killed run has nothing to save: a short grace ends it (algorithms often run as
        # PID 1, which ignores SIGTERM, so the default 30 s would be spent waiting).
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(run_as_user=uid, run_as_group=gid),
        "containers": [container],
        "volumes": volumes,
    }
    _schedule(pod_spec, spec, settings, pin_to_node)
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    pod_metadata: Json = {"labels": labels}
    if spec.annotations:
        pod_metadata["annotations"] = dict(spec.annotations)
    job_spec: Json = {
        "backoffLimit": settings.backoff_limit,
        "activeDeadlineSeconds": active_deadline(spec.deadline_seconds),
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "completions": 1,
        "parallelism": 1,
        "template": {"metadata": pod_metadata, "spec": pod_spec},
    }
    job_labels = dict(labels)
    if settings.kueue is not None:
        # Kueue's contract: the Job waits suspended until its Workload is admitted.
        job_spec["suspend"] = True
        job_labels[LABEL_KUEUE_QUEUE] = settings.kueue.queue_name
        if settings.kueue.priority_class:
            job_labels[LABEL_KUEUE_PRIORITY] = settings.kueue.priority_class
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": job_labels,
            "annotations": job_annotations(spec),
        },
        "spec": job_spec,
    }


def active_deadline(deadline_seconds: int) -> int:
    """The Job's ``activeDeadlineSeconds`` for a run's deadline.

    The Job controller measures from ``status.startTime``, which has a resolution of one
    second, so it can end a Job up to a second early; one second more keeps the promise
    that a run is never stopped before its deadline.
    """
    return deadline_seconds + 1


def _resources(spec: RunSpec, settings: KubernetesSettings) -> Json:
    wanted = {
        "cpu": f"{max(1, round(spec.resources.cpu * 1000))}m",
        "memory": f"{spec.resources.memory_mb}Mi",
    }
    limits = dict(wanted)
    if spec.resources.gpus:
        limits[settings.gpu_resource_name] = str(spec.resources.gpus)
    return {"requests": wanted, "limits": limits}


def _schedule(
    pod_spec: Json, spec: RunSpec, settings: KubernetesSettings, pin_to_node: str | None
) -> None:
    selector = dict(settings.node_selector)
    tolerations = [dict(t) for t in settings.tolerations]
    if spec.resources.gpus:
        selector |= settings.gpu_node_selector
        tolerations += [dict(t) for t in settings.gpu_tolerations]
        if spec.resources.gpu_type and settings.gpu_type_label:
            selector[settings.gpu_type_label] = spec.resources.gpu_type
    if selector:
        pod_spec["nodeSelector"] = selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if pin_to_node:
        term = {
            "matchFields": [{"key": "metadata.name", "operator": "In", "values": [pin_to_node]}]
        }
        pod_spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
            }
        }


def _storage(
    spec: RunSpec, settings: KubernetesSettings, token_secret_name: str | None
) -> tuple[list[Json], list[Json]]:
    folder = run_directory(spec.run_id)
    mounts: list[Json] = [
        _task_file(folder, INPUT_FILE_NAME, read_only=True),
        _task_file(folder, OUTPUT_FILE_NAME, read_only=False),
        {"name": _SCRATCH_VOLUME, "mountPath": CONTAINER_SCRATCH_DIR},
    ]
    volumes: list[Json] = [
        {"name": _TASK_VOLUME, "persistentVolumeClaim": {"claimName": settings.task_volume_claim}},
        {"name": _SCRATCH_VOLUME, "emptyDir": {"sizeLimit": settings.scratch_size_limit}},
    ]
    if token_secret_name is not None:
        mounts.append(
            {
                "name": _TOKEN_VOLUME,
                "readOnly": True,
                "subPath": TOKEN_FILE_NAME,
                "mountPath": f"{CONTAINER_TASK_DIR}/{TOKEN_FILE_NAME}",
            }
        )
        volumes.append(
            {
                "name": _TOKEN_VOLUME,
                "secret": {"secretName": token_secret_name, "defaultMode": 0o444},
            }
        )
    else:
        mounts.append(_task_file(folder, TOKEN_FILE_NAME, read_only=True))
    for index, database in enumerate(d for d in spec.databases if d.is_local_path):
        source = settings.databases.get(database.label)
        if source is None:
            raise ManifestError(
                f"database {database.label!r} is a file database but the Kubernetes executor "
                f"has no volume for it (executor.databases.{database.label})"
            )
        volume_name = f"db-{index}"
        mount: Json = {
            "name": volume_name,
            "readOnly": True,
            "mountPath": f"{CONTAINER_DATA_DIR}/{database.label}",
        }
        if source.sub_path:
            mount["subPath"] = source.sub_path
        mounts.append(mount)
        volumes.append({"name": volume_name, **database_volume_source(source)})
    return mounts, volumes


def _task_file(folder: str, name: str, *, read_only: bool) -> Json:
    """One of the run's files on the task volume, mounted by itself at ``/mnt/task/<name>``."""
    return {
        "name": _TASK_VOLUME,
        "mountPath": f"{CONTAINER_TASK_DIR}/{name}",
        "subPath": f"{folder}/{name}",
        "readOnly": read_only,
    }


def database_volume_source(source: DatabaseVolume) -> Json:
    if source.claim:
        return {"persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}}
    if source.config_map:
        return {"configMap": {"name": source.config_map}}
    return {"hostPath": {"path": source.host_path, "type": "Directory"}}
