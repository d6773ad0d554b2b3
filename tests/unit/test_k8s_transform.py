"""The informers' transforms keep what the executor reads and drop the rest: a trimmed Job
and its trimmed pods are judged exactly as the whole objects are, and every label and
annotation survives (a restarted node reads its runs from them)."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import SecretStr

from common.types import Json
from executors.base import run_labels
from executors.kubernetes.config import KubernetesSettings
from executors.kubernetes.manifests import owner_patch, run_job
from executors.kubernetes.observe import observe
from executors.kubernetes.transform import (
    slim_job,
    slim_pod,
    slim_workload,
    without_managed_fields,
)
from executors.spec import Resources, RunSpec

MANAGED = [
    {
        "manager": "kube-controller-manager",
        "operation": "Update",
        "fieldsV1": {"f:status": {"f:conditions": {}, "f:active": {}}},
    }
]


def whole_job(
    *, conditions: list[Json] | None = None, settings: KubernetesSettings | None = None
) -> Json:
    """A Job as the API server sends it: the executor's manifest plus server fields."""
    spec = RunSpec(
        run_id=7,
        task_id=70,
        organization_id=1,
        collaboration_id=2,
        image="harbor.example/algo:1",
        token=SecretStr("t"),
        environment={"HOST": "http://proxy", "PORT": "7654"},
        resources=Resources(cpu=0.5, memory_mb=256),
        trace_context={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    job = run_job(
        spec,
        settings=settings or KubernetesSettings(),
        namespace="runs",
        name="fednode-n-7",
        labels=run_labels(spec, node_name="n"),
        token_secret_name="fednode-n-7-token",
        pin_to_node=None,
    )
    job["metadata"].update(
        {
            "uid": "4a0c-uid",
            "resourceVersion": "1234",
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": MANAGED,
        }
    )
    job["metadata"]["annotations"]["example.org/added-later"] = "sealed"
    job["spec"]["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": "4a0c"}}
    job["status"] = {
        "startTime": "2026-01-01T00:00:01Z",
        "active": 1,
        "ready": 0,
        "terminating": 0,
        "uncountedTerminatedPods": {},
        "conditions": [
            {
                **c,
                "lastProbeTime": "2026-01-01T00:00:09Z",
                "lastTransitionTime": "2026-01-01T00:00:09Z",
            }
            for c in conditions or []
        ],
    }
    return job


def whole_pod(
    job: Json,
    *,
    name: str = "fednode-n-7-abcde",
    phase: str = "Running",
    state: Json | None = None,
    last_state: Json | None = None,
    deleting: bool = False,
    created: str = "2026-01-01T00:00:02Z",
) -> Json:
    """A Pod as the API server sends it: the Job's template plus a full status."""
    template = copy.deepcopy(job["spec"]["template"])
    metadata = {
        **template["metadata"],
        "name": name,
        "namespace": "runs",
        "uid": f"uid-{name}",
        "resourceVersion": "1240",
        "creationTimestamp": created,
        "managedFields": MANAGED,
        "generateName": "fednode-n-7-",
        "ownerReferences": [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": "fednode-n-7",
                "uid": "4a0c-uid",
                "controller": True,
            }
        ],
    }
    metadata["labels"] = {
        **metadata.get("labels", {}),
        "job-name": "fednode-n-7",
        "batch.kubernetes.io/controller-uid": "4a0c",
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:01:00Z"
        metadata["deletionGracePeriodSeconds"] = 5
    container = {
        "name": "algorithm",
        "image": "harbor.example/algo:1",
        "imageID": "sha256:ab",
        "containerID": "containerd://ff",
        "ready": phase == "Running",
        "restartCount": 0,
        "started": phase == "Running",
        "state": state or {"running": {"startedAt": "2026-01-01T00:00:03Z"}},
        "lastState": last_state or {},
        "volumeMounts": [{"name": "task", "mountPath": "/mnt/task"}],
    }
    return {
        "metadata": metadata,
        "spec": {**template["spec"], "nodeName": "kwok-node-0"},
        "status": {
            "phase": phase,
            "hostIP": "10.0.0.1",
            "podIP": "10.1.0.9",
            "qosClass": "Guaranteed",
            "startTime": "2026-01-01T00:00:02Z",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [container],
        },
    }


def condition(kind: str, reason: str = "", message: str = "") -> Json:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def terminated(code: int, reason: str, message: str = "") -> Json:
    return {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "message": message,
            "startedAt": "2026-01-01T00:00:03Z",
            "finishedAt": "2026-01-01T00:00:05Z",
            "containerID": "c://x",
        }
    }


def waiting(reason: str) -> Json:
    return {"waiting": {"reason": reason, "message": f"{reason}: the details"}}


