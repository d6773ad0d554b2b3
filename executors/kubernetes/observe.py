"""From a run's Job and pods, as last seen, to its phase: one pure function, level-triggered.

:func:`observe` looks at the current state, never at the history, so the same answer comes
out of a watch event, a relist after ``410 Gone``, or a restart — the event stream then lets
each phase through once. Where the answer comes from:

* the pod, first, because it changes first: until it runs (no pod yet, waiting to be
  scheduled — e.g. for a GPU —, pulling) → ``starting``, ``Running`` → ``running``,
  ``Succeeded`` → ``succeeded``; ``Failed`` (not being deleted) → ``failed``
  once the Job has no retries left (``backoffLimit``), with ``oom-killed`` or ``crashed`` and
  the exit code. Waiting on an image (``ErrImagePull``, ``ImagePullBackOff``,
  ``InvalidImageName``) → ``image-not-found``; ``CreateContainerConfigError``,
  ``CrashLoopBackOff`` and the like → ``crashed``: such a pod would wait forever, so the
  observation says to give up on it (the executor deletes the Job);
* the Job's conditions: ``Complete``/``SuccessCriteriaMet`` → succeeded;
  ``Failed``/``FailureTarget`` with reason ``DeadlineExceeded`` → ``deadline-exceeded``,
  any other failure → the last pod's details. (A pod killed by the deadline is being
  deleted, so it does not count as a crash.)

A Job that Kueue holds (``spec.suspend: true``, no pod yet) → ``pending``, with Kueue's
reason: the ``QuotaReserved=False`` message of the run's Workload when one is known
(``insufficient quota for nvidia.com/gpu ...``), else that it waits for admission in its
queue. Kueue unsuspends the Job on admission, and the pod then says ``starting`` as above.

A Job that disappears is not judged here: whether that is ``killed`` (we deleted it) or
``lost`` depends on what the executor did, so the executor decides.
"""

from __future__ import annotations

from common.types import Json
from executors.kubernetes.manifests import LABEL_KUEUE_QUEUE
from executors.spec import Phase, Reason
from executors.verdict import STARTING, Verdict

IMAGE_ERRORS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
)
START_ERRORS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff", "RunContainerError"}
)


def observe(
    job: Json | None, pods: list[Json], *, backoff_limit: int, workload: Json | None = None
) -> Verdict:
    """The phase of a run from its Job (``None`` if not seen yet), its pods and, under
    Kueue, its Workload."""
    pod = newest(pods)
    if job is not None:
        from_job = _from_job(job, pods)
        if from_job is not None:
            return from_job
        spec = job.get("spec") or {}
        backoff_limit = int(spec.get("backoffLimit", backoff_limit))
        if spec.get("suspend") and (pod is None or pod["metadata"].get("deletionTimestamp")):
            return Verdict(Phase.PENDING, message=waiting_reason(job, workload))
    if pod is None:
        return STARTING
    return _from_pod(pod, pods, backoff_limit=backoff_limit)


def waiting_reason(job: Json, workload: Json | None) -> str:
    """Why a suspended Job waits: Kueue's own words when its Workload has them."""
    for condition in (workload or {}).get("status", {}).get("conditions") or []:
        if condition.get("type") == "QuotaReserved" and condition.get("status") == "False":
            message = str(condition.get("message") or condition.get("reason") or "")
            if message:
                return f"waiting for Kueue admission: {message}"
    queue = (job.get("metadata", {}).get("labels") or {}).get(LABEL_KUEUE_QUEUE)
    where = f" in queue {queue!r}" if queue else ""
    return f"waiting for Kueue admission{where}"


def newest(pods: list[Json]) -> Json | None:
    """The run's current pod (a Job with retries may have several)."""
    if not pods:
        return None
    return max(
        pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"])
    )


def _from_job(job: Json, pods: list[Json]) -> Verdict | None:
    conditions = {
        c.get("type"): c
        for c in job.get("status", {}).get("conditions") or []
        if c.get("status") == "True"
    }
    for kind in ("Complete", "SuccessCriteriaMet"):
        if kind in conditions:
            return Verdict(Phase.SUCCEEDED, Reason.COMPLETED, 0)
    for kind in ("Failed", "FailureTarget"):
        condition = conditions.get(kind)
        if condition is None:
            continue
        message = str(condition.get("message") or condition.get("reason") or "")
        if condition.get("reason") == "DeadlineExceeded":
            return Verdict(Phase.FAILED, Reason.DEADLINE_EXCEEDED, None, message)
        failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
        pod = newest(failed)
        if pod is not None:
            return _failure(pod, fallback=message)
        return Verdict(Phase.FAILED, Reason.CRASHED, None, message)
    return None


def _from_pod(pod: Json, pods: list[Json], *, backoff_limit: int) -> Verdict:
    status = pod.get("status") or {}
    phase = status.get("phase")
    deleting = pod["metadata"].get("deletionTimestamp") is not None
    if phase == "Succeeded":
        return Verdict(Phase.SUCCEEDED, Reason.COMPLETED, 0)
    if phase == "Failed":
        failures = sum(1 for p in pods if p.get("status", {}).get("phase") == "Failed")
        if not deleting and failures > backoff_limit:
            return _failure(pod)
        return STARTING  # killed, past its deadline, or to be retried: the Job will tell
    waiting = _waiting(status)
    if waiting is not None:
        reason, message = waiting
        if reason in IMAGE_ERRORS:
            return Verdict(
                Phase.FAILED, Reason.IMAGE_NOT_FOUND, None, f"{reason}: {message}", give_up=True
            )
        if reason in START_ERRORS:
            return Verdict(Phase.FAILED, Reason.CRASHED, None, f"{reason}: {message}", give_up=True)
    if phase == "Running":
        return Verdict(Phase.RUNNING)
    return STARTING


def _waiting(status: Json) -> tuple[str, str] | None:
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"]), str(waiting.get("message") or "")
    return None


def terminated(pod: Json) -> Json | None:
    """The algorithm container's termination record, if it ended."""
    for container in pod.get("status", {}).get("containerStatuses") or []:
        state = container.get("state") or {}
        record = state.get("terminated") or (container.get("lastState") or {}).get("terminated")
        if record:
            return dict(record)
    return None


def _failure(pod: Json, *, fallback: str = "") -> Verdict:
    record = terminated(pod)
    if record is None:
        message = str(pod.get("status", {}).get("message") or fallback)
        return Verdict(Phase.FAILED, Reason.CRASHED, None, message)
    exit_code = record.get("exitCode")
    code = int(exit_code) if exit_code is not None else None
    message = str(record.get("message") or record.get("reason") or fallback).strip()
    if record.get("reason") == "OOMKilled":
        return Verdict(Phase.FAILED, Reason.OOM_KILLED, code, message)
    return Verdict(Phase.FAILED, Reason.CRASHED, code, message)
