"""Images as apptainer sees them: references, the SIF cache, and pulls into it.

Every run executes a SIF file from the node's image cache, never a registry reference
directly: pulling first means a missing image or a refused pull is known (and reported as
``image-not-found``) before any run process exists, and the FATAL error of a run's
``apptainer run`` can only be about the run itself. What a task may name:

* ``docker://…``, ``oras://…``, ``library://…``: pulled with ``apptainer pull`` into
  ``<cache>/<sanitised reference>-<hash>.sif``;
* a plain Docker reference (``harbor2.vantage6.ai/demo/average:latest``, what vantage6
  sends): treated as ``docker://`` + the reference;
* ``<name>.sif`` (relative to the cache, or an absolute path inside it): a SIF file the
  operator placed in the cache; never pulled, and nothing outside the cache is accepted.

Pull policy: ``if-not-present`` pulls a reference only when its SIF is missing; ``always``
pulls on every start (concurrent starts of one image share one pull); ``never`` runs only
what is already cached. A pull writes to a temporary name and is renamed into place, so a
half-pulled image is never run; a run already executing keeps its open file when a later
``always`` pull replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from common.logging import get_logger
from executors.apptainer.config import PULL_CREDENTIAL_VARIABLES, ApptainerSettings
from executors.base import ImageUnavailable
from executors.credentials import RegistryCredential, credential_for
from executors.tasks import SharedWork, TaskOwner

log = get_logger(__name__)

SCHEMES = ("docker://", "oras://", "library://")
#: The schemes whose pulls authenticate to a registry named in the reference.
REGISTRY_SCHEMES = ("docker://", "oras://")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_OUTPUT_TAIL = 2000


class ImageSource(NamedTuple):
    """Where a run's SIF comes from: ``uri`` to pull (``None``: a file in the cache)."""

    uri: str | None
    sif: Path


def resolve(image: str, *, cache: Path) -> ImageSource:
    """The source of ``image``; :class:`ImageUnavailable` if this executor cannot run it."""
    if image.startswith(SCHEMES):
        return ImageSource(image, cache / cache_name(image))
    if "://" in image:
        raise ImageUnavailable(
            f"image {image}: the apptainer executor runs docker://, oras:// and library:// "
            "references, plain Docker references, and .sif files in its image cache"
        )
    if image.endswith(".sif"):
        path = Path(image) if Path(image).is_absolute() else cache / image
        resolved, root = path.resolve(), cache.resolve()
        if not resolved.is_relative_to(root):
            raise ImageUnavailable(
                f"image {image}: a local SIF file must be in the image cache {root}"
            )
        return ImageSource(None, resolved)
    uri = f"docker://{image}"
    return ImageSource(uri, cache / cache_name(uri))


def cache_name(uri: str) -> str:
    """The cache file name of a reference: readable, and unique by its hash."""
    readable = _UNSAFE.sub("_", uri.split("://", 1)[-1]).strip("_.")[:80] or "image"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return f"{readable}-{digest}.sif"


def pull_environment(
    settings: ApptainerSettings, *, uri: str, credentials: Iterable[RegistryCredential] = ()
) -> dict[str, str]:
    """The environment of ``apptainer pull uri``: the node's and the operator's extras, less
    any registry credential, plus the credential of ``uri``'s registry if one is configured.

    apptainer offers ``APPTAINER_DOCKER_USERNAME``/``_PASSWORD`` to whatever registry it
    pulls from, so they are set for one pull only, and only when its registry matches.
    """
    environment = {
        name: value
        for name, value in {**os.environ, **settings.apptainer_environment}.items()
        if name.upper() not in PULL_CREDENTIAL_VARIABLES
    }
    credential = credential_for(uri, credentials) if uri.startswith(REGISTRY_SCHEMES) else None
    if credential is not None:
        environment["APPTAINER_DOCKER_USERNAME"] = credential.username
        environment["APPTAINER_DOCKER_PASSWORD"] = credential.password.get_secret_value()
    return environment


def failure_text(output: bytes) -> str:
    """What apptainer said went wrong: its last FATAL line, else the tail of its output."""
    text = output.decode(errors="replace").strip()
    fatal = [line.strip() for line in text.splitlines() if line.startswith("FATAL:")]
    if fatal:
        return fatal[-1]
    return text[-_OUTPUT_TAIL:] or "(no output)"


class ImageCache:
    """Makes sure a run's image is a SIF file in the cache, pulling it per the policy."""

    def __init__(
        self,
        *,
        settings: ApptainerSettings,
        binary: str,
        directory: Path,
        tasks: TaskOwner,
        credentials: tuple[RegistryCredential, ...] = (),
    ) -> None:
        self._settings = settings
        self._credentials = credentials
        self._binary = binary
        self.directory = directory
        self._pulls: SharedWork[str, None] = SharedWork(tasks)

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def ensure(self, image: str) -> Path:
        """The SIF to run for ``image``; :class:`ImageUnavailable` says why there is none."""
        source = resolve(image, cache=self.directory)
        present = _exists(source.sif)
        if source.uri is None:
            if present:
                return source.sif
            raise ImageUnavailable(
                f"image {image}: no such SIF file in the image cache ({source.sif})"
            )
        policy = self._settings.pull_policy
        if present and policy != "always":
            return source.sif
        if policy == "never":
            raise ImageUnavailable(
                f"image {image} is not in the image cache {self.directory} (pull policy: never)"
            )
        uri, sif = source.uri, source.sif
        await self._pulls.run(uri, lambda: self._pull(uri, sif), name=f"apptainer-pull-{uri}")
        return sif

    async def _pull(self, uri: str, sif: Path) -> None:
        """Pull ``uri`` to ``sif``; :class:`ImageUnavailable` with apptainer's reason."""
        partial = sif.with_name(f".{sif.name}.{uuid.uuid4().hex[:8]}.pull")
        argv = [self._binary, "--quiet", "pull", str(partial), uri]
        log.info("apptainer.image.pulling", image=uri, sif=str(sif))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=pull_environment(self._settings, uri=uri, credentials=self._credentials),
            )
        except OSError as exc:
            raise ImageUnavailable(f"image {uri} could not be pulled: {exc}") from None
        try:
            output, _ = await asyncio.wait_for(
                process.communicate(), timeout=self._settings.pull_timeout_seconds
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            _remove(partial)
            seconds = self._settings.pull_timeout_seconds
            raise ImageUnavailable(f"image {uri} could not be pulled in {seconds:g} s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            _remove(partial)
            raise
        if process.returncode != 0:
            _remove(partial)
            reason = failure_text(output)
            log.warning("apptainer.image.pull_failed", image=uri, error=reason)
            raise ImageUnavailable(f"image {uri} could not be pulled: {reason}")
        try:
            partial.replace(sif)
        except OSError as exc:
            _remove(partial)
            raise ImageUnavailable(
                f"image {uri} was pulled but could not be stored as {sif}: {exc}"
            ) from None
        log.info("apptainer.image.pulled", image=uri, sif=str(sif))


def _exists(path: Path) -> bool:
    return path.is_file()


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
