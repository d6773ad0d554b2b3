"""The FAKE apptainer binary (tests/fakes/apptainer_fake.py) keeps its contract.

The executor's tests are only as good as the fake's likeness to apptainer: these pin the
errors it copies from apptainer 1.3's source (cobra flag errors exit 1; ``sylog.Fatalf``
prints ``FATAL:`` and exits 255) and what it records.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conformance.apptainer_harness import FAKE_APPTAINER


@pytest.fixture
def fake(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"docker://localhost/fake/behave:1": {"program": "behave"}}))
    calls = tmp_path / "calls.jsonl"
    env = {
        "PATH": "/usr/bin:/bin",
        "FAKE_APPTAINER_REGISTRY": str(registry),
        "FAKE_APPTAINER_CALLS": str(calls),
    }
    return [str(FAKE_APPTAINER)], env, calls


def run(
    fake: tuple[list[str], dict[str, str], Path], *args: str
) -> subprocess.CompletedProcess[str]:
    command, env, _ = fake
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_the_fake_reports_a_version_and_records_every_call(
    fake: tuple[list[str], dict[str, str], Path],
) -> None:
    done = run(fake, "--version")

    assert (done.returncode, done.stdout.strip()) == (0, "apptainer version 1.3.4")
    assert [json.loads(line)["argv"] for line in fake[2].read_text().splitlines()] == [
        ["--version"]
    ]


def test_the_fake_rejects_an_unknown_flag_like_cobra_with_exit_1(
    fake: tuple[list[str], dict[str, str], Path],
) -> None:
    done = run(fake, "run", "--no-such-flag", "x.sif")

    assert done.returncode == 1
    assert 'Error for command "run": unknown flag: --no-such-flag' in done.stderr


def test_the_fake_fails_a_pull_of_a_missing_image_with_apptainers_fatal_and_255(
    fake: tuple[list[str], dict[str, str], Path], tmp_path: Path
) -> None:
    done = run(
        fake, "--quiet", "pull", str(tmp_path / "x.sif"), "docker://localhost/no-such-image:never"
    )

    assert done.returncode == 255
    assert done.stderr.startswith(
        "FATAL:   While making image from oci registry: failed to get checksum for "
        "docker://localhost/no-such-image:never"
    )
    assert not (tmp_path / "x.sif").exists()


def test_the_fake_pulls_a_known_image_to_a_file_and_runs_it(
    fake: tuple[list[str], dict[str, str], Path], tmp_path: Path
) -> None:
    sif = tmp_path / "behave.sif"
    (tmp_path / "input").write_text(json.dumps({"exit_code": 3, "output": "out", "log": "hello"}))
    (tmp_path / "output").write_text("")
    env_file = tmp_path / "env"
    env_file.write_text(
        "export INPUT_FILE=/mnt/task/input\nexport OUTPUT_FILE='/mnt/task/output'\n"
    )

    pulled = run(fake, "pull", str(sif), "docker://localhost/fake/behave:1")
    done = run(
        fake,
        "run",
        "--containall",
        "--env-file",
        str(env_file),
        "--bind",
        f"{tmp_path / 'input'}:/mnt/task/input:ro",
        "-B",
        f"{tmp_path / 'output'}:/mnt/task/output:rw",
        str(sif),
    )

    assert pulled.returncode == 0
    assert (done.returncode, done.stdout, done.stderr) == (3, "hello\n", "behave: on stderr\n")
    assert (tmp_path / "output").read_text() == "out"


def test_the_fake_keeps_read_only_binds_read_only(
    fake: tuple[list[str], dict[str, str], Path], tmp_path: Path
) -> None:
    sif = tmp_path / "behave.sif"
    run(fake, "pull", str(sif), "docker://localhost/fake/behave:1")
    (tmp_path / "input").write_text("{}")
    (tmp_path / "output").write_text("")

    done = run(
        fake,
        "run",
        "--env",
        "INPUT_FILE=/mnt/task/input",
        "--env",
        "OUTPUT_FILE=/mnt/task/output",
        "--bind",
        f"{tmp_path / 'input'}:/mnt/task/input:ro,{tmp_path / 'output'}:/mnt/task/output:ro",
        str(sif),
    )

    assert done.returncode == 1
    assert "Read-only file system" in done.stderr


def test_the_fake_refuses_a_bind_of_a_missing_source_with_fatal_255(
    fake: tuple[list[str], dict[str, str], Path], tmp_path: Path
) -> None:
    sif = tmp_path / "behave.sif"
    run(fake, "pull", str(sif), "docker://localhost/fake/behave:1")

    done = run(fake, "run", "--bind", "/no/such/file:/mnt/data/x:ro", str(sif))

    assert done.returncode == 255
    assert "FATAL:   container creation failed: mount hook function failure" in done.stderr


def test_the_fake_cannot_open_a_missing_sif(fake: tuple[list[str], dict[str, str], Path]) -> None:
    done = run(fake, "run", "/no/such.sif")

    assert done.returncode == 255
    assert "FATAL:   could not open image /no/such.sif" in done.stderr
