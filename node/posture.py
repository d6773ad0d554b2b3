"""Warnings about a configuration that is valid but leaves the node exposed.

Validation (:mod:`node.settings`) refuses what cannot work; what works but widens who can
do what is allowed, and said once, at start (as log warnings) and by ``fednode config
check``: an empty ``allowed_algorithms`` lets any collaborator run any image on this
node's data, and a private key file others may read is a key others may have.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Any

from node.settings import NodeSettings


@dataclass(frozen=True, slots=True)
class PostureWarning:
    """One warning: a log event name, the sentence for people, and its keys."""

    event: str
    message: str
    keys: dict[str, Any] = field(default_factory=dict)


def posture_warnings(settings: NodeSettings) -> list[PostureWarning]:
    """What in ``settings`` deserves a warning (reads the private key's file mode)."""
    found: list[PostureWarning] = []
    if not settings.policies.allowed_algorithms:
        found.append(
            PostureWarning(
                "node.any_image_allowed",
                "policies.allowed_algorithms is empty: any collaborator can run any image "
                "on this node's data; list the images (regular expressions, whole-name "
                "matches) this node may run",
            )
        )
    kinds = {entry.kind for entry in settings.executor_entries}
    if settings.docker_registries and kinds == {"kubernetes"}:
        found.append(
            PostureWarning(
                "node.docker_registries_unused",
                "docker_registries is not used by the kubernetes executor (the kubelet "
                "pulls); give executor.image_pull_secrets instead",
            )
        )
    key = settings.encryption.private_key
    if settings.encryption.enabled and key is not None:
        try:
            mode = stat.S_IMODE(key.stat().st_mode)
        except OSError:
            mode = 0  # unreadable keys are reported by validation and by the cryptor
        if mode & 0o077:
            found.append(
                PostureWarning(
                    "node.private_key_readable_by_others",
                    f"encryption.private_key {key} has mode {mode:04o}: group or others may "
                    f"read (or write) it; chmod 600 {key}",
                    {"path": str(key), "mode": f"{mode:04o}"},
                )
            )
    return found
