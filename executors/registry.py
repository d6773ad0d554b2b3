"""Executor discovery: the ``fednode.executors`` entry-point group maps a kind to a factory.

fednode registers its own (podman, kubernetes, apptainer) in its pyproject; a third party
adds one by declaring an entry point in its own distribution, without editing fednode.
Loading is lazy, so choosing podman never imports the Kubernetes client library.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import cast

from executors.base import ExecutorFactory

GROUP = "fednode.executors"


def available_kinds() -> list[str]:
    """The executor kinds installed in this environment."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_factory(kind: str) -> ExecutorFactory:
    """The factory registered for ``kind``; a clear error names the kinds that exist."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == kind]
    if not matches:
        known = ", ".join(available_kinds()) or "none"
        raise LookupError(f"no executor of kind {kind!r} is installed (installed: {known})")
    return cast(ExecutorFactory, matches[0].load())
