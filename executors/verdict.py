"""What a runtime's own objects say about a run: one :class:`Verdict`, for every executor.

Each executor reads its runtime differently (a podman container's state, apptainer's
record files, a Kubernetes Job and its pods) but concludes the same thing: the run's
phase, and for a terminal phase the reason, exit code and message that go with it. The
pure functions that judge (``podman.containers.phase_of``, ``apptainer.records.phase_of``,
``kubernetes.observe.observe``) return a ``Verdict``; the executor publishes it as a
:class:`~executors.spec.RunEvent` with :meth:`Verdict.event`.
"""

from __future__ import annotations

from typing import NamedTuple

from executors.spec import Phase, Reason, RunEvent


class Verdict(NamedTuple):
    """A run's phase with the reason, exit code and message that go with it."""

    phase: Phase
    reason: Reason | None = None
    exit_code: int | None = None
    message: str = ""
    #: The run can never progress (e.g. its image cannot be pulled): the executor removes
    #: its runtime object rather than leaving the runtime to retry forever.
    give_up: bool = False

    def event(self, run_id: int) -> RunEvent:
        """This verdict as the event that reports it, stamped now."""
        return RunEvent.now(
            run_id, self.phase, self.reason, exit_code=self.exit_code, message=self.message
        )


#: The runtime has the run's object but its container does not run yet.
STARTING = Verdict(Phase.STARTING)
