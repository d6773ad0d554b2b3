"""The gpu-check verdict: each run sees exactly its GPUs, none shared, all succeeded."""

from __future__ import annotations

from executors.spec import Phase
from node.gpu_check import RunSeen, gpus_listed, judge

SMI = """GPU 0: NVIDIA H200 (UUID: GPU-aaaa)
  MIG 1g.18gb     Device  0: (UUID: MIG-bbbb)
GPU 1: NVIDIA H200 (UUID: GPU-cccc)
"""


def seen(run_id: int, *uuids: str, phase: Phase = Phase.SUCCEEDED) -> RunSeen:
    return RunSeen(run_id, phase, uuids, "")


def test_nvidia_smi_lines_name_the_gpus_and_mig_lines_are_not_gpus() -> None:
    assert gpus_listed(SMI) == ("GPU-aaaa", "GPU-cccc")
    assert gpus_listed("NVIDIA-SMI has failed") == ()


def test_runs_that_each_see_their_own_gpus_pass() -> None:
    verdict = judge([seen(1, "GPU-a"), seen(2, "GPU-b")], gpus=1)

    assert verdict.passed
    assert verdict.lines[0] == "ok   run 1: sees exactly its 1 GPU(s): GPU-a"


def test_a_run_seeing_more_a_shared_gpu_or_a_failed_run_fails_the_check() -> None:
    more = judge([seen(1, "GPU-a", "GPU-b")], gpus=1)
    shared = judge([seen(1, "GPU-a"), seen(2, "GPU-a")], gpus=1)
    failed = judge([seen(1, phase=Phase.FAILED)], gpus=1)

    assert not more.passed and "given 1 GPU(s), sees 2" in more.lines[0]
    assert not shared.passed and "GPU-a (also run 1)" in shared.lines[1]
    assert not failed.passed and "ended failed" in failed.lines[0]
