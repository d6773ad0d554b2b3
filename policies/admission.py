"""Admission: may this run start here, and with which resources?

The node asks before it decrypts or starts anything. The answer is a value, never an
exception: :class:`Admitted` with the resources the run gets (defaults filled in, caps
applied), or :class:`Refused` with a reason an operator and a researcher can read; the node
turns a refusal into the server status ``not allowed``.

Rules, as in vantage6: an image must match one of ``allowed_algorithms`` (regular
expressions that must match the WHOLE image reference: ``harbor.example/demo/`` admits
nothing but itself, and a dot matches any character unless escaped, so write
``harbor\\.example/demo/.*``); with ``require_image_digest`` it must also be pinned by
digest (``name@sha256:<64 hex>``: a tag can be moved to other code, a digest cannot); the
task's initiating organization must be in ``allowed_organizations`` and its user in
``allowed_users`` — except that when both lists are set, being in either one is enough
(vantage6's own rule). Empty lists allow all. The databases a task names must be ones the
node has (``known_databases``): a label the node does not know would only fail later, in
the runtime, with a less clear message (or none).

Resources come from the node's **resource profiles**: the first profile whose image
patterns match the WHOLE image reference (the same rule as ``allowed_algorithms``) says
how much CPU, memory, how many GPUs of which type and which deadline the run gets; what a
profile leaves out, and every run no profile matches, gets the node's defaults (GPUs:
``default_gpus``, set by vantage6's ``algorithm_device_requests: {gpu: true}``). The caps
(``max_cpu``, ``max_memory_mb``, ``max_gpus``) are checked on what the run would get, at
each run: a run over a cap is refused with a reason naming the cap and the profile, so an
operator may lower a cap (``max_gpus: 0`` while the GPUs are serviced) without touching
the profiles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field


class ResourceRequest(BaseModel):
    """What a run asks for; ``None`` means "the node's default"."""

    model_config = ConfigDict(frozen=True)

    cpu: float | None = None
    memory_mb: int | None = None
    gpus: int = 0


class ResourceProfile(BaseModel):
    """What the runs of some algorithms get; ``None``: the node's default."""

    model_config = ConfigDict(frozen=True)

    name: str
    #: Regular expressions; the profile applies to an image that one matches as a WHOLE.
    images: tuple[str, ...]
    cpu: float | None = None
    memory_mb: int | None = None
    gpus: int | None = None
    gpu_type: str | None = None
    deadline_seconds: int | None = None

    def describe(self) -> str:
        """One line for ``fednode status``: what the profile gives."""
        parts = []
        if self.cpu is not None:
            parts.append(f"{self.cpu:g} CPU")
        if self.memory_mb is not None:
            parts.append(f"{self.memory_mb} MB")
        if self.gpus is not None:
            parts.append(f"{self.gpus} GPU" + (f" ({self.gpu_type})" if self.gpu_type else ""))
        if self.deadline_seconds is not None:
            parts.append(f"deadline {self.deadline_seconds} s")
        return ", ".join(parts) or "the defaults"


class ResourcePolicy(BaseModel):
    """Defaults, profiles and caps (mirrors the ``policies.resources`` settings section)."""

    model_config = ConfigDict(frozen=True)

    default_cpu: float = 1.0
    default_memory_mb: int = 1024
    default_gpus: int = 0
    max_cpu: float = 4.0
    max_memory_mb: int = 8192
    max_gpus: int = 0
    profiles: tuple[ResourceProfile, ...] = ()


class AdmissionPolicy(BaseModel):
    """The whole admission policy of a node."""

    model_config = ConfigDict(frozen=True)

    allowed_algorithms: tuple[str, ...] = ()
    require_image_digest: bool = False
    allowed_organizations: tuple[int, ...] = ()
    allowed_users: tuple[int, ...] = ()
    resources: ResourcePolicy = Field(default_factory=ResourcePolicy)
    #: The labels of the node's databases; ``None``: not checked.
    known_databases: tuple[str, ...] | None = None


_T = TypeVar("_T")

