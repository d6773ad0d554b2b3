"""The ``fednode`` command: exit codes and messages an operator sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
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


API_KEY = "4c6f1d7e-8a39-4b1e-9f0d-2a7c5e3b9d10"
GOOD = f"server_url: https://v6.example.org\napi_key: {API_KEY}\ntask_dir: ./tasks\n"
#: The installed console script, as an operator runs it.
FEDNODE = Path(sys.executable).with_name("fednode")


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        pytest.param(
            GOOD + "proxy: {port: 7000\n",
            "{path}: not valid YAML at line 5, column 1:",
            id="bad YAML",
        ),
        pytest.param(
            GOOD + "proxy: {prot: 7000}\n",
            "proxy.prot: unknown key (value 7000); remove it or use one of: "
            "advertise_host, enabled, host, keepalive_timeout_seconds, key_cache_seconds, "
            "max_body_mb, max_body_work, max_connections_per_run, max_response_mb, "
            "max_task_organizations, port, unreachable_patience_seconds, upstream_timeout_seconds",
            id="unknown key",
        ),
        pytest.param(
            GOOD + "max_concurrent_runs: lots\n",
            "max_concurrent_runs: Input should be a valid integer, unable to parse "
            "string as an integer (got 'lots')",
            id="wrong type",
        ),
        pytest.param(
            GOOD + "databases:\n  - {label: cohort, type: csv, uri: cohort.csv}\n",
            "databases[0].uri: csv file does not exist; give the path of the file "
            "(got '{dir}/cohort.csv')",
            id="database file that does not exist",
        ),
        pytest.param(
            GOOD + "encryption: {enabled: true, private_key: keys}\n",
            "encryption.private_key: private key cannot be read (Is a directory) "
            "(got '{dir}/keys')",
            id="unreadable private key",
        ),
        pytest.param(
            GOOD.replace(API_KEY, "{value: s3cr3t-key}"),
            "api_key: Input should be a valid string (got ***)",
            id="secret of the wrong type",
        ),
        pytest.param(
            GOOD + "docker_registries: [{registry: h.example, username: u, password: [s3cr3t]}]\n",
            "docker_registries[0].password: Input should be a valid string (got ***)",
            id="registry secret of the wrong type",
        ),
        pytest.param(
            GOOD + "executor: {kind: podman, registry_password: s3cr3t-key}\n",
            "executor.registry_password: one credential for every registry is no longer "
            "accepted (it was sent to any registry a task names); move it to the top-level "
            "'docker_registries' list",
            id="retired credential for every registry",
        ),
        pytest.param(
            GOOD + "docker_registries: [{registry: 'h.example/team', username: u, password: p}]\n",
            "docker_registries[0].registry: 'h.example/team' has a path; give the registry's "
            "host or host:port only",
            id="registry with a path",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_key_and_no_secret(
    tmp_path: Path, config: str, problem: str
) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(config)
    (tmp_path / "keys").mkdir()  # a private key path that is a folder: cannot be read
    proc = subprocess.run(
        [str(FEDNODE), "config", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    header, *problems = proc.stderr.splitlines()
    assert header == f"fednode: {path} is not a valid configuration:"
    (line,) = problems
    assert line.strip().startswith(problem.format(path=path, dir=tmp_path))
    assert "Traceback" not in proc.stderr
    assert API_KEY not in proc.stderr and "s3cr3t" not in proc.stderr
