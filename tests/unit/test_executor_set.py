"""Several executors in one node: routes pick one per run; the set finds each run's
executor again after a restart. The executors are the in-memory test executor (the real
runtimes side by side: tests/integration/test_executor_set.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from executors.base import ProxyPlacement
from executors.spec import Phase, RunSpec
from node.app import listen_hosts
from node.executor_set import LABEL_EXECUTOR, ExecutorSet, Route, Routes, scheme_of
from node.server.models import RunStatus
from node.settings import ConfigError, load_settings
from policies.admission import AdmissionPolicy, ResourcePolicy, ResourceProfile
from tests.fakes.memory_executor import MemoryExecutor, MemoryRuntime
from tests.unit.lifecycle_node import behaviour, lifecycle_under_test

ROUTES = Routes(
    [
        Route(name="cluster"),
        Route(name="hpc", schemes=("oras", "library", "sif")),
        Route(name="gpu", images=(r"harbor\.example/ml/.*",), profiles=("training",)),
    ]
)


def test_a_run_goes_to_the_first_executor_whose_route_matches_else_the_first() -> None:
    assert ROUTES.choose(image="oras://ghcr.io/org/algo:1", profile=None) == "hpc"
    assert ROUTES.choose(image="library://org/algo/avg:1", profile=None) == "hpc"
    assert ROUTES.choose(image="avg.sif", profile=None) == "hpc"
    assert ROUTES.choose(image="harbor.example/ml/train:2", profile=None) == "gpu"
    assert ROUTES.choose(image="harbor.example/stats/avg:1", profile="training") == "gpu"
    assert ROUTES.choose(image="harbor.example/stats/avg:1", profile=None) == "cluster"
    assert ROUTES.choose(image="docker://harbor.example/stats/avg:1", profile=None) == "cluster"
    assert [scheme_of(i) for i in ("a/b:1", "docker://a/b", "x.sif")] == ["docker"] * 2 + ["sif"]


def test_the_proxy_listens_where_every_executors_runs_reach_it() -> None:
    podman = ProxyPlacement("10.213.0.1", "10.213.0.1", freebind=True)
    apptainer = ProxyPlacement("127.0.0.1", "127.0.0.1")
    kubernetes = ProxyPlacement("0.0.0.0", "10.96.0.12", advertise_port=80)

    assert listen_hosts([podman, apptainer]) == [("10.213.0.1", True), ("127.0.0.1", False)]
    assert listen_hosts([podman, kubernetes]) == [("0.0.0.0", False)]


def spec(run_id: int, executor: str) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        task_id=run_id,
        organization_id=1,
        collaboration_id=1,
        image="x",
        input=behaviour(sleep=30),
        token=SecretStr("t"),
        labels={LABEL_EXECUTOR: executor},
    )


async def test_the_set_starts_each_run_on_its_executor_and_finds_it_again_after_a_restart(
    tmp_path: Path,
) -> None:
    a, b = MemoryRuntime(task_dir=tmp_path / "a"), MemoryRuntime(task_dir=tmp_path / "b")
    first = ExecutorSet({"a": MemoryExecutor(a), "b": MemoryExecutor(b)}, default="a")
    await first.open()
    await first.start(spec(1, "a"))
    await first.start(spec(2, "b"))
    events = aiter(first.events())
    seen = {(e.run_id, e.phase) for e in [await anext(events), await anext(events)]}
    await first.close()

    restarted = ExecutorSet({"a": MemoryExecutor(a), "b": MemoryExecutor(b)}, default="a")
    await restarted.open()
    listed = sorted(state.run_id for state in await restarted.list_runs())
    await restarted.kill(2)
    async for end in restarted.events():
        if end.phase.is_terminal:
            break
    await restarted.close()

    assert seen == {(1, Phase.STARTING), (2, Phase.STARTING)}
    assert (a.started, b.started) == ([1], [2])
    assert listed == [1, 2]
    assert restarted.executor_of(2) == "b"
    assert (end.run_id, end.phase) == (2, Phase.KILLED)
    assert a.runs[1].phase is Phase.RUNNING
    for runtime in (a, b):
        await runtime.aclose()


async def test_a_node_with_two_executors_routes_runs_and_names_the_executor_everywhere(
    tmp_path: Path,
) -> None:
    main, hpc = MemoryRuntime(task_dir=tmp_path / "t"), MemoryRuntime(task_dir=tmp_path / "t")
    executors = ExecutorSet(
        {"main": MemoryExecutor(main), "hpc": MemoryExecutor(hpc)}, default="main"
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    training = ResourceProfile(name="training", images=(r".*train.*",), cpu=2.0)
    policy = AdmissionPolicy(resources=ResourcePolicy(profiles=(training,)))
    routes = Routes(
        [Route(name="main"), Route(name="hpc", schemes=("sif",), profiles=("training",))]
    )
    async with lifecycle_under_test(
        tmp_path,
        runtime=main,
        executor=executors,
        routes=routes,
        policy=policy,
        tracer=provider.get_tracer("test"),
    ) as node:
        node.add_run(1, behaviour(sleep=0.5), image="avg.sif")
        node.add_run(2, behaviour(sleep=0.5), image="harbor.example/avg:1")
        node.add_run(3, behaviour(sleep=0.5), image="harbor.example/train:1")
        await node.lifecycle.sync()
        await node.until(lambda: len(main.started) + len(hpc.started) == 3)
        shown = node.lifecycle.resources_in_use()

        statuses = await asyncio.gather(*(node.finished(run_id) for run_id in (1, 2, 3)))

    assert statuses == [RunStatus.COMPLETED.value] * 3
    assert (sorted(hpc.started), main.started) == ([1, 3], [2])
    assert shown["1"].startswith("[hpc] (defaults)") and shown["2"].startswith("[main]")
    assert shown["3"].startswith("[hpc] training: 2 CPU")
    roots = {
        span.attributes["fednode.run_id"]: span.attributes["fednode.executor"]
        for span in exporter.get_finished_spans()
        if span.name == "run" and span.attributes is not None
    }
    assert roots == {1: "hpc", 2: "main", 3: "hpc"}
    await hpc.aclose()


BASE = {"server_url": "http://x", "api_key": "k"}


def test_executors_are_configured_as_a_list_of_executor_settings_with_name_and_route(
    tmp_path: Path,
) -> None:
    settings = load_settings(
        None,
        **BASE,
        task_dir=tmp_path,
        executors=[
            {"kind": "podman"},
            {"kind": "apptainer", "name": "hpc", "route": {"schemes": ["oras", "sif"]}},
        ],
    )
    single = load_settings(None, **BASE, task_dir=tmp_path)

    assert [(e.name, e.kind) for e in settings.executor_entries] == [
        ("podman", "podman"),
        ("hpc", "apptainer"),
    ]
    assert settings.executor_entries[1].route.schemes == ["oras", "sif"]
    assert settings.executor_kind == "podman"
    assert [(e.name, e.kind) for e in single.executor_entries] == [("podman", "podman")]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"executors": [{"kind": "podman", "bogus": 1}]}, "executors[0].bogus: unknown key"),
        ({"executors": [{"kind": "podman"}] * 2}, "name(s) podman used more than once"),
        (
            {"executors": [{"kind": "podman"}], "executor": {"kind": "podman"}},
            "give executor (one) or executors (a list), not both",
        ),
        ({"executors": []}, "give at least one executor"),
        (
            {"executors": [{"kind": "podman", "route": {"profiles": ["gpu"]}}]},
            "routes profile(s) gpu that policies.resources.profiles does not have",
        ),
        ({"executors": [{"kind": "podman", "route": {"schemes": ["ftp"]}}]}, "schemes"),
    ],
)
def test_a_bad_executors_list_names_the_item_and_the_fix(
    tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, **BASE, task_dir=tmp_path, **values)

    assert message in str(raised.value)
