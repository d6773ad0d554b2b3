"""The one backoff: pauses grow from ``first`` to ``cap``, jittered, and start over on reset."""

from __future__ import annotations

import time

import pytest

from common.backoff import Backoff


def test_each_pause_lies_between_half_and_all_of_a_doubling_step_capped() -> None:
    backoff = Backoff(first=0.1, cap=1.0)

    delays = [backoff.next_delay() for _ in range(8)]

    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step


def test_pauses_of_many_loops_are_spread_not_in_lockstep() -> None:
    delays = {Backoff(first=1.0, cap=8.0).next_delay() for _ in range(50)}

    assert len(delays) > 40


def test_reset_starts_again_from_the_shortest_pause() -> None:
    backoff = Backoff(first=0.1, cap=10.0)
    for _ in range(6):
        backoff.next_delay()

    backoff.reset()

    assert backoff.next_delay() <= 0.1


async def test_pause_sleeps_the_delay_it_returns() -> None:
    backoff = Backoff(first=0.04, cap=0.04)
    began = time.monotonic()

    slept = await backoff.pause()

    assert 0.02 <= slept <= 0.04
    assert time.monotonic() - began >= slept - 0.005


def test_a_cap_below_the_first_pause_is_refused() -> None:
    with pytest.raises(ValueError, match="first <= cap"):
        Backoff(first=2.0, cap=1.0)
