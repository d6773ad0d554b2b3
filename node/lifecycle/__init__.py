"""The run lifecycle: from the server's run to a started container, and back to a result.

Follow one run through the package, one module per step:

1. :mod:`node.lifecycle.lifecycle` — :class:`RunLifecycle`, the façade: consumes the
   server's events (``sync``, ``new_task``, ``kill_containers``) and the executor's run
   events, and hands each run to the part that deals with it;
2. :mod:`node.lifecycle.start` — admit (policies) → decrypt the input → wait for a slot →
   ``started_at`` and a container token → :func:`~node.lifecycle.spec.build_spec` →
   register the token with the proxy → ``executor.start`` → status ``active``;
3. :mod:`node.lifecycle.spec` — the pure step from server run and node config to the
   executor's :class:`~executors.spec.RunSpec`;
4. :mod:`node.lifecycle.finish` — on the run's terminal event: collect output and log →
   encrypt the result for the initiating organization → PATCH result, log, status and
   ``finished_at`` (retried while the server is unreachable) → cleanup; any failure ends
   the run with a status the server understands;
5. :mod:`node.lifecycle.reconcile` — at start-up, claim what the executor already has
   (follow, upload, kill, recover tokens, sweep stray run directories); on ``sync``, adopt
   runs the server says started — follow their container, or start it (once) when the
   node died before it existed or ran.

Beside them: :mod:`node.lifecycle.inflight` (the rebuildable memory of runs in flight,
the slots, the finished ids, the proxy's run table) and :mod:`node.lifecycle.server` (every
call to the server about runs). ``docs/architecture.md`` draws the whole node.
"""

from node.lifecycle.lifecycle import RunLifecycle
from node.lifecycle.server import StatusNotifier
from node.lifecycle.spec import LifecycleConfig, build_spec

__all__ = ["LifecycleConfig", "RunLifecycle", "StatusNotifier", "build_spec"]