def _cases() -> dict[str, tuple[Json, list[Json]]]:
    plain = whole_job()
    return {
        "no-pod": (plain, []),
        "running": (plain, [whole_pod(plain)]),
        "pending": (plain, [whole_pod(plain, phase="Pending", state=waiting("ContainerCreating"))]),
        "image": (plain, [whole_pod(plain, phase="Pending", state=waiting("ErrImagePull"))]),
        "config": (
            plain,
            [whole_pod(plain, phase="Pending", state=waiting("CreateContainerConfigError"))],
        ),
        "crashed": (plain, [whole_pod(plain, phase="Failed", state=terminated(3, "Error"))]),
        "oom": (plain, [whole_pod(plain, phase="Failed", state=terminated(137, "OOMKilled"))]),
        "last-state": (
            plain,
            [
                whole_pod(
                    plain, phase="Failed", state={}, last_state=terminated(2, "Error", "bad input")
                )
            ],
        ),
        "deleting": (
            plain,
            [whole_pod(plain, phase="Failed", deleting=True, state=terminated(143, "Error"))],
        ),
        "retried": (
            whole_job(),
            [
                whole_pod(
                    plain,
                    name="a",
                    phase="Failed",
                    state=terminated(1, "Error"),
                    created="2026-01-01T00:00:02Z",
                ),
                whole_pod(plain, name="b", phase="Running", created="2026-01-01T00:00:09Z"),
            ],
        ),
        "complete": (
            whole_job(conditions=[condition("SuccessCriteriaMet"), condition("Complete")]),
            [whole_pod(plain, phase="Succeeded", state=terminated(0, "Completed"))],
        ),
        "deadline": (
            whole_job(
                conditions=[
                    condition("Failed", "DeadlineExceeded", "Job was active longer than allowed")
                ]
            ),
            [whole_pod(plain, phase="Failed", deleting=True, state=terminated(143, "Error"))],
        ),
        "job-failed": (
            whole_job(
                conditions=[
                    condition(
                        "FailureTarget", "BackoffLimitExceeded", "Job has reached the backoff limit"
                    )
                ]
            ),
            [whole_pod(plain, phase="Failed", state=terminated(4, "Error", "why"))],
        ),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_trimmed_objects_are_judged_as_the_whole_ones(case: str) -> None:
    job, pods = _cases()[case]
    whole = observe(job, pods, backoff_limit=0)
    trimmed = observe(
        slim_job(copy.deepcopy(job)), [slim_pod(copy.deepcopy(p)) for p in pods], backoff_limit=0
    )
    assert trimmed == whole


def test_every_label_and_annotation_is_kept_and_the_specs_are_dropped() -> None:
    job = whole_job()
    pod = whole_pod(job)
    slim, slim_p = slim_job(copy.deepcopy(job)), slim_pod(copy.deepcopy(pod))
    assert slim["metadata"]["labels"] == job["metadata"]["labels"]
    assert slim["metadata"]["annotations"] == job["metadata"]["annotations"]
    assert slim["metadata"]["annotations"]["example.org/added-later"] == "sealed"
    assert slim_p["metadata"]["labels"] == pod["metadata"]["labels"]
    assert slim_p["metadata"]["ownerReferences"] == pod["metadata"]["ownerReferences"]
    for trimmed in (slim, slim_p):
        assert "managedFields" not in trimmed["metadata"]
        assert "template" not in trimmed.get("spec", {})
    assert slim["spec"] == {"backoffLimit": 0}
    assert "spec" not in slim_p
    # where the node connects peer streams to the run (run_address)
    assert slim_p["status"]["podIP"] == pod["status"]["podIP"]
    # the uid and name make the Job the token Secret's owner
    assert owner_patch(slim) == owner_patch(job)


def test_a_trimmed_pod_is_a_small_fraction_of_the_whole() -> None:
    job = whole_job()
    pod = whole_pod(job)
    assert len(json.dumps(slim_job(copy.deepcopy(job)))) < len(json.dumps(job)) / 2
    assert len(json.dumps(slim_pod(copy.deepcopy(pod)))) < len(json.dumps(pod)) / 2


def test_the_default_transform_drops_only_managed_fields() -> None:
    job = whole_job()
    expected = copy.deepcopy(job)
    del expected["metadata"]["managedFields"]
    assert without_managed_fields(job) == expected


def test_a_job_held_by_kueue_and_its_workload_are_judged_trimmed_as_whole() -> None:
    job = whole_job(settings=KubernetesSettings(kueue={"queue_name": "gpu-runs"}))
    workload: Json = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "Workload",
        "metadata": {
            "name": "job-fednode-n-7-1a2b3",
            "ownerReferences": [{"kind": "Job", "name": "fednode-n-7", "uid": "4a0c-uid"}],
            "managedFields": MANAGED,
        },
        "spec": {"podSets": [{"name": "main", "count": 1, "template": job["spec"]["template"]}]},
        "status": {
            "conditions": [
                {
                    "type": "QuotaReserved",
                    "status": "False",
                    "reason": "Pending",
                    "message": "insufficient unused quota for nvidia.com/gpu",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ]
        },
    }
    whole = observe(job, [], backoff_limit=0, workload=workload)
    slim = slim_workload(copy.deepcopy(workload))
    trimmed = observe(slim_job(copy.deepcopy(job)), [], backoff_limit=0, workload=slim)
    assert trimmed == whole
    assert whole.message.endswith("insufficient unused quota for nvidia.com/gpu")
    assert "spec" not in slim
    assert slim["metadata"]["ownerReferences"] == workload["metadata"]["ownerReferences"]
