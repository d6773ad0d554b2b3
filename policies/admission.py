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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class ResourceRequest(BaseModel):
    """What a run asks for; ``None`` means "the node's default"."""

    model_config = ConfigDict(frozen=True)

    cpu: float | None = None
    memory_mb: int | None = None
    gpus: int = 0


class ResourcePolicy(BaseModel):
    """Defaults and caps (mirrors the ``policies.resources`` settings section)."""

    model_config = ConfigDict(frozen=True)

    default_cpu: float = 1.0
    default_memory_mb: int = 1024
    max_cpu: float = 4.0
    max_memory_mb: int = 8192
    max_gpus: int = 0


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


#: An image pinned by digest ends in this (the OCI sha256 digest, lower-case hex).
PINNED = re.compile(r"@sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Granted:
    """The resources an admitted run gets."""

    cpu: float
    memory_mb: int
    gpus: int


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
        return self._grant(request or ResourceRequest())

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

    def _grant(self, request: ResourceRequest) -> Decision:
        limits = self._policy.resources
        cpu = request.cpu if request.cpu is not None else limits.default_cpu
        memory = request.memory_mb if request.memory_mb is not None else limits.default_memory_mb
        if request.gpus > limits.max_gpus:
            return Refused(
                f"the run asks for {request.gpus} GPU(s); this node allows at most "
                f"{limits.max_gpus}"
            )
        if cpu > limits.max_cpu:
            return Refused(
                f"the run asks for {cpu} CPUs; this node allows at most {limits.max_cpu}"
            )
        if memory > limits.max_memory_mb:
            return Refused(
                f"the run asks for {memory} MB of memory; this node allows at most "
                f"{limits.max_memory_mb} MB"
            )
        return Admitted(Granted(cpu=cpu, memory_mb=memory, gpus=request.gpus))
