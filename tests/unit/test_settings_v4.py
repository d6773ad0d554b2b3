"""A vantage6 4 ``node.yaml`` carries over: honoured keys, one warning line per dropped
key, refusals that name the key and the fix, and ``fednode config import``.

The files in ``v4_configs/`` are shaped like the ones vantage6 4.15 writes (``v6 node
new``) and documents (every key of its documented node configuration).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from executors.spec import DatabaseMount, ProxyEndpoint
from node.cli import app
from node.contract import container_environment, decode_value
from node.settings import ConfigError, load_settings
from tests.unit.lifecycle_node import lifecycle_under_test

ROOT = Path(__file__).resolve().parents[2]
V4 = Path(__file__).parent / "v4_configs"
CSV = ROOT / "algorithms" / "data" / "employees_a.csv"
runner = CliRunner()


def v4_file(tmp_path: Path, name: str, *, orgs: str = "[6, 7]", **extra: object) -> Path:
    """``v4_configs/<name>`` with its paths filled in, plus ``extra`` keys, in ``tmp_path``."""
    (tmp_path / "tasks").mkdir(exist_ok=True)
    key = tmp_path / "private_key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    text = (V4 / name).read_text()
    for placeholder, value in {
        "{data}": str(CSV),
        "{tasks}": str(tmp_path / "tasks"),
        "{key}": str(key),
        "{orgs}": orgs,
    }.items():
        text = text.replace(placeholder, value)
    if extra:
        text += yaml.safe_dump(extra)
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_a_file_v6_node_new_writes_is_valid_with_one_line_about_its_logging(
    tmp_path: Path,
) -> None:
    settings = load_settings(v4_file(tmp_path, "cli_new.yaml"))

    (note,) = settings.carried_over
    logging_keys = ("use_console", "backup_count", "max_size", "file", "datefmt", "loggers")
    assert note.keys == (*(f"logging.{key}" for key in logging_keys), "logging.format")
    assert "standard output" in note.message
    assert settings.logging.level == "DEBUG" and settings.logging.format == "auto"
    assert settings.server_api_url == "http://localhost:7601/api"
    assert settings.share_algorithm_logs and settings.share_config  # vantage6 4's defaults


def test_the_documented_file_is_accepted_with_each_dropped_key_named_in_one_line(
    tmp_path: Path,
) -> None:
    settings = load_settings(v4_file(tmp_path, "documented.yaml"))

    named = [key for note in settings.carried_over for key in note.keys]
    assert sorted(named) == sorted(
        [
            "node_extra_env",
            "node_extra_mounts",
            "node_extra_hosts",
            "images",
            "directories",
            "vpn_subnet",
            "ssh-tunnels",
            "whitelist",
            "docker_services",
            *(
                f"logging.{key}"
                for key in (
                    "use_console",
                    "backup_count",
                    "max_size",
                    "datefmt",
                    "loggers",
                    "format",
                )
            ),
            "databases[0].mount_mode",
            "policies.allowed_algorithm_stores",
            "policies.allowed_algorithms",
        ]
    )
    # What asks for nothing (debug all false, prometheus and run_context_file off,
    # gpu false, mount_mode ro, basics allowed) is honoured without a word.
    lines = [note.line for note in settings.carried_over]
    assert not any(word in " ".join(lines) for word in ("debug", "prometheus", "gpu"))


def test_the_documented_file_honours_env_algorithm_env_sharing_and_pulls(
    tmp_path: Path,
) -> None:
    settings = load_settings(v4_file(tmp_path, "documented.yaml"))

    omop = next(db for db in settings.databases if db.label == "omop")
    assert omop.env["password"] == "s3cret-omop" and omop.env["cdm_schema"] == "public"
    assert settings.algorithm_env == {"player": "Alice", "rounds": "3"}
    assert settings.share_algorithm_logs is False and settings.share_config is False
    assert settings.executor.model_dump()["pull_policy"] == "always"
    assert settings.policies.allowed_organizations == [6, 7]
    assert [c.registry for c in settings.docker_registries] == ["docker-registry.example.org"]
    assert settings.encryption.enabled


@pytest.mark.parametrize(
    ("pattern", "image", "v4_allows"),
    [
        (r"^harbor2\.vantage6\.ai/[a-zA-Z]+/[a-zA-Z]+", "harbor2.vantage6.ai/demo/avg:1.0", True),
        (r"^harbor2\.vantage6\.ai/[a-zA-Z]+/[a-zA-Z]+", "evil.org/harbor2.vantage6.ai/a/b", False),
        ("harbor2.vantage6.ai/demo/average", "harbor2.vantage6.ai/demo/average", True),
        ("harbor2.vantage6.ai/demo/average", "harbor2.vantage6.ai/demo/average:2.1", True),
        ("harbor2.vantage6.ai/demo/average", "harbor2.vantage6.ai/demo/average-x", False),
        ("harbor2.vantage6.ai/demo/average", "harbor2Xvantage6.ai/demo/average", False),
        ("harbor2.vantage6.ai/demo/average:1.0", "harbor2.vantage6.ai/demo/average:1.0", True),
        ("harbor2.vantage6.ai/demo/average:1.0", "harbor2.vantage6.ai/demo/average:1.1", False),
    ],
)
def test_image_patterns_of_a_v4_file_keep_their_v4_meaning(
    tmp_path: Path, pattern: str, image: str, v4_allows: bool
) -> None:
    path = v4_file(tmp_path, "cli_new.yaml", policies={"allowed_algorithms": [pattern]})

    (written,) = load_settings(path).policies.allowed_algorithms

    assert bool(re.fullmatch(written, image)) is v4_allows


def test_one_image_pattern_given_as_text_is_a_list_of_one(tmp_path: Path) -> None:
    path = v4_file(tmp_path, "cli_new.yaml", policies={"allowed_algorithms": "repo/avg"})

    (written,) = load_settings(path).policies.allowed_algorithms

    assert re.fullmatch(written, "repo/avg:1") and not re.fullmatch(written, "repo/avgx")


def test_a_fednode_file_passes_through_without_notes() -> None:
    settings = load_settings(ROOT / "examples" / "node.yaml")

    assert settings.carried_over == ()
    assert settings.policies.allowed_algorithms == ["localhost/fednode/.*"]


@pytest.mark.parametrize(
    ("extra", "orgs", "named"),
    [
        ({}, "[6, root]", "policies.allowed_organizations[1]: 'root' is a name"),
        (
            {"policies": {"allowed_algorithm_stores": ["https://store.example.org"]}},
            "[]",
            "policies.allowed_algorithm_stores: fednode does not ask algorithm stores",
        ),
        (
            {"algorithm_env": {"HOST": "http://elsewhere"}},
            "[]",
            "algorithm_env.HOST: fednode sets this variable",
        ),
        (
            {"algorithm_env": {"OMOP_DB_PARAM_PASSWORD": "x"}},
            "[]",
            "algorithm_env.OMOP_DB_PARAM_PASSWORD: fednode sets",
        ),
        (
            {"executor": {"kind": "podman", "pull_policy": "never"}},
            "[]",
            "policies.require_algorithm_pull is true, but executor.pull_policy is 'never'",
        ),
    ],
)
def test_real_contradictions_exit_2_naming_the_key_and_the_fix(
    tmp_path: Path, extra: dict[str, Any], orgs: str, named: str
) -> None:
    path = v4_file(tmp_path, "documented.yaml", orgs=orgs)
    values = yaml.safe_load(path.read_text())
    for key, value in extra.items():
        values[key] = value if key != "policies" else {"allowed_algorithms": [], **value}
    path.write_text(yaml.safe_dump(values))

    result = runner.invoke(app, ["config", "check", "-c", str(path)])

    assert result.exit_code == 2, result.output
    problems = result.stderr.strip().splitlines()[1:]
    assert len(problems) == 1, problems
    assert problems[0].strip().startswith(named)


def test_database_env_and_algorithm_env_reach_the_runs_that_should_have_them() -> None:
    omop = DatabaseMount(label="omop", type="omop", uri="jdbc:x", is_local_path=False)
    csv = DatabaseMount(label="default", type="csv", uri=str(CSV), is_local_path=True)

    def environment(requested: list[str]) -> dict[str, str]:
        encoded = container_environment(
            databases=(csv, omop),
            requested=[{"label": label} for label in requested],
            proxy=ProxyEndpoint(host="10.0.0.1", port=7654),
            database_env={"omop": {"user": "admin", "password": "pw"}},
            algorithm_env={"player": "Alice"},
        )
        return {key: decode_value(value) for key, value in encoded.items()}

    asked = environment(["omop"])
    assert asked["OMOP_DB_PARAM_USER"] == "admin" and asked["OMOP_DB_PARAM_PASSWORD"] == "pw"
    assert asked["player"] == "Alice"
    not_asked = environment(["default"])
    assert not any("DB_PARAM" in key for key in not_asked)  # no password for this run
    assert not_asked["player"] == "Alice"


def test_import_prints_a_fednode_file_that_config_check_accepts_without_notes(
    tmp_path: Path,
) -> None:
    v4 = v4_file(tmp_path, "documented.yaml")

    imported = runner.invoke(app, ["config", "import", str(v4)])

    assert imported.exit_code == 0, imported.output
    warnings = imported.stderr.strip().splitlines()
    assert warnings == [f"fednode: warning: {n.line}" for n in load_settings(v4).carried_over]
    assert len(warnings) == 10
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    printed = elsewhere / "fednode.yaml"
    printed.write_text(imported.stdout)
    assert load_settings(printed).carried_over == ()
    checked = runner.invoke(app, ["config", "check", "-c", str(printed)])
    assert checked.exit_code == 0, checked.output
    assert checked.stderr == ""  # nothing left to warn about
    assert load_settings(printed).model_dump() == load_settings(v4).model_dump()


def test_import_of_a_file_that_cannot_be_carried_over_exits_2(tmp_path: Path) -> None:
    v4 = v4_file(tmp_path, "documented.yaml", orgs="[root]")

    imported = runner.invoke(app, ["config", "import", str(v4)])

    assert imported.exit_code == 2
    assert imported.stdout == ""
    assert "'root' is a name" in imported.stderr


def test_config_example_then_check_passes_outside_the_repository(tmp_path: Path) -> None:
    # Exactly what docs/install.md tells a new operator to type, in a folder of their own.
    fednode = Path(sys.executable).with_name("fednode")
    done = subprocess.run(
        f"{fednode} config example > node.yaml && {fednode} config check -c node.yaml",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # quiet: nothing is wrong with the example
    assert not (tmp_path / "tasks").exists()  # checking creates nothing


def test_the_example_names_each_key_once() -> None:
    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader: Strict, node: yaml.MappingNode) -> dict[object, object]:
        keys = [loader.construct_object(key) for key, _ in node.value]
        twice = {key for key in keys if keys.count(key) > 1}
        assert not twice, f"keys given twice: {twice}"
        return dict(loader.construct_pairs(node))

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    assert yaml.load((ROOT / "examples" / "node.yaml").read_text(), Loader=Strict)


def test_contradictions_are_config_errors_not_tracebacks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(v4_file(tmp_path, "documented.yaml", orgs="[6, root]"))
    assert len(refused.value.problems) == 1


@pytest.mark.parametrize("share", [True, False])
async def test_share_config_decides_whether_the_server_hears_the_nodes_policies(
    tmp_path: Path, share: bool
) -> None:
    async with lifecycle_under_test(
        tmp_path, share_config=share, allowed_algorithms=("a/.*",), allowed_organizations=(6,)
    ) as node:
        await node.lifecycle.sync()

    infos = [e.data for e in node.notifier.emitted if e.event == "node_info_update"]
    if share:
        (info,) = infos
        assert info["allowed_algorithms"] == ["a/.*"] and info["allowed_orgs"] == [6]
        assert "allowed_users" not in info  # as the 4.x node: only the lists that are set
    else:
        assert infos == []


def test_a_contradiction_and_a_bad_value_are_reported_together(tmp_path: Path) -> None:
    path = v4_file(tmp_path, "documented.yaml", orgs="[root]")
    path.write_text(path.read_text().replace("port: 443", "port: many"))

    with pytest.raises(ConfigError) as refused:
        load_settings(path)

    assert [problem.split(":")[0] for problem in refused.value.problems] == [
        "policies.allowed_organizations[0]",
        "port",
    ]
