"""Executor plugins: a kind fednode does not ship is configured and built like its own.

A third party registers an executor class in the ``fednode.executors`` entry-point group;
here that registration is simulated by adding one entry point to what
:mod:`executors.registry` sees, the class living in this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from importlib.metadata import EntryPoint, EntryPoints
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from typer.testing import CliRunner

import executors.registry
from executors.base import Executor, ExecutorContext, ProxyPlacement, TokenUnavailable
from executors.spec import RunEvent, RunOutput, RunSpec, RunState
from node.app import Node
from node.cli import app
from node.settings import ConfigError, load_settings, redacted_dump

GROUP = executors.registry.GROUP


class SlurmSettings(BaseModel):
    """What a third party's executor would accept under ``executor:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["slurm"] = "slurm"
    partition: str
    max_jobs: Annotated[int, Field(gt=0)] = 10
    spool_dir: Path = Path("/var/spool/slurm")
    token: SecretStr | None = None
    account_secret: SecretStr | None = None


class SlurmExecutor:
    """A do-nothing executor; only construction matters here."""

    kind: ClassVar[str] = "slurm"
    settings_model: ClassVar[type[BaseModel]] = SlurmSettings

    def __init__(self, settings: BaseModel, *, context: ExecutorContext) -> None:
        assert isinstance(settings, SlurmSettings)
        self.settings = settings
        self.context = context

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def start(self, spec: RunSpec) -> None: ...

    async def kill(self, run_id: int) -> None: ...

    async def events(self) -> AsyncIterator[RunEvent]:
        return
        yield

    async def collect(self, run_id: int) -> RunOutput:
        raise NotImplementedError

    async def cleanup(self, run_id: int) -> None: ...

    async def list_runs(self) -> list[RunState]:
        return []

    def proxy_placement(self, *, host: str, advertise_host: str | None) -> ProxyPlacement:
        return ProxyPlacement(host, advertise_host or host)

    async def recover_token(self, state: RunState) -> str:
        raise TokenUnavailable("slurm keeps no copy of the token")


class NoSettings:
    """A broken plugin: it declares no settings model."""

    kind: ClassVar[str] = "broken"


PLUGINS = {
    "slurm": f"{__name__}:SlurmExecutor",
    "broken": f"{__name__}:NoSettings",
    "missing": "fednode_no_such_package.executor:Executor",
}


@pytest.fixture(autouse=True)
def installed_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The installed entry points, plus this module's as if a distribution declared them."""
    real = metadata.entry_points

    def entry_points(*, group: str) -> EntryPoints:
        found = list(real(group=group))
        if group == GROUP:
            found += [EntryPoint(name, value, GROUP) for name, value in PLUGINS.items()]
        return EntryPoints(found)

    monkeypatch.setattr(executors.registry, "entry_points", entry_points)
    yield


BASE = "server_url: https://v6.example.org\napi_key: not-a-real-key\ntask_dir: ./tasks\n"


def write(tmp_path: Path, executor: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(BASE + "executor: " + executor + "\n")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


def test_a_plugin_kind_is_validated_by_its_own_settings_model(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "{kind: slurm, partition: gpu, spool_dir: spool}"))
    assert isinstance(settings.executor, SlurmSettings)
    assert settings.executor_kind == "slurm"
    assert settings.executor.partition == "gpu"
    # Its path fields are relative to the file, as fednode's own are.
    assert settings.executor.spool_dir == tmp_path / "spool"


def test_a_plugin_kinds_settings_are_overridden_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDNODE_EXECUTOR__MAX_JOBS", "3")
    settings = load_settings(write(tmp_path, "{kind: slurm, partition: gpu}"))
    assert isinstance(settings.executor, SlurmSettings)
    assert settings.executor.max_jobs == 3


def test_a_plugin_kinds_bad_settings_name_the_executor_key_path(tmp_path: Path) -> None:
    problems = problems_of(
        write(tmp_path, "{kind: slurm, max_jobs: 0, partitoin: gpu, token: [hunter2]}")
    )
    assert sorted(problems) == sorted(
        [
            "executor.partition: required key is missing; set 'partition' in the file or the "
            "environment variable FEDNODE_EXECUTOR__PARTITION",
            "executor.max_jobs: Input should be greater than 0 (got 0)",
            "executor.token: Input should be a valid string (got ***)",
            "executor.partitoin: unknown key (value 'gpu'); remove it or use one of: "
            "account_secret, kind, max_jobs, partition, spool_dir, token",
        ]
    )


def test_a_plugin_kinds_secret_fields_are_redacted_by_their_type(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "{kind: slurm, partition: p, account_secret: [s3]}"))
    assert problem == "executor.account_secret: Input should be a valid string (got ***)"
    dumped = str(
        redacted_dump(
            load_settings(write(tmp_path, "{kind: slurm, partition: p, account_secret: s3}"))
        )
    )
    assert "s3" not in dumped
    assert "'partition': 'p'" in dumped


def test_the_nodes_executor_factory_builds_the_plugin(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "{kind: slurm, partition: gpu}"))
    executor = Node(settings)._make_executor()
    assert isinstance(executor, SlurmExecutor)
    assert isinstance(executor, Executor)
    assert executor.settings is settings.executor
    assert executor.context == ExecutorContext(node_name="fednode", task_dir=tmp_path / "tasks")


def test_a_kind_neither_built_in_nor_installed_is_one_line_saying_how_to_add_it(
    tmp_path: Path,
) -> None:
    (problem,) = problems_of(write(tmp_path, "{kind: lsf, queue: q}"))
    assert problem.startswith("executor.kind: 'lsf' is neither built in nor an installed plugin;")
    assert "use one of: apptainer, broken, kubernetes, missing, podman, slurm" in problem
    assert "'fednode.executors' entry-point group" in problem
    assert "\n" not in problem


def test_a_missing_kind_lists_the_kinds(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "{partition: gpu}"))
    assert problem.startswith("executor.kind: required key is missing; use one of: apptainer,")


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "{kind: missing}"))
    assert problem.startswith(
        "executor.kind: the executor plugin 'missing' cannot be loaded: ModuleNotFoundError"
    )


def test_a_plugin_without_a_settings_model_is_one_line(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "{kind: broken}"))
    assert problem.startswith("executor.kind: the executor plugin 'broken' is broken:")


def test_built_in_kinds_keep_their_own_models_messages(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "{kind: kubernetes, namespaec: x}"))
    assert problem.startswith("executor.namespaec: unknown key (value 'x'); remove it or use")
    assert "namespace" in problem and "socket" not in problem  # kubernetes keys, not podman's


def test_config_check_shows_the_plugins_effective_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "{kind: slurm, partition: gpu, token: t0ps3cret}")
    result = CliRunner().invoke(app, ["config", "check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "  kind: slurm\n  partition: gpu\n  max_jobs: 10\n" in result.stdout
    assert "t0ps3cret" not in result.stdout


def test_config_check_of_an_unknown_kind_exits_2_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["config", "check", "-c", str(write(tmp_path, "{kind: x}"))])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[1].strip().startswith("executor.kind: 'x' is neither built in nor")
