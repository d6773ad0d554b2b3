"""The device allocator: distinct GPUs per run, waits while too few are free, rebuilt
from the runs' labels after a restart."""

from __future__ import annotations

import asyncio

from executors.devices import DeviceAllocator, GpuDevice, devices_label, devices_of

GPUS = [GpuDevice(device=f"vendor.example/gpu={n}") for n in range(3)]


async def test_concurrent_runs_get_distinct_devices_not_always_the_first() -> None:
    allocator = DeviceAllocator(GPUS)

    first = await allocator.take(1, 1, None)
    second = await allocator.take(2, 2, None)

    assert first is not None and second is not None
    assert set(first).isdisjoint(second)
    assert len(set(first) | set(second)) == 3


async def test_a_released_device_is_handed_out_after_those_not_used_lately() -> None:
    allocator = DeviceAllocator(GPUS)
    first = await allocator.take(1, 1, None)
    allocator.release(1)

    after = await allocator.take(2, 1, None)

    assert after is not None and after != first


async def test_a_run_waits_until_a_run_ends_and_a_kill_ends_the_wait() -> None:
    allocator = DeviceAllocator(GPUS[:1])
    held = await allocator.take(1, 1, None)
    waiting = asyncio.ensure_future(allocator.take(2, 1, None))
    killed = asyncio.ensure_future(allocator.take(3, 1, None))
    await asyncio.sleep(0.01)
    assert not waiting.done()

    allocator.withdraw(3)
    assert await killed is None
    allocator.observe(1, devices_label(held or ()), ended=True)

    assert await asyncio.wait_for(waiting, 1) == held


async def test_after_a_restart_the_running_runs_labels_say_which_devices_are_busy() -> None:
    allocator = DeviceAllocator(GPUS)
    allocator.observe(7, devices_label(["vendor.example/gpu=1"]), ended=False)
    allocator.observe(8, devices_label(["vendor.example/gpu=2"]), ended=True)
    allocator.observe(9, devices_label(["not.configured/gpu=9"]), ended=False)

    taken = await allocator.take(10, 2, None)

    assert taken is not None and "vendor.example/gpu=1" not in taken
    assert allocator.held == {7: ("vendor.example/gpu=1",), 10: taken}


def test_a_request_no_set_of_devices_can_meet_is_refused_with_the_counts() -> None:
    typed = DeviceAllocator([GpuDevice(device="0", type="a100"), GpuDevice(device="1")])

    assert typed.refusal(1, "a100") is None
    assert typed.refusal(2, None) is None
    refusal = typed.refusal(2, "a100")
    assert refusal is not None and "of type 'a100'" in refusal and "has 1" in refusal
    assert devices_of(devices_label(["a", "b"])) == ("a", "b")
