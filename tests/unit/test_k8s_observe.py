"""How the Kubernetes executor reads a run's phase from its Job and pods, and what it
publishes, on hand-written objects shaped like the API server's (the real thing is in
tests/integration/test_k8s_executor.py)."""

from __future__ import annotations

import pytest

from common.types import Json
from executors.events import RunEventStream
from executors.kubernetes.informer import Change
from executors.kubernetes.manifests import LABEL_KUEUE_QUEUE, job_name, run_of_job_name
from executors.kubernetes.observe import observe
from executors.kubernetes.tracker import RunTracker
from executors.spec import Phase, Reason, RunEvent

NODE = "node-a"


def job(
    run_id: int = 1,
    *,
    conditions: list[Json] | None = None,
    backoff: int = 0,
    suspend: bool | None = None,
) -> Json:
    spec: Json = {"backoffLimit": backoff}
    if suspend is not None:
        spec["suspend"] = suspend
    return {
        "metadata": {
            "name": job_name(NODE, run_id),
            "resourceVersion": "1",
            "labels": {
                "fednode.io/run-id": str(run_id),
                "fednode.io/task-id": "9",
                LABEL_KUEUE_QUEUE: "gpu-runs",
            },
        },
        "spec": spec,
        "status": {"conditions": conditions or []},
    }


def workload(run_id: int, *, quota_message: str | None = None, owner: str | None = None) -> Json:
    """Kueue's Workload of a run's Job (named and owned as Kueue does)."""
    conditions = []
    if quota_message is not None:
        conditions.append(
            {
                "type": "QuotaReserved",
                "status": "False",
                "reason": "Pending",
                "message": quota_message,
            }
        )
    name = owner or job_name(NODE, run_id)
    return {
        "metadata": {
            "name": f"job-{name}-1a2b3",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name}],
        },
        "status": {"conditions": conditions},
    }


