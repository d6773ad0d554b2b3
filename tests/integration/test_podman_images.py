"""The locally built algorithm images honour the vantage6 4.x container contract under the
isolation fednode applies: no network, read-only root, non-root user, no capabilities.

Each test runs one container through the podman API service (podman remote), laid out as
a vantage6 4.x node lays out a run: a task folder with ``input``, ``output`` and ``token``
files mounted at ``/mnt/data``, the database bound read-only, and every contract variable
base32-encoded the way the 4.x node encodes them.
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.peers.podman import PodmanService

pytestmark = pytest.mark.podman

ISOLATION = [
    "--network", "none",
    "--read-only",
    "--tmpfs", "/tmp",
    "--user", "1000:1000",
    "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges",
]  # fmt: skip
TASK_DIR = "/mnt/data/task-000000001"
DATABASE = "/mnt/databases/default.csv"


def v4_encode(value: str) -> str:
    """An environment value as the vantage6 4.x node passes it (base32, '=' as '!')."""
    return base64.b32encode(value.encode()).decode().replace("=", "!")


def task_folder(tmp_path: Path, task_input: dict[str, Any]) -> Path:
    """A run's task folder, readable and writable by the container's uid."""
    folder = tmp_path / "task-000000001"
    folder.mkdir()
    (folder / "input").write_text(json.dumps(task_input))
    (folder / "output").write_bytes(b"")
    (folder / "token").write_text("not-a-real-token")
    folder.chmod(0o777)
    for name in ("input", "output", "token"):
        (folder / name).chmod(0o666)
    return folder


def run_v4(
    podman: PodmanService, image: str, folder: Path, env: dict[str, str], *mounts: str
) -> Path:
    """Run ``image`` once with the 4.x contract; return the output file, failing on errors."""
    contract = {
        "INPUT_FILE": f"{TASK_DIR}/input",
        "OUTPUT_FILE": f"{TASK_DIR}/output",
        "TOKEN_FILE": f"{TASK_DIR}/token",
        "TEMPORARY_FOLDER": "/tmp",
        "HOST": "http://fednode-proxy",
        "PORT": "7654",
        "API_PATH": "",
        **env,
    }
    args = [*ISOLATION, "--volume", f"{folder}:/mnt/data/{folder.name}"]
    for mount in mounts:
        args += ["--volume", mount]
    for name, value in contract.items():
        args += ["--env", f"{name}={v4_encode(value)}"]
    completed = subprocess.run(
        podman.cli("run", "--rm", *args, image),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return folder / "output"


@pytest.mark.parametrize("csv_name", ["employees_a.csv", "employees_b.csv"])
def test_average_image_writes_the_partial_sum_and_count_of_the_csv(
    podman_service: PodmanService, tmp_path: Path, csv_name: str
) -> None:
    csv_path = podman_service.data_dir / csv_name
    with csv_path.open(newline="") as f:
        ages = [int(row["age"]) for row in csv.DictReader(f)]
    folder = task_folder(tmp_path, {"method": "partial_average", "kwargs": {"column_name": "age"}})

    output = run_v4(
        podman_service,
        podman_service.average_image,
        folder,
        {
            "USER_REQUESTED_DATABASE_LABELS": "default",
            "DB_LABELS": "default",
            "DEFAULT_DATABASE_URI": DATABASE,
            "DEFAULT_DATABASE_TYPE": "csv",
        },
        f"{csv_path}:{DATABASE}:ro",
    )

    assert json.loads(output.read_text()) == {"sum": sum(ages), "count": len(ages)}


def test_diagnostics_image_without_network_sees_no_outside_and_runs_confined(
    podman_service: PodmanService, tmp_path: Path
) -> None:
    folder = task_folder(
        tmp_path,
        {"method": "diagnose", "kwargs": {"targets": ["1.1.1.1:443"], "timeout": 1}},
    )

    report = json.loads(
        run_v4(podman_service, podman_service.diagnostics_image, folder, {}).read_text()
    )

    assert report["internet"]["reachable"] is False
    assert report["proxy"]["reachable"] is False
    assert report["dns"]["resolves"] is False
    assert report["root_fs"]["read_only"] is True
    assert report["root_fs"]["writable"] is False
    assert report["identity"]["uid"] == 1000 and report["identity"]["gid"] == 1000
    assert report["identity"]["cap_eff"] == "0000000000000000"
    assert report["identity"]["no_new_privs"] is True
    assert report["scratch"]["writable"] is True
    assert report["network_interfaces"] == ["lo"]
    assert report["env"]["PORT"] == "7654"  # decoded, as algorithm-tools decodes it
