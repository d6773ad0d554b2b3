"""The podman executor: one container per run, through podman's REST API (libpod)."""
