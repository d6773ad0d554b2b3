"""A run's output is hostile: no executor lets it point the node elsewhere or exhaust it.

The attacks of issue 13, as a run would make them (podman, apptainer's fake: the probe
algorithm itself; kwok: the harness, see its docstring): replace the output file with a
link to a secret of the node's (``ln -sf``), and leave a multi-gigabyte sparse output.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from executors.base import Executor
from executors.outputs import OutputLimits
from executors.spec import Phase, Reason, RunOutput
from tests.conformance.harness import Behaviour, ExecutorUnderTest
from tests.conformance.test_executor import require

pytestmark = [pytest.mark.slow]

GIB = 1024**3
SECRET = "FEDNODE_API_KEY=the-node-s-own-secret"


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (``clear_refs`` 5) and return the current RSS (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


async def collect_unread(executor: Executor, run_id: int, *, size: int) -> RunOutput:
    """Collect a run that left a ``size``-byte sparse output: it is refused with both sizes
    and the setting, and collecting it costs the node (this process) no memory to speak of."""
    before = reset_peak_rss()
    collected = await executor.collect(run_id)
    growth = peak_rss() - before
    limit = OutputLimits().max_output_bytes
    assert collected.output == b""
    assert collected.refused == (
        f"the run's output is {size} bytes, over the node's limit of {limit} "
        "(setting max_output_bytes)"
    )
    print(f"peak RSS growth while collecting a {size}-byte sparse output: {growth} bytes")
    assert growth < 32 * 1024 * 1024, growth
    return collected


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB$", Path("/proc/self/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1))


async def test_a_run_that_links_its_output_to_a_node_secret_fails_and_the_secret_is_not_read(
    executor_under_test: ExecutorUnderTest, tmp_path: Path
) -> None:
    require(executor_under_test, "output-files")
    executor, events = executor_under_test.executor, executor_under_test.events
    harness = executor_under_test.harness
    secret = tmp_path / "node-secret"  # a file only the node's side can read
    secret.write_text(SECRET)

    await executor.start(harness.spec(1, Behaviour(output="x", output_link=str(secret))))
    end = await events.terminal(1, timeout=harness.slack)
    collected = await executor.collect(1)

    assert SECRET.encode() not in collected.output
    assert collected.output in (b"", b"x")  # what the probe wrote, never the link's target
    if end.phase is Phase.FAILED:
        # The runtime let no run replace its mounted output: the probe says why it failed.
        assert (end.reason, end.exit_code) == (Reason.CRASHED, 17)
        assert "cannot replace the output with a link" in collected.log
    else:
        # A run that could (kwok's stand-in): the node refuses to follow the link.
        assert (
            collected.refused
            == "the run's output file is a symbolic link; the node does not read it"
        )


async def test_a_multi_gigabyte_sparse_output_is_refused_unread_and_the_next_run_completes(
    executor_under_test: ExecutorUnderTest,
) -> None:
    require(executor_under_test, "output-files")
    executor, events = executor_under_test.executor, executor_under_test.events
    harness = executor_under_test.harness
    size = 3 * GIB

    await executor.start(harness.spec(1, Behaviour(output="x", output_size=size)))
    end = await events.terminal(1, timeout=harness.slack)
    await collect_unread(executor, 1, size=size)

    assert end.phase is Phase.SUCCEEDED  # the run itself did nothing wrong to its runtime
    await executor.start(harness.spec(2, Behaviour(output="next")))
    assert (await events.terminal(2, timeout=harness.slack)).phase is Phase.SUCCEEDED
    assert (await executor.collect(2)).output == b"next"
