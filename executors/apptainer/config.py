"""Settings of the apptainer executor (``executor: {kind: apptainer, ...}``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict


class ApptainerSettings(BaseModel):
    """Runs algorithms with ``apptainer exec`` as asyncio subprocesses (HPC hosts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["apptainer"] = "apptainer"
    binary: str = "apptainer"
    image_cache: Path | None = None
