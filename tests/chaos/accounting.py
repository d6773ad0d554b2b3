"""The campaign's verdict, from the server's records and the runtime's own.

Nothing here trusts the node's word. The server says what each run ended as (status,
result, ``finished_at``) and which tasks a central run created; the runtime says how many
of its objects each run got: podman's event log the containers (``podman events``,
``create`` events by the run-id label, since the campaign began), on Kubernetes a watch
the Jobs and pods (their UIDs by the run-id label); the task directory and the runtime's
listing (``podman ps``; the node's Jobs, pods, Secrets and NetworkPolicies after ``helm
uninstall``) say what is left behind. The node's own log is read for one thing only: how
many times it reported a run finished (``run.finished`` events), so a result uploaded
twice shows.

Definitions (per run of the campaign's tasks and of the subtasks central runs created):

* **lost**: ended, but not as its kind must (e.g. ``unknown error`` instead of
  ``completed``, or completed without the expected result);
* **duplicated**: more than one container (Job, pod) created for it, reported finished
  more than once, or (central runs) more than one subtask created;
* **stuck**: not ended when the campaign's settling time ran out;
* **left behind**: containers (Jobs, pods, Secrets, run NetworkPolicies) still there, or
  run directories (with the decrypted input) still on disk, after the node stopped.

Counted apart, and not a failure of the campaign: a central run that ``crashed`` because
the node's proxy was down while the node was (a ``ConnectionError`` or, on Kubernetes, a
``ConnectTimeout`` to the proxy in its log). The vantage6 algorithm client retries most
calls on a connection error, but not all (``task.create`` first asks ``blobstream/status``
with a bare ``requests.get``); the node reports that crash truthfully and cannot undo it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.server.models import RunStatus
from tests.chaos.workload import A_COUNT, A_SUM, PlannedTask


def is_finished(status: str) -> bool:
    try:
        return RunStatus(status).is_finished
    except ValueError:
        return False


@dataclass
class Faults:
    node_kills: int = 0
    server_restarts: int = 0
    podman_restarts: int = 0
    #: The node deployed by the Helm chart: its pod force-deleted (grace period 0).
    node_pod_deletions: int = 0
    runtime: str = "podman"


@dataclass
class Verdict:
    faults: Faults
    runs: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)
    proxy_outage: list[str] = field(default_factory=list)
    cut_off_posts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck or self.left_behind)

    def table(self) -> str:
        if self.faults.runtime == "kubernetes":
            rows = [
                ("faults: node pod force-deletions", self.faults.node_pod_deletions),
                ("faults: server restarts", self.faults.server_restarts),
            ]
        else:
            rows = [
                ("faults: node SIGKILLs", self.faults.node_kills),
                ("faults: server restarts", self.faults.server_restarts),
                ("faults: podman service restarts", self.faults.podman_restarts),
            ]
        rows += [
            ("runs", self.runs),
            ("lost", len(self.lost)),
            ("duplicated", len(self.duplicated)),
            ("stuck", len(self.stuck)),
            ("left behind", len(self.left_behind)),
            ("(central crashed: proxy down, not retried)", len(self.proxy_outage)),
            ("(subtask sent again after a cut-off POST)", len(self.cut_off_posts)),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'':<{width}} | count |", f"| {'-' * width} | ----: |"]
        lines += [f"| {name:<{width}} | {value:>5} |" for name, value in rows]
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.by_status.items()))
        lines.append(f"\nrun statuses: {statuses}")
        for title, items in (
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("stuck", self.stuck),
            ("left behind", self.left_behind),
            ("proxy outage", self.proxy_outage),
            ("cut-off POST", self.cut_off_posts),
        ):
            for item in items:
                lines.append(f"  {title}: {item}")
        return "\n".join(lines)


def decoded_result(run: dict[str, Any]) -> Any:
    """An unencrypted collaboration's result: base64 of the algorithm's JSON output."""
    raw = run.get("result")
    if not raw:
        return None
    try:
        return json.loads(base64.b64decode(raw))
    except (binascii.Error, ValueError):
        return raw


def parent_of(task: dict[str, Any]) -> int | None:
    parent = task.get("parent")
    if isinstance(parent, dict):
        return int(parent["id"]) if parent.get("id") is not None else None
    if parent is not None:
        return int(parent)
    value = task.get("parent_id")
    return int(value) if value is not None else None


def task_of(run: dict[str, Any]) -> int:
    task = run["task"]
    return int(task["id"]) if isinstance(task, dict) else int(task)


def _proxy_unreachable(log: str) -> bool:
    """The algorithm died of a connection error to the node's proxy (the node was down).

    On podman the proxy's port refuses or drops the connection; on Kubernetes a connection
    to the proxy Service may also time out (its ClusterIP still leads to the deleted node
    pod's address until the endpoints are updated, and nothing answers there)."""
    refused = "requests.exceptions.ConnectionError" in log and (
        "Connection refused" in log or "RemoteDisconnected" in log
    )
    timed_out = "requests.exceptions.ConnectTimeout" in log and "timed out" in log
    return refused or timed_out


@dataclass
class NodeLog:
    """What the node's log says, per run, over all its lives."""

    reports: Counter[int] = field(default_factory=Counter)  # ``run.finished`` events
    subtasks_answered: Counter[int] = field(default_factory=Counter)  # proxied POST task 201


def read_node_log(log_path: Path) -> NodeLog:
    counts = NodeLog()
    if not log_path.exists():
        return counts
    for line in log_path.read_text(errors="replace").splitlines():
        if '"run.finished"' not in line and '"proxy.request"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        run_id = event.get("run_id")
        if run_id is None:
            continue
        if event.get("event") == "run.finished":
            counts.reports[int(run_id)] += 1
        elif (event.get("method"), event.get("route"), event.get("status")) == (
            "POST",
            "/task",
            201,
        ):
            counts.subtasks_answered[int(run_id)] += 1
    return counts


def judge(
    *,
    faults: Faults,
    planned: list[PlannedTask],
    tasks: Iterable[dict[str, Any]],
    runs: Iterable[dict[str, Any]],
    creates: dict[str, Counter[int]],
    node_log: NodeLog,
    objects_left: list[str],
    run_dirs_left: list[Path],
) -> Verdict:
    verdict = Verdict(faults)
    runs_of: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        runs_of.setdefault(task_of(run), []).append(run)
    children: dict[int, list[int]] = {}
    for server_task in tasks:
        parent = parent_of(server_task)
        if parent is not None:
            children.setdefault(parent, []).append(int(server_task["id"]))

    def check(task_id: int, what: str, status: str, result: Any) -> None:
        task_runs = runs_of.get(task_id, [])
        if len(task_runs) != 1:
            verdict.lost.append(f"{what} task {task_id}: {len(task_runs)} runs at the server")
            return
        (run,) = task_runs
        verdict.runs += 1
        run_id = int(run["id"])
        label = f"{what} run {run_id} (task {task_id})"
        verdict.by_status[run["status"]] += 1
        if not is_finished(run["status"]) or not run.get("finished_at"):
            verdict.stuck.append(
                f"{label}: status {run['status']!r}, started_at {run.get('started_at')}"
            )
        elif run["status"] != status:
            log = run.get("log") or ""
            last = log.strip().splitlines()[-1:] or [""]
            problem = f"{label}: {run['status']!r}, expected {status!r}: {last[0]}"
            if run["status"] == "crashed" and _proxy_unreachable(log):
                verdict.proxy_outage.append(problem)
            else:
                verdict.lost.append(problem)
        elif result is not None and decoded_result(run) != result:
            verdict.lost.append(f"{label}: result {decoded_result(run)!r}, expected {result!r}")
        for what, counts in creates.items():
            if counts[run_id] > 1:
                verdict.duplicated.append(f"{label}: {counts[run_id]} {what} created")
        if node_log.reports[run_id] > 1:
            verdict.duplicated.append(
                f"{label}: reported finished {node_log.reports[run_id]} times"
            )

    for task in planned:
        if task.task_id is None:
            continue
        check(task.task_id, task.kind, task.expected_status, task.expected_result)
        if task.kind != "central":
            continue
        subtasks = children.get(task.task_id, [])
        task.subtask_ids = subtasks
        if len(subtasks) > 1:
            central_runs = runs_of.get(task.task_id, [])
            answered = sum(node_log.subtasks_answered[int(r["id"])] for r in central_runs)
            problem = (
                f"central task {task.task_id}: {len(subtasks)} subtasks, "
                f"{answered} answered by the proxy"
            )
            if answered <= 1:
                verdict.cut_off_posts.append(problem)
            else:
                verdict.duplicated.append(problem)
        for subtask in subtasks:
            check(subtask, "subtask", "completed", {"sum": A_SUM, "count": A_COUNT})
        if not subtasks and runs_of.get(task.task_id, [{}])[0].get("status") == "completed":
            verdict.lost.append(f"central task {task.task_id}: completed without a subtask")
    verdict.left_behind += list(objects_left)
    verdict.left_behind += [
        f"run directory {path}" + (" with its input" if (path / "input").exists() else "")
        for path in run_dirs_left
    ]
    return verdict
