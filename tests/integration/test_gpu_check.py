"""``fednode gpu-check`` and ``scripts/gpu-check``, on real podman with STAND-IN GPUs.

The stand-in CDI spec (``tests/peers/podman.py``) also binds a FAKE ``nvidia-smi`` into
GPU containers that lists the stand-in GPUs the container was given, so the check runs
its whole path here — the node configuration, the executor, the probe image
(``algorithms/gpu-probe``), the verdict — while on a real GPU host the same check reads
the real ``nvidia-smi``. Where there is no GPU at all, the script says SKIPPED.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers.podman import PodmanGpuService, PodmanService

pytestmark = [pytest.mark.podman, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PROBE_DIR = REPO / "algorithms" / "gpu-probe"


@pytest.fixture(scope="module")
def probe_image(podman_service: PodmanService) -> str:
    """``localhost/fednode/gpu-probe:<hash of its inputs>``, built once."""
    digest = hashlib.sha256(podman_service.base_image.encode())
    for path in sorted(PROBE_DIR.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    image = f"localhost/fednode/gpu-probe:{digest.hexdigest()[:16]}"
    if subprocess.run(podman_service.cli("image", "exists", image), check=False).returncode:
        build = [
            "build",
            "--quiet",
            "--pull=never",
            "--build-arg",
            f"BASE={podman_service.base_image}",
        ]
        built = subprocess.run(
            podman_service.cli(*build, "-t", image, str(PROBE_DIR)),
            check=False,
            capture_output=True,
            text=True,
        )
        assert built.returncode == 0, built.stderr
    return image


def gpu_check(config: Path, image: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node", "gpu-check", "-c", str(config), "--image", image]
    return subprocess.run(
        [*command, *args], check=False, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_each_run_sees_exactly_the_gpus_it_was_given(
    podman_gpu_service: PodmanGpuService, probe_image: str, tmp_path: Path
) -> None:
    config = tmp_path / "node.yaml"
    node: dict[str, Any] = {
        "server_url": "http://gpu-check.invalid",
        "api_key": "unused",
        "task_dir": str(tmp_path / "tasks"),
        "executor": {
            "kind": "podman",
            "socket": podman_gpu_service.url,
            "gpu_devices": [podman_gpu_service.device("0"), podman_gpu_service.device("1")],
        },
    }
    config.write_text(yaml.safe_dump(node))
    (tmp_path / "tasks").mkdir()

    one_each = gpu_check(config, probe_image, "--runs", "2", "--gpus", "1")
    all_in_one = gpu_check(config, probe_image, "--runs", "1", "--gpus", "2")
    too_many = gpu_check(config, probe_image, "--runs", "1", "--gpus", "3")

    assert one_each.returncode == 0, one_each.stdout + one_each.stderr
    assert "gpu-check: PASSED" in one_each.stdout
    seen = sorted(line.rsplit(": ", 1)[1] for line in one_each.stdout.splitlines() if "ok" in line)
    assert seen == ["GPU-stand-in-0", "GPU-stand-in-1"]
    assert all_in_one.returncode == 0, all_in_one.stdout + all_in_one.stderr
    assert "GPU-stand-in-0, GPU-stand-in-1" in all_in_one.stdout
    assert too_many.returncode == 1
    assert "ended failed" in too_many.stdout and "gpu-check: FAILED" in too_many.stdout
    # With several executors, the one named is checked.
    node["executors"] = [{**node.pop("executor"), "name": "gpus"}, {"kind": "apptainer"}]
    config.write_text(yaml.safe_dump(node))
    named = gpu_check(config, probe_image, "--executor", "gpus", "--runs", "1")
    assert named.returncode == 0, named.stdout + named.stderr


def test_the_script_says_skipped_where_there_is_no_nvidia_gpu() -> None:
    path = "/usr/sbin:/usr/bin:/sbin:/bin"
    if shutil.which("nvidia-smi", path=path):
        pytest.skip("this host has nvidia-smi: the script runs the real check here")

    done = subprocess.run(
        [str(REPO / "scripts" / "gpu-check")],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
        timeout=60,
    )

    assert done.returncode == 0
    assert done.stdout.startswith("gpu-check: SKIPPED: no NVIDIA GPU here")
