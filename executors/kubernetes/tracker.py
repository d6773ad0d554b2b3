"""Joins what the two informers see into runs, and publishes each run's phase.

The Job informer and the Pod informer each call one handler here, in their own stream's
order. :class:`RunTracker` files every object under its run id (the ``fednode.io/run-id``
label), asks :func:`~executors.kubernetes.observe.observe` what the run's objects say now,
and publishes that to the :class:`~executors.events.RunEventStream`, which lets each phase
through once and never backwards. So the tracker is level-triggered: it does not matter
which stream is ahead, nor whether a change came as a watch event or from a relist.

What observation alone cannot tell is what *we* did: a Job that vanishes was ``killed`` if
the executor deleted it on request, and is ``lost`` otherwise (unless the run had ended
already). After ``cleanup`` the run is dropped from memory once its objects are gone from
both caches. No I/O happens here; giving up on a run that can never progress (an image
that cannot be pulled) is delegated to the executor through a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from executors.base import LABEL_RUN, LABEL_TASK
from executors.events import RunEventStream
from executors.kubernetes.informer import Change
from executors.kubernetes.manifests import ANNOTATION_TASK, trace_context_of
from executors.kubernetes.observe import Observation, newest, observe
from executors.spec import Phase, Reason, RunEvent, RunState

Json = dict[str, Any]
GiveUp = Callable[[int, Observation], None]


def run_id_of(obj: Json) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_RUN)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class RunTracker:
    """The executor's view of its runs, built only from the informers' objects."""

    def __init__(self, *, stream: RunEventStream, backoff_limit: int, give_up: GiveUp) -> None:
        self._stream = stream
        self._backoff_limit = backoff_limit
        self._give_up = give_up
        self.jobs: dict[int, Json] = {}
        self.pods: dict[int, dict[str, Json]] = {}
        #: Runs whose Job the executor deleted on request (-> ``killed``, not ``lost``).
        self.killed: set[int] = set()
        #: Runs whose Job the executor deleted because they could never progress.
        self.given_up: set[int] = set()
        #: Runs being cleaned up: no more events; forgotten when their objects are gone.
        self.cleaning: set[int] = set()

    # -- informer handlers ---------------------------------------------------------------

    def on_job(self, change: Change, job: Json) -> None:
        run_id = run_id_of(job)
        if run_id is None:
            return
        if change is Change.DELETED:
            self.jobs.pop(run_id, None)
            self._job_gone(run_id)
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

    # -- what the executor asks -----------------------------------------------------------

    def pod_name(self, run_id: int) -> str | None:
        pod = newest(list(self.pods.get(run_id, {}).values()))
        return None if pod is None else str(pod["metadata"]["name"])

    def observation(self, run_id: int) -> Observation:
        return observe(self.jobs.get(run_id), list(self.pods.get(run_id, {}).values()),
                       backoff_limit=self._backoff_limit)

    def states(self) -> list[RunState]:
        """Every run that has a Job, as its objects show it now."""
        states = []
        for run_id, job in sorted(self.jobs.items()):
            seen = self.observation(run_id)
            metadata = job.get("metadata", {})
            labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
            task = labels.get(LABEL_TASK) or annotations.get(ANNOTATION_TASK) or "0"
            states.append(RunState(
                run_id=run_id,
                task_id=int(task),
                phase=seen.phase,
                reason=seen.reason,
                exit_code=seen.exit_code,
                trace_context=trace_context_of(annotations),
            ))
        return states

    def forget_when_gone(self, run_id: int) -> None:
        """After cleanup: publish nothing more; drop the run once its objects are gone."""
        self.cleaning.add(run_id)
        self._forget_if_gone(run_id)

    # -- decisions ------------------------------------------------------------------------

    def _update(self, run_id: int) -> None:
        if run_id in self.cleaning:
            self._forget_if_gone(run_id)
            return
        seen = self.observation(run_id)
        self._stream.publish(RunEvent.now(run_id, seen.phase, seen.reason,
                                          exit_code=seen.exit_code, message=seen.message))
        if seen.give_up and run_id in self.jobs and run_id not in self.given_up:
            self.given_up.add(run_id)
            self._give_up(run_id, seen)

    def _job_gone(self, run_id: int) -> None:
        if run_id in self.cleaning:
            self._forget_if_gone(run_id)
            return
        last = self._stream.phase_of(run_id)
        if last is not None and not last.is_terminal:
            if run_id in self.killed:
                event = RunEvent.now(run_id, Phase.KILLED, Reason.KILLED,
                                     message="the run's Job was deleted on request")
            else:
                event = RunEvent.now(run_id, Phase.FAILED, Reason.LOST,
                                     message="the run's Job was deleted before it finished")
            self._stream.publish(event)
        self.killed.discard(run_id)
        self.given_up.discard(run_id)

    def _forget_if_gone(self, run_id: int) -> None:
        if run_id in self.jobs or self.pods.get(run_id):
            return
        self.cleaning.discard(run_id)
        self.killed.discard(run_id)
        self.given_up.discard(run_id)
        self._stream.forget(run_id)
