"""Joins what the two informers see into runs, and publishes each run's phase.

The Job informer and the Pod informer (and, under Kueue, the Workload informer) each call
one handler here, in their own stream's
order. :class:`RunTracker` files every object under its run id (the ``fednode.io/run-id``
label), asks :func:`~executors.kubernetes.observe.observe` what the run's objects say now,
and publishes that to the :class:`~executors.events.RunEventStream`, which lets each phase
through once and never backwards. So the tracker is level-triggered: it does not matter
which stream is ahead, nor whether a change came as a watch event or from a relist. While
the executor opens, both caches are filled first (:meth:`RunTracker.release` then judges
every run once), so a restarted node sees each run as it is, not half-listed.

What observation alone cannot tell is what *we* did:

* a kill is sticky: a run killed before its Job exists (a kill racing the start) has its
  Job deleted as soon as the Job appears;
* a Job that vanishes was ``killed`` if the executor deleted it on request, and is
  ``lost`` otherwise (unless the run had ended already);
* a run whose Job is gone but which has not been cleaned up yet is still listed, with the
  way it ended, until ``cleanup``; after ``cleanup`` the run is dropped from memory once its
  objects are gone from both caches.

* a cleaned-up run's folder is removed only once no pod of the run can start a container
  (kubelet makes a missing ``subPath`` again, as root, while it sets a pod up).

No I/O happens here: deleting a Job (for a kill, or a run that can never progress) and
removing a run's folder are delegated to the executor through callbacks.
"""

from __future__ import annotations

from collections.abc import Callable

from common.types import Json
from executors.base import LABEL_RUN, LABEL_TASK
from executors.events import RunEventStream
from executors.kubernetes.informer import Change
from executors.kubernetes.manifests import ANNOTATION_TASK, sealed_token_of, trace_context_of
from executors.kubernetes.observe import newest, observe
from executors.spec import Phase, Reason, RunEvent, RunState
from executors.verdict import Verdict

#: Asks the executor to delete a run's Job (``why``: for the log).
DeleteJob = Callable[[int, str], None]
#: The run a Job name belongs to (``None``: not one of this node's runs).
RunOfJob = Callable[[str], int | None]
#: Pod phases after which kubelet starts no container of the pod (Jobs never restart one).
_ENDED_POD_PHASES = frozenset({"Succeeded", "Failed"})


def run_id_of(obj: Json) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_RUN)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def task_id_of(job: Json) -> int:
    metadata = job.get("metadata", {})
    labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
    value = labels.get(LABEL_TASK) or annotations.get(ANNOTATION_TASK) or "0"
    return int(value) if value.isdigit() else 0


