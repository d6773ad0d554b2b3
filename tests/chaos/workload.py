"""The task stream a campaign sends, and what each task must end as.

Every task is for organization A only (the one node under test). Kinds:

* ``short``   the probe algorithm, sleeps 0.2 s, writes ``{"i": n}``: ``completed`` with it;
* ``slow``    the same, sleeping 4-15 s, so node kills land while it runs;
* ``crash``   exits 3 after a moment: ``crashed``;
* ``kill``    sleeps 300 s and is killed by the user (the server's ``kill/task``) a few
  seconds after it was created: ``killed by user``;
* ``central`` the ``average`` algorithm's ``central_average``: creates one
  ``partial_average`` subtask through the node's proxy and waits for it: ``completed``
  with the average of organization A's ages (40.0); the subtask's run ``completed`` with
  ``{"sum": 400, "count": 10}``.

The stream is drawn up front from the campaign's seeded RNG.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

#: Kind and its weight in the stream.
MIX: dict[str, int] = {"short": 35, "slow": 25, "crash": 12, "kill": 13, "central": 15}

#: Organization A's data (algorithms/data/employees_a.csv): 10 people, ages summing to 400.
A_SUM, A_COUNT = 400, 10


@dataclass
class PlannedTask:
    """One task of the stream and what it must end as."""

    index: int
    kind: str
    input: dict[str, Any]
    image: str
    expected_status: str
    expected_result: Any = None
    kill_after: float | None = None  # seconds after creation, for ``kill``
    task_id: int | None = None
    subtask_ids: list[int] = field(default_factory=list)


def plan(
    rng: random.Random, *, tasks: int, probe_image: str, average_image: str, org_id: int
) -> list[PlannedTask]:
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=tasks)
    planned = []
    for index, kind in enumerate(kinds):
        output = json.dumps({"i": index})
        if kind in ("short", "slow"):
            sleep = 0.2 if kind == "short" else round(rng.uniform(4, 15), 1)
            task = PlannedTask(
                index,
                kind,
                {"sleep": sleep, "output": output},
                probe_image,
                "completed",
                {"i": index},
            )
        elif kind == "crash":
            task = PlannedTask(index, kind, {"sleep": 0.5, "exit_code": 3}, probe_image, "crashed")
        elif kind == "kill":
            task = PlannedTask(
                index,
                kind,
                {"sleep": 300, "output": output},
                probe_image,
                "killed by user",
                kill_after=round(rng.uniform(1, 10), 1),
            )
        else:
            task = PlannedTask(
                index,
                kind,
                {
                    "method": "central_average",
                    "kwargs": {"column_name": "age", "organizations": [org_id]},
                },
                average_image,
                "completed",
                {"average": A_SUM / A_COUNT, "sum": A_SUM, "count": A_COUNT, "organizations": 1},
            )
        planned.append(task)
    return planned