def pod(
    run_id: int = 1,
    *,
    name: str = "p",
    phase: str = "Pending",
    node: str | None = None,
    waiting: str | None = None,
    terminated: Json | None = None,
    deleting: bool = False,
    created: str = "2026-01-01T00:00:00Z",
) -> Json:
    state: Json = {}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": f"{waiting} details"}}
    if terminated:
        state = {"terminated": terminated}
    metadata: Json = {
        "name": name,
        "creationTimestamp": created,
        "labels": {"fednode.io/run-id": str(run_id)},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    return {
        "metadata": metadata,
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": phase, "containerStatuses": [{"state": state}] if state else []},
    }


def condition(kind: str, reason: str = "", message: str = "") -> Json:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        ([], (Phase.STARTING, None, None)),
        ([pod()], (Phase.STARTING, None, None)),  # waiting to be scheduled (e.g. for GPUs)
        ([pod(node="n")], (Phase.STARTING, None, None)),
        ([pod(phase="Running", node="n")], (Phase.RUNNING, None, None)),
        (
            [pod(phase="Succeeded", terminated={"exitCode": 0})],
            (Phase.SUCCEEDED, Reason.COMPLETED, 0),
        ),
        (
            [pod(phase="Failed", terminated={"exitCode": 3, "reason": "Error"})],
            (Phase.FAILED, Reason.CRASHED, 3),
        ),
        (
            [pod(phase="Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})],
            (Phase.FAILED, Reason.OOM_KILLED, 137),
        ),
        # a pod ended by a deletion (kill, deadline) is no crash: the Job will say
        (
            [pod(phase="Failed", deleting=True, terminated={"exitCode": 143})],
            (Phase.STARTING, None, None),
        ),
        ([pod(waiting="ErrImagePull")], (Phase.FAILED, Reason.IMAGE_NOT_FOUND, None)),
        ([pod(waiting="ImagePullBackOff")], (Phase.FAILED, Reason.IMAGE_NOT_FOUND, None)),
        ([pod(waiting="InvalidImageName")], (Phase.FAILED, Reason.IMAGE_NOT_FOUND, None)),
        ([pod(waiting="CreateContainerConfigError")], (Phase.FAILED, Reason.CRASHED, None)),
        ([pod(waiting="ContainerCreating")], (Phase.STARTING, None, None)),
    ],
    ids=[
        "no-pod",
        "unscheduled",
        "scheduled",
        "running",
        "succeeded",
        "exit-3",
        "oom",
        "deleted",
        "err-image-pull",
        "image-pull-backoff",
        "invalid-image",
        "config-error",
        "creating",
    ],
)
def test_a_pod_tells_the_phase_reason_and_exit_code(
    pods: list[Json], expected: tuple[Phase, Reason | None, int | None]
) -> None:
    seen = observe(job(), pods, backoff_limit=0)
    assert (seen.phase, seen.reason, seen.exit_code) == expected


def test_pods_that_can_never_progress_are_given_up_on() -> None:
    assert observe(job(), [pod(waiting="ErrImagePull")], backoff_limit=0).give_up
    assert observe(job(), [pod(waiting="CrashLoopBackOff")], backoff_limit=0).give_up
    assert not observe(job(), [pod(phase="Running")], backoff_limit=0).give_up
    message = observe(job(), [pod(waiting="ErrImagePull")], backoff_limit=0).message
    assert message == "ErrImagePull: ErrImagePull details"


def test_a_failed_pod_with_retries_left_is_not_the_end_of_the_run() -> None:
    failed = pod(name="a", phase="Failed", terminated={"exitCode": 1})
    retry = pod(name="b", phase="Running", created="2026-01-01T00:00:05Z")
    assert observe(job(backoff=1), [failed], backoff_limit=0).phase is Phase.STARTING
    assert observe(job(backoff=1), [failed, retry], backoff_limit=0).phase is Phase.RUNNING
    second = pod(
        name="b", phase="Failed", created="2026-01-01T00:00:05Z", terminated={"exitCode": 2}
    )
    seen = observe(job(backoff=1), [failed, second], backoff_limit=0)
    assert (seen.phase, seen.exit_code) == (Phase.FAILED, 2)  # the newest pod's


def test_the_jobs_conditions_decide_deadline_and_completion() -> None:
    killed_by_deadline = pod(
        phase="Failed", deleting=True, terminated={"exitCode": 143, "reason": "Error"}
    )
    for kind in ("FailureTarget", "Failed"):
        seen = observe(
            job(conditions=[condition(kind, "DeadlineExceeded", "too long")]),
            [killed_by_deadline],
            backoff_limit=0,
        )
        assert (seen.phase, seen.reason, seen.message) == (
            Phase.FAILED,
            Reason.DEADLINE_EXCEEDED,
            "too long",
        )
    for kind in ("SuccessCriteriaMet", "Complete"):
        seen = observe(job(conditions=[condition(kind)]), [], backoff_limit=0)
        assert (seen.phase, seen.reason, seen.exit_code) == (Phase.SUCCEEDED, Reason.COMPLETED, 0)
    oom = pod(phase="Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    seen = observe(
        job(conditions=[condition("Failed", "BackoffLimitExceeded")]), [oom], backoff_limit=0
    )
    assert (seen.phase, seen.reason, seen.exit_code) == (Phase.FAILED, Reason.OOM_KILLED, 137)


# -- the tracker: what observation cannot know ---------------------------------------------


class RecordingStream(RunEventStream):
    """The real stream (de-duplication included), remembering what it let through."""

    def __init__(self) -> None:
        super().__init__()
        self.passed: list[RunEvent] = []

    def publish(self, event: RunEvent) -> bool:
        passed = super().publish(event)
        if passed:
            self.passed.append(event)
        return passed


class Recorder:
    def __init__(self) -> None:
        self.stream = RecordingStream()
        self.deleted: list[tuple[int, str]] = []
        self.tracker = RunTracker(
            stream=self.stream,
            backoff_limit=0,
            delete_job=lambda run_id, why: self.deleted.append((run_id, why)),
            run_of_job=lambda name: run_of_job_name(NODE, name),
        )
        self.tracker.release()

    def phases(self, run_id: int) -> list[Phase]:
        return [e.phase for e in self.stream.passed if e.run_id == run_id]


def test_a_vanished_job_is_killed_if_we_killed_it_else_lost() -> None:
    r = Recorder()
    for run_id in (1, 2):
        r.tracker.on_job(Change.ADDED, job(run_id))
        r.tracker.on_pod(Change.MODIFIED, pod(run_id, phase="Running", name=f"p{run_id}"))
    r.tracker.killed.add(1)
    r.tracker.on_job(Change.DELETED, job(1))
    r.tracker.on_job(Change.DELETED, job(2))
    assert r.phases(1) == [Phase.STARTING, Phase.RUNNING, Phase.KILLED]
    assert r.phases(2) == [Phase.STARTING, Phase.RUNNING, Phase.FAILED]
    assert r.tracker.ended[2].reason is Reason.LOST
    # until cleanup, both are still listed as they ended
    assert [(s.run_id, s.phase, s.task_id) for s in r.tracker.states()] == [
        (1, Phase.KILLED, 9),
        (2, Phase.FAILED, 9),
    ]


def test_a_kill_before_the_job_exists_deletes_the_job_once_it_appears() -> None:
    r = Recorder()
    r.tracker.killed.add(5)
    r.tracker.on_job(Change.ADDED, job(5))
    r.tracker.on_job(Change.MODIFIED, job(5))
    assert r.deleted == [(5, "killed")]


def test_a_bad_image_gives_up_once_and_a_deleted_job_after_the_end_is_no_loss() -> None:
    r = Recorder()
    r.tracker.on_job(Change.ADDED, job(3))
    r.tracker.on_pod(Change.MODIFIED, pod(3, waiting="ErrImagePull"))
    r.tracker.on_pod(Change.MODIFIED, pod(3, waiting="ImagePullBackOff"))
    assert len(r.deleted) == 1
    r.tracker.on_job(Change.DELETED, job(3))
    assert r.phases(3) == [Phase.STARTING, Phase.FAILED]
    assert r.tracker.ended[3].reason is Reason.IMAGE_NOT_FOUND


def test_pods_seen_before_their_job_wait_for_it() -> None:
    r = Recorder()
    r.tracker.on_pod(Change.ADDED, pod(4, phase="Running"))
    assert r.phases(4) == []
    r.tracker.on_job(Change.ADDED, job(4))
    assert r.phases(4) == [Phase.RUNNING]


def test_nothing_is_judged_until_both_caches_are_filled() -> None:
    stream = RunEventStream()
    tracker = RunTracker(stream=stream, backoff_limit=0, delete_job=lambda *_: None)
    tracker.on_job(Change.ADDED, job(6))  # the Job list comes first ...
    assert stream.phase_of(6) is None  # ... and says nothing yet about a running pod
    tracker.on_pod(Change.ADDED, pod(6, phase="Running"))
    tracker.release()
    assert stream.phase_of(6) is Phase.RUNNING  # no "starting" before it


def test_after_cleanup_a_run_is_silent_and_forgotten_once_its_objects_are_gone() -> None:
    r = Recorder()
    r.tracker.on_job(Change.ADDED, job(7))
    r.tracker.on_pod(Change.MODIFIED, pod(7, phase="Succeeded", terminated={"exitCode": 0}))
    removed: list[int] = []
    r.tracker.forget_when_gone(7, remove_files=lambda: removed.append(7))
    assert removed == [7]  # its pod has ended: kubelet sets nothing up for it any more
    assert r.tracker.states() == []
    r.tracker.on_job(Change.DELETED, job(7))
    assert r.stream.phase_of(7) is Phase.SUCCEEDED  # the pod is still there
    r.tracker.on_pod(Change.DELETED, pod(7))
    assert r.stream.phase_of(7) is None and 7 not in r.tracker.cleaning
    assert r.phases(7) == [Phase.STARTING, Phase.SUCCEEDED]


def test_a_run_killed_while_its_pod_starts_keeps_its_folder_until_the_pod_is_gone() -> None:
    # Found by the Kubernetes chaos campaign: the folder removed while kubelet still set
    # the pod up came back as root-owned ``input``/``output`` directories, left for good.
    r = Recorder()
    r.tracker.on_job(Change.ADDED, job(8))
    r.tracker.on_pod(Change.ADDED, pod(8, phase="Pending"))
    r.tracker.on_job(Change.DELETED, job(8))  # killed: the Job is deleted first
    removed: list[int] = []
    r.tracker.forget_when_gone(8, remove_files=lambda: removed.append(8))
    assert removed == []
    r.tracker.on_pod(Change.MODIFIED, pod(8, phase="Pending"))
    assert removed == []
    r.tracker.on_pod(Change.DELETED, pod(8, phase="Pending"))
    assert removed == [8]
    assert 8 not in r.tracker.cleaning


# -- Kueue: a suspended Job waits, with Kueue's reason ---------------------------------------

QUOTA = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu"


def test_a_job_held_by_kueue_is_pending_with_kueues_reason_then_starts_when_admitted() -> None:
    held = job(suspend=True)
    assert observe(held, [], backoff_limit=0) == (
        Phase.PENDING,
        None,
        None,
        "waiting for Kueue admission in queue 'gpu-runs'",
        False,
    )
    verdict = observe(held, [], backoff_limit=0, workload=workload(1, quota_message=QUOTA))
    assert verdict.phase is Phase.PENDING
    assert verdict.message == f"waiting for Kueue admission: {QUOTA}"
    # admitted: Kueue unsuspends the Job; its pod then tells the phase as for any run
    assert observe(job(suspend=False), [], backoff_limit=0).phase is Phase.STARTING
    assert observe(job(suspend=False), [pod(phase="Running")], backoff_limit=0).phase is (
        Phase.RUNNING
    )
    # a Job's end wins over its being suspended (Kueue may suspend a finished one)
    done = job(suspend=True, conditions=[condition("Complete")])
    assert observe(done, [], backoff_limit=0).phase is Phase.SUCCEEDED


def test_the_tracker_files_workloads_under_their_jobs_run_and_reports_a_new_reason() -> None:
    r = Recorder()
    r.tracker.on_job(Change.ADDED, job(1, suspend=True))
    r.tracker.on_workload(Change.ADDED, workload(1))
    r.tracker.on_workload(Change.MODIFIED, workload(1, quota_message=QUOTA))
    r.tracker.on_workload(Change.ADDED, workload(2, owner="someone-elses-job"))
    r.tracker.on_workload(Change.ADDED, workload(3, owner=job_name("node-b", 3)))
    r.tracker.on_job(Change.MODIFIED, job(1, suspend=False))
    r.tracker.on_pod(Change.ADDED, pod(1, phase="Running"))
    assert [(e.phase, e.message) for e in r.stream.passed] == [
        (Phase.PENDING, "waiting for Kueue admission in queue 'gpu-runs'"),
        (Phase.PENDING, f"waiting for Kueue admission: {QUOTA}"),
        (Phase.STARTING, ""),
        (Phase.RUNNING, ""),
    ]
    assert set(r.tracker.workloads) == {1}


def test_a_run_killed_while_kueue_holds_it_ends_killed() -> None:
    r = Recorder()
    r.tracker.on_job(Change.ADDED, job(1, suspend=True))
    r.tracker.killed.add(1)
    r.tracker.on_job(Change.DELETED, job(1, suspend=True))
    assert r.phases(1) == [Phase.PENDING, Phase.KILLED]


def test_only_this_nodes_job_names_map_back_to_runs() -> None:
    assert run_of_job_name(NODE, job_name(NODE, 42)) == 42
    assert run_of_job_name(NODE, job_name("node-b", 42)) is None
    assert run_of_job_name(NODE, "fednode-run-x-abc") is None
    assert run_of_job_name(NODE, "other") is None