class RunTracker:
    """The executor's view of its runs, built from the informers' objects."""

    def __init__(
        self,
        *,
        stream: RunEventStream,
        backoff_limit: int,
        delete_job: DeleteJob,
        run_of_job: RunOfJob | None = None,
    ) -> None:
        self._stream = stream
        self._backoff_limit = backoff_limit
        self._delete_job = delete_job
        self._run_of_job = run_of_job
        self._holding = True  # until both caches are filled (release)
        self.jobs: dict[int, Json] = {}
        self.pods: dict[int, dict[str, Json]] = {}
        #: Kueue's Workload of each run held by (or admitted through) Kueue.
        self.workloads: dict[int, Json] = {}
        #: Runs killed on request (sticky: a Job that appears later is deleted too).
        self.killed: set[int] = set()
        #: Runs whose Job the executor has asked to delete (kill, or no way forward).
        self.deleting: set[int] = set()
        #: Runs being cleaned up: no more events; forgotten when their objects are gone.
        self.cleaning: set[int] = set()
        #: How each ended run ended (kept until cleanup, also once its Job is gone).
        self.ended: dict[int, RunEvent] = {}
        #: Task ids of ended runs whose Job is gone (so that they are still listed).
        self.vanished: dict[int, int] = {}
        #: Cleaned-up runs whose folder waits until no pod of theirs can start a container
        #: (kubelet makes a missing ``subPath`` again, as root, when it sets one up).
        self._remove_files: dict[int, Callable[[], object]] = {}

    # -- informer handlers ---------------------------------------------------------------

    def on_job(self, change: Change, job: Json) -> None:
        run_id = run_id_of(job)
        if run_id is None:
            return
        if change is Change.DELETED:
            self.jobs.pop(run_id, None)
            self._job_gone(run_id, job)
        else:
            self.jobs[run_id] = job
            self._update(run_id)

    def on_pod(self, change: Change, pod: Json) -> None:
        run_id = run_id_of(pod)
        if run_id is None:
            return
        name = pod["metadata"]["name"]
        if change is Change.DELETED:
            pods = self.pods.get(run_id, {})
            pods.pop(name, None)
            if not pods:
                self.pods.pop(run_id, None)
        else:
            self.pods.setdefault(run_id, {})[name] = pod
        self._update(run_id)

    def on_workload(self, change: Change, workload: Json) -> None:
        """A Kueue Workload: filed under the run whose Job owns it (why the run waits)."""
        if self._run_of_job is None:
            return
        owners = workload.get("metadata", {}).get("ownerReferences") or []
        runs = [self._run_of_job(str(o.get("name"))) for o in owners if o.get("kind") == "Job"]
        run_id = next((r for r in runs if r is not None), None)
        if run_id is None:
            return
        if change is Change.DELETED:
            self.workloads.pop(run_id, None)
            return
        self.workloads[run_id] = workload
        if run_id in self.jobs:
            self._update(run_id)

    def release(self) -> None:
        """Both caches are filled: judge every run once, then follow changes."""
        self._holding = False
        for run_id in sorted(set(self.jobs) | set(self.pods)):
            self._update(run_id)

    # -- what the executor asks and tells -------------------------------------------------

    def pod_name(self, run_id: int) -> str | None:
        pod = newest(list(self.pods.get(run_id, {}).values()))
        return None if pod is None else str(pod["metadata"]["name"])

    def observation(self, run_id: int) -> Verdict:
        return observe(
            self.jobs.get(run_id),
            list(self.pods.get(run_id, {}).values()),
            backoff_limit=self._backoff_limit,
            workload=self.workloads.get(run_id),
        )

    def states(self) -> list[RunState]:
        """Every run not cleaned up: those with a Job as it is now, and ended ones whose
        Job is gone (killed, lost, given up) as they ended."""
        states = []
        for run_id, job in self.jobs.items():
            if run_id in self.cleaning:
                continue
            seen = self.observation(run_id)
            ended = self.ended.get(run_id)
            if ended is not None:  # what was reported is what the run is
                seen = Verdict(ended.phase, ended.reason, ended.exit_code, ended.message)
            annotations = job.get("metadata", {}).get("annotations") or {}
            states.append(
                RunState(
                    run_id,
                    task_id_of(job),
                    seen.phase,
                    seen.reason,
                    seen.exit_code,
                    trace_context_of(annotations),
                    sealed_token_of(annotations),
                )
            )
        for run_id, task_id in self.vanished.items():
            ended = self.ended.get(run_id)
            if ended is None or run_id in self.jobs or run_id in self.cleaning:
                continue
            states.append(RunState(run_id, task_id, ended.phase, ended.reason, ended.exit_code))
        return sorted(states, key=lambda s: s.run_id)

    def killed_before_start(self, run_id: int, task_id: int) -> None:
        """A start of a run already killed: nothing is created, the run ends killed."""
        self._publish(
            RunEvent.now(run_id, Phase.KILLED, Reason.KILLED, message="killed before it started")
        )
        self.vanished[run_id] = task_id

    def forget_when_gone(self, run_id: int, *, remove_files: Callable[[], object]) -> None:
        """After cleanup: publish nothing more; drop the run once its objects are gone.

        ``remove_files`` (the run's folder) is called at once if no pod of the run can
        start a container any more (none left, or all ended), else as soon as none can:
        a run killed while its pod was being set up would otherwise get its folder back
        from kubelet, owned by root, where the node can no longer remove it (found by the
        Kubernetes chaos campaign)."""
        self.cleaning.add(run_id)
        self._remove_files[run_id] = remove_files
        self._forget_if_gone(run_id)

    # -- decisions ------------------------------------------------------------------------

    def _update(self, run_id: int) -> None:
        if self._holding:
            return
        if run_id in self.cleaning:
            self._forget_if_gone(run_id)
            return
        job = self.jobs.get(run_id)
        if run_id in self.killed and job is not None:
            self._delete(run_id, "killed")  # a kill that came before the Job did
        if job is None and self._stream.phase_of(run_id) is None:
            return  # pods of a Job not seen yet (or one never ours to report): wait
        seen = self.observation(run_id)
        self._publish(
            RunEvent.now(
                run_id, seen.phase, seen.reason, exit_code=seen.exit_code, message=seen.message
            )
        )
        if seen.give_up and job is not None:
            self._delete(run_id, seen.message or "cannot progress")

    def _delete(self, run_id: int, why: str) -> None:
        if run_id in self.deleting:
            return
        self.deleting.add(run_id)
        self._delete_job(run_id, why)

    def _job_gone(self, run_id: int, job: Json) -> None:
        self.deleting.discard(run_id)
        if self._holding:
            return
        if run_id in self.cleaning:
            self._forget_if_gone(run_id)
            return
        last = self._stream.phase_of(run_id)
        if last is not None and not last.is_terminal:
            if run_id in self.killed:
                self._publish(
                    RunEvent.now(
                        run_id,
                        Phase.KILLED,
                        Reason.KILLED,
                        message="the run's Job was deleted on request",
                    )
                )
            else:
                self._publish(
                    RunEvent.now(
                        run_id,
                        Phase.FAILED,
                        Reason.LOST,
                        message="the run's Job was deleted before it finished",
                    )
                )
        if run_id in self.ended:
            self.vanished[run_id] = task_id_of(job)

    def _pods_done(self, run_id: int) -> bool:
        """No pod of the run can start a container any more: none left, or all ended."""
        return all(
            (pod.get("status") or {}).get("phase") in _ENDED_POD_PHASES
            for pod in self.pods.get(run_id, {}).values()
        )

    def _publish(self, event: RunEvent) -> None:
        if self._stream.publish(event) and event.phase.is_terminal:
            self.ended[event.run_id] = event

    def _forget_if_gone(self, run_id: int) -> None:
        if run_id in self._remove_files and self._pods_done(run_id):
            self._remove_files.pop(run_id)()
        if run_id in self.jobs or self.pods.get(run_id):
            return
        self.workloads.pop(run_id, None)
        for memory in (self.cleaning, self.killed, self.deleting):
            memory.discard(run_id)
        self.ended.pop(run_id, None)
        self.vanished.pop(run_id, None)
        self._stream.forget(run_id)
