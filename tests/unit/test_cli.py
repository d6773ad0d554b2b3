"""The ``fednode`` command: exit codes and messages an operator sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from node.cli import app, example_config

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("fednode ")


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "config" in result.stdout and "version" in result.stdout


def test_shipped_example_is_valid() -> None:
    result = runner.invoke(app, ["config", "check", "-c", str(ROOT / "examples/node.yaml")])
    assert result.exit_code == 0, result.output
    assert "api_key: '***'" in result.stdout
    assert "00000000-0000" not in result.stdout


def test_config_example_is_the_file_in_examples() -> None:
    result = runner.invoke(app, ["config", "example"])
    assert result.exit_code == 0
    assert result.stdout == (ROOT / "examples/node.yaml").read_text()
    assert isinstance(yaml.safe_load(example_config()), dict)


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("server_url: https://x.org\napi_key: k\ntask_dir: t\nport: many\nextra: 1\n")
    result = runner.invoke(app, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].endswith("is not a valid configuration:")
    assert [line.strip().split(":")[0] for line in lines[1:]] == ["port", "extra"]


def test_missing_config_file_exits_2_without_traceback(tmp_path: Path) -> None:
    # A real process: what an operator sees on the terminal.
    proc = subprocess.run(
        [sys.executable, "-m", "node", "config", "check", "-c", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "configuration file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
