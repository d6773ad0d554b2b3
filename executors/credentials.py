"""Registry credentials, each bound to one registry host, and the lookup that scopes them.

A task names any image it likes, so credentials handed to every pull go to any registry a
task names: ``attacker.example/x`` would harvest them. Each credential here belongs to one
registry (``host`` or ``host:port``, as in vantage6's ``docker_registries``), and an
executor hands it to a pull only when the image's registry is exactly that one. Docker
Hub's names (``docker.io``, ``index.docker.io``, ``registry-1.docker.io``, …, and images
without a registry part, such as ``python:3.12``) are all one registry, ``docker.io``.

How an image names its registry follows Docker's reference grammar: the part before the
first ``/`` is a registry when it has a ``.`` or a ``:``, or is ``localhost``; otherwise
the image is on Docker Hub. A runtime that resolves short names itself (podman's
``unqualified-search-registries``) still gets only the credential of the registry the
name means here, and podman receives it keyed by that registry (see
:func:`executors.podman.api.registry_auth`), so it cannot reuse it for another.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

DOCKER_HUB = "docker.io"
#: Names of Docker Hub's registry that mean ``docker.io``.
DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
#: Schemes an image reference may carry (apptainer's); the registry follows them.
_SCHEMES = ("docker://", "oras://")
_HOST = re.compile(
    r"^(?:\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*)"
    r"(?::[0-9]{1,5})?$"
)


def normalize_registry(value: str) -> str:
    """``value`` as the one spelling of its registry; :class:`ValueError` if it is none.

    Accepts what operators copy from ``docker login`` and registry UIs: a scheme
    (``https://``) and Docker Hub's legacy ``/v1/`` path are dropped; a host is
    case-insensitive. Any other path is refused: credentials belong to a whole registry.
    """
    text = value.strip()
    lowered = text.lower()
    for scheme in ("https://", "http://"):
        if lowered.startswith(scheme):
            text = text[len(scheme) :]
            break
    text = text.rstrip("/")
    host, _, path = text.partition("/")
    host = host.lower()
    if path and not (host in DOCKER_HUB_ALIASES and path == "v1"):
        raise ValueError(
            f"{value!r} has a path; give the registry's host or host:port only "
            "(e.g. 'harbor.example.org' or 'registry.example.org:5000')"
        )
    if not _HOST.match(host):
        raise ValueError(
            f"{value!r} is not a registry host; give host or host:port, e.g. 'harbor.example.org'"
        )
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def image_registry(image: str) -> str:
    """The registry an image reference pulls from (``docker.io`` when it names none)."""
    reference = image
    for scheme in _SCHEMES:
        if reference.startswith(scheme):
            reference = reference[len(scheme) :]
            break
    first, slash, _ = reference.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host = first.lower()
        return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host
    return DOCKER_HUB


class RegistryCredential(BaseModel):
    """The credential of one registry (an entry of ``docker_registries``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``host`` or ``host:port``; a scheme and Docker Hub's ``/v1/`` are accepted and dropped.
    registry: Annotated[str, AfterValidator(normalize_registry)]
    username: Annotated[str, Field(min_length=1)]
    password: SecretStr


def credential_for(
    image: str, credentials: Iterable[RegistryCredential]
) -> RegistryCredential | None:
    """The credential of the registry ``image`` is pulled from, if one is configured."""
    registry = image_registry(image)
    return next((c for c in credentials if c.registry == registry), None)


def duplicate_registries(credentials: Iterable[RegistryCredential]) -> list[str]:
    """Registries that have more than one credential (ambiguous: refused by the settings)."""
    seen: set[str] = set()
    twice: list[str] = []
    for credential in credentials:
        if credential.registry in seen and credential.registry not in twice:
            twice.append(credential.registry)
        seen.add(credential.registry)
    return twice


def unscoped_credential(value: Any) -> None:
    """Validator of the retired single-credential executor keys: always a clear error.

    Those keys sent one credential with every pull, to whatever registry a task named.
    """
    if value is None:
        return None
    raise ValueError(
        "one credential for every registry is no longer accepted (it was sent to any "
        "registry a task names); move it to the top-level 'docker_registries' list, e.g. "
        "docker_registries: [{registry: harbor.example.org, username: ..., password: ...}]"
    )
