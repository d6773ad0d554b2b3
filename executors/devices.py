"""Which of the host's GPUs each run holds, on runtimes that hand devices out themselves.

podman (CDI device names) and apptainer (device indexes behind ``CUDA_VISIBLE_DEVICES``)
give a run devices of the node's own host, so the node must choose them: two runs that
each ask for one GPU get two different GPUs, never "the first one" twice. (On Kubernetes
the device plugin on each node does this; the executor only asks for a count.)

:class:`DeviceAllocator` keeps the choice in memory and rebuilds it from the runtime's own
records: the executor puts a run's devices in a label on the run (:data:`LABEL_DEVICES`,
on the container or in the run's record), and every run it lists or hears about goes
through :meth:`DeviceAllocator.observe` — a run that has not ended holds its devices, one
that ended gives them back. So a restarted node knows which devices are busy before it
starts anything, without a file of its own.

A run that asks for more devices (of its type) than the executor has at all cannot ever
start: :meth:`DeviceAllocator.refusal` says why, and the run ends ``not allowed``. A run
that asks for more than are free now waits (as ``starting``) until runs end and give
theirs back, in no particular order; a kill while it waits ends the wait
(:meth:`DeviceAllocator.withdraw`). Free devices are handed out least recently used
first, so the wear spreads and a device that just failed a run is not the next one's.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from executors.events import RunEventStream
from executors.spec import Phase, Reason, RunEvent, RunSpec

#: The label (container label, run record label) naming the devices a run holds.
LABEL_DEVICES = "fednode.io/gpu-devices"


class GpuDevice(BaseModel):
    """One device the executor may give a run; ``type`` matches a profile's ``gpu_type``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: podman: a CDI device name (``nvidia.com/gpu=0``; a bare ``0`` gets the executor's
    #: ``cdi_gpu_kind``); apptainer: an index or UUID for ``CUDA_VISIBLE_DEVICES``.
    device: str
    type: str | None = None


def _device_entry(value: Any) -> Any:
    return {"device": value} if isinstance(value, str | int) else value


#: A settings entry: ``"nvidia.com/gpu=0"`` or ``{device: ..., type: a100}``.
DeviceEntry = Annotated[GpuDevice, BeforeValidator(_device_entry)]


def devices_label(devices: Sequence[str]) -> dict[str, str]:
    """The label that records ``devices`` with a run (none when it holds none)."""
    return {LABEL_DEVICES: ",".join(devices)} if devices else {}


def devices_of(labels: Mapping[str, str]) -> tuple[str, ...]:
    """The devices a run's labels say it holds."""
    text = labels.get(LABEL_DEVICES, "")
    return tuple(name for name in text.split(",") if name)


class DeviceAllocator:
    """Distinct devices per run, over the executor's configured ones; see the module."""

    def __init__(self, devices: Iterable[GpuDevice]) -> None:
        self._devices = {device.device: device for device in devices}
        self._held: dict[int, tuple[str, ...]] = {}
        self._withdrawn: set[int] = set()
        self._changed = asyncio.Event()
        self._clock = itertools.count(1)
        self._last_used = dict.fromkeys(self._devices, 0)

    @property
    def held(self) -> Mapping[int, tuple[str, ...]]:
        """The devices each run holds now."""
        return dict(self._held)

    def refusal(self, count: int, gpu_type: str | None) -> str | None:
        """Why a run asking for ``count`` devices of ``gpu_type`` can never start here."""
        have = self._matching(gpu_type)
        if count <= len(have):
            return None
        kind = f" of type {gpu_type!r}" if gpu_type else ""
        return (
            f"the run asks for {count} GPU(s){kind}; this executor has {len(have)} "
            f"(executor.gpu_devices)"
        )

    async def take_for(
        self, spec: RunSpec, *, stream: RunEventStream, log: Any
    ) -> tuple[str, ...] | None:
        """The devices of ``spec``'s run (none if it asks for none), waiting while too few
        are free; ``None`` when the run ended instead, its end published on ``stream``:
        ``not allowed`` (it can never have them here) or ``killed`` (while it waited)."""
        run_id, wanted = spec.run_id, spec.resources
        if wanted.gpus == 0:
            return ()
        refusal = self.refusal(wanted.gpus, wanted.gpu_type)
        if refusal is not None:
            log.warning("run.gpus_refused", reason=refusal)
            stream.fail(run_id, Reason.NOT_ALLOWED, refusal)
            return None
        devices = await self.take(run_id, wanted.gpus, wanted.gpu_type)
        if devices is None:
            log.info("run.killed_waiting_for_gpus")
            stream.publish(
                RunEvent.now(run_id, Phase.KILLED, Reason.KILLED, message="killed before start")
            )
            return None
        log.info("run.gpus_taken", devices=list(devices))
        return devices

    async def take(self, run_id: int, count: int, gpu_type: str | None) -> tuple[str, ...] | None:
        """``count`` free devices of ``gpu_type`` for ``run_id``, waiting until there are.

        ``None``: the run was withdrawn (killed) while it waited. A run that already holds
        devices gets the same ones again. Check :meth:`refusal` first: a request that can
        never be met waits for ever.
        """
        while run_id not in self._held:
            if run_id in self._withdrawn:
                self._withdrawn.discard(run_id)
                return None
            free = self._free(gpu_type)
            if len(free) >= count:
                chosen = tuple(sorted(free, key=self._last_used.__getitem__)[:count])
                self._hold(run_id, chosen)
                break
            changed = self._changed
            await changed.wait()
        return self._held[run_id]

    def withdraw(self, run_id: int) -> None:
        """A run waiting in :meth:`take` was killed: end its wait with ``None``."""
        if run_id not in self._held:
            self._withdrawn.add(run_id)
            self._wake()

    def observe(self, run_id: int, labels: Mapping[str, str], *, ended: bool) -> None:
        """What the runtime says of a run: ended → its devices are free; else it holds
        the ones its labels name (after a restart: the allocator learns them here)."""
        if ended:
            self.release(run_id)
            return
        devices = tuple(name for name in devices_of(labels) if name in self._devices)
        if devices and run_id not in self._held:
            self._hold(run_id, devices)

    def release(self, run_id: int) -> None:
        """The run no longer holds devices (it ended, or was never started)."""
        self._withdrawn.discard(run_id)
        if self._held.pop(run_id, None) is not None:
            self._wake()

    def _hold(self, run_id: int, devices: tuple[str, ...]) -> None:
        self._held[run_id] = devices
        now = next(self._clock)
        for name in devices:
            self._last_used[name] = now

    def _matching(self, gpu_type: str | None) -> list[str]:
        return [
            name
            for name, device in self._devices.items()
            if gpu_type is None or device.type == gpu_type
        ]

    def _free(self, gpu_type: str | None) -> list[str]:
        busy = {name for devices in self._held.values() for name in devices}
        return [name for name in self._matching(gpu_type) if name not in busy]

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