#: An image pinned by digest ends in this (the OCI sha256 digest, lower-case hex).
PINNED = re.compile(r"@sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Granted:
    """The resources an admitted run gets, and the profile they came from (if any)."""

    cpu: float
    memory_mb: int
    gpus: int
    gpu_type: str | None = None
    #: ``None``: the node's default deadline.
    deadline_seconds: int | None = None
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    resources: Granted


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


Decision = Admitted | Refused


class Admission:
    """Decides on runs; compiled once from the policy."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self._policy = policy
        self._images = [re.compile(pattern) for pattern in policy.allowed_algorithms]
        self._profiles = [
            (profile, [re.compile(pattern) for pattern in profile.images])
            for profile in policy.resources.profiles
        ]

    def decide(
        self,
        *,
        image: str,
        organization_id: int | None,
        user_id: int | None,
        request: ResourceRequest | None = None,
        databases: Sequence[str] = (),
    ) -> Decision:
        refused = (
            self._check_image(image)
            or self._check_initiator(organization_id, user_id)
            or self._check_databases(databases)
        )
        if refused is not None:
            return refused
        return self._grant(image, request or ResourceRequest())

    def profile_for(self, image: str) -> ResourceProfile | None:
        """The first profile one of whose patterns matches the whole of ``image``."""
        for profile, patterns in self._profiles:
            if any(rx.fullmatch(image) for rx in patterns):
                return profile
        return None

    def _check_image(self, image: str) -> Refused | None:
        if self._images and not any(rx.fullmatch(image) for rx in self._images):
            return Refused(f"image {image!r} matches none of policies.allowed_algorithms")
        if self._policy.require_image_digest and PINNED.search(image) is None:
            return Refused(
                f"image {image!r} is not pinned by digest, and policies.require_image_digest "
                "asks for 'name@sha256:<64 hex digits>'"
            )
        return None

    def _check_databases(self, labels: Sequence[str]) -> Refused | None:
        known = self._policy.known_databases
        if known is None:
            return None
        unknown = [label for label in labels if label not in known]
        if not unknown:
            return None
        listed = ", ".join(repr(label[:64]) for label in unknown[:5])
        has = ", ".join(known) if known else "none"
        return Refused(f"the task names database(s) {listed} that this node does not have ({has})")

    def _check_initiator(self, organization_id: int | None, user_id: int | None) -> Refused | None:
        orgs, users = self._policy.allowed_organizations, self._policy.allowed_users
        org_ok = organization_id in orgs if orgs else None
        user_ok = user_id in users if users else None
        if org_ok is None and user_ok is None:
            return None
        if org_ok or user_ok:
            return None
        if user_ok is None:
            return Refused(f"organization {organization_id} may not send tasks to this node")
        if org_ok is None:
            return Refused(f"user {user_id} may not send tasks to this node")
        return Refused(
            f"neither organization {organization_id} nor user {user_id} may send tasks to this node"
        )

    def _grant(self, image: str, request: ResourceRequest) -> Decision:
        limits = self._policy.resources
        profile = self.profile_for(image)
        given = profile or ResourceProfile(name="", images=())
        cpu = _first(request.cpu, given.cpu, limits.default_cpu)
        memory = _first(request.memory_mb, given.memory_mb, limits.default_memory_mb)
        gpus = _first(request.gpus or None, given.gpus, limits.default_gpus)
        source = f" (resource profile {profile.name!r})" if profile else ""
        if gpus > limits.max_gpus:
            return Refused(
                f"the run would get {gpus} GPU(s){source}; policies.resources.max_gpus "
                f"allows at most {limits.max_gpus}"
            )
        if cpu > limits.max_cpu:
            return Refused(
                f"the run would get {cpu:g} CPUs{source}; policies.resources.max_cpu "
                f"allows at most {limits.max_cpu:g}"
            )
        if memory > limits.max_memory_mb:
            return Refused(
                f"the run would get {memory} MB of memory{source}; "
                f"policies.resources.max_memory_mb allows at most {limits.max_memory_mb} MB"
            )
        return Admitted(
            Granted(
                cpu=cpu,
                memory_mb=memory,
                gpus=gpus,
                gpu_type=given.gpu_type if gpus else None,
                deadline_seconds=given.deadline_seconds,
                profile=profile.name if profile else None,
            )
        )


def _first(*values: _T | None) -> _T:
    """The first value that is set (the last is the default and always is)."""
    for value in values:
        if value is not None:
            return value
    raise ValueError("no default")  # pragma: no cover - callers end with a default
