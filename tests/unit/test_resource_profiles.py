"""Resource profiles: which algorithms get what; the caps refuse with the limit named."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from node.server.models import RunStatus
from node.settings import ConfigError, load_settings
from policies.admission import (
    Admission,
    AdmissionPolicy,
    Admitted,
    Refused,
    ResourcePolicy,
    ResourceProfile,
)
from tests.unit.lifecycle_node import behaviour, lifecycle_under_test

TRAIN = ResourceProfile(
    name="train",
    images=(r"harbor\.example/ml/train:.*",),
    cpu=4.0,
    memory_mb=8192,
    gpus=2,
    gpu_type="a100",
    deadline_seconds=3600,
)
SMALL = ResourceProfile(name="small", images=(r"harbor\.example/.*",), memory_mb=256)


def admission(**resources: object) -> Admission:
    policy = ResourcePolicy.model_validate({"max_gpus": 4, "max_cpu": 8.0, **resources})
    return Admission(AdmissionPolicy(resources=policy))


def grant(admission: Admission, image: str) -> Admitted | Refused:
    return admission.decide(image=image, organization_id=1, user_id=1)


def test_the_first_profile_whose_pattern_matches_the_whole_image_gives_the_resources() -> None:
    decide = admission(profiles=(TRAIN, SMALL))

    train = grant(decide, "harbor.example/ml/train:v2")
    small = grant(decide, "harbor.example/ml/other:v1")
    default = grant(decide, "elsewhere.example/harbor.example/ml/train:v2")

    assert isinstance(train, Admitted) and isinstance(small, Admitted)
    assert isinstance(default, Admitted)
    assert train.resources.profile == "train"
    assert (train.resources.cpu, train.resources.memory_mb) == (4.0, 8192)
    assert (train.resources.gpus, train.resources.gpu_type) == (2, "a100")
    assert train.resources.deadline_seconds == 3600
    # What a profile leaves out is the node's default.
    assert (small.resources.profile, small.resources.cpu, small.resources.memory_mb) == (
        "small",
        1.0,
        256,
    )
    assert small.resources.deadline_seconds is None
    # A pattern must match the whole reference, not a part of it.
    assert default.resources.profile is None and default.resources.gpus == 0


def test_a_profile_over_a_cap_is_refused_with_the_cap_and_the_profile_named() -> None:
    refused = grant(admission(profiles=(TRAIN,), max_gpus=1), "harbor.example/ml/train:v2")
    cpu = grant(admission(profiles=(TRAIN,), max_cpu=2.0), "harbor.example/ml/train:v2")
    memory = grant(admission(profiles=(TRAIN,), max_memory_mb=4096), "harbor.example/ml/train:1")

    assert isinstance(refused, Refused)
    assert "policies.resources.max_gpus allows at most 1" in refused.reason
    assert "2 GPU(s) (resource profile 'train')" in refused.reason
    assert isinstance(cpu, Refused) and "policies.resources.max_cpu allows at most 2" in cpu.reason
    assert isinstance(memory, Refused)
    assert "policies.resources.max_memory_mb allows at most 4096 MB" in memory.reason


def test_runs_no_profile_covers_get_the_default_gpus() -> None:
    granted = grant(admission(default_gpus=1), "any/image")

    assert isinstance(granted, Admitted) and granted.resources.gpus == 1
    assert granted.resources.gpu_type is None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(
        f"server_url: http://localhost\napi_key: k\ntask_dir: {tmp_path}\n{text}", "utf-8"
    )
    return path


def test_profiles_are_read_from_the_node_configuration(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            """
policies:
  resources:
    max_gpus: 2
    profiles:
      - name: train
        images: ['harbor\\.example/ml/.*']
        gpus: 2
        gpu_type: a100
        deadline_seconds: 600
""",
        )
    )

    (profile,) = settings.policies.resources.profiles
    assert (profile.name, profile.gpus, profile.gpu_type) == ("train", 2, "a100")
    assert settings.policies.resources.default_gpus == 0


def test_vantage6s_algorithm_device_requests_gives_default_runs_the_gpus_a_run_may_have(
    tmp_path: Path,
) -> None:
    text = "algorithm_device_requests: {gpu: true}\npolicies: {resources: {max_gpus: 2}}"
    settings = load_settings(write(tmp_path, text))

    assert settings.policies.resources.default_gpus == 2
    (note,) = settings.carried_over
    assert note.keys == ("algorithm_device_requests.gpu",)
    assert "GPUs of its own" in note.message
    # gpu: false is fednode's default; GPUs then come from profiles only.
    text = "algorithm_device_requests: {gpu: false}\npolicies: {resources: {max_gpus: 2}}"
    quiet = load_settings(write(tmp_path, text))
    assert quiet.policies.resources.default_gpus == 0 and quiet.carried_over == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "algorithm_device_requests: {gpu: true}",
            "algorithm_device_requests.gpu: true, but policies.resources.max_gpus is 0",
        ),
        (
            "policies: {resources: {profiles: [{name: a, images: ['(']}]}}",
            "not a valid regular expression",
        ),
        (
            "policies: {resources: {profiles: [{name: a, images: [x]}, {name: a, images: [y]}]}}",
            "resource profile name(s) a used more than once",
        ),
        (
            "policies: {resources: {profiles: [{name: a, images: [x], gpu_type: a100}]}}",
            "give it gpus: 1 or more",
        ),
        ("policies: {resources: {default_gpus: 1}}", "default_gpus must not exceed max_gpus"),
    ],
)
def test_a_bad_resource_configuration_names_the_key_and_the_fix(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))

    assert message in str(raised.value)


async def test_a_profiles_run_starts_with_its_resources_shown_in_trace_and_status(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    policy = AdmissionPolicy(
        resources=ResourcePolicy(max_gpus=2, max_cpu=4.0, max_memory_mb=8192, profiles=(TRAIN,))
    )
    async with lifecycle_under_test(
        tmp_path, policy=policy, tracer=provider.get_tracer("test")
    ) as node:
        node.add_run(1, behaviour(sleep=0.3), image="harbor.example/ml/train:v2")
        await node.lifecycle.sync()
        await node.until(lambda: node.runtime.started == [1])
        in_use = node.lifecycle.resources_in_use()
        spec = node.runtime.runs[1].spec

        assert await node.finished(1) == RunStatus.COMPLETED.value

    assert (spec.resources.gpus, spec.resources.gpu_type) == (2, "a100")
    assert (spec.resources.cpu, spec.resources.memory_mb) == (4.0, 8192)
    assert spec.deadline_seconds == 3600
    assert in_use == {"1": "train: 4 CPU, 8192 MB, 2 GPU (a100)"}
    (root,) = [span for span in exporter.get_finished_spans() if span.name == "run"]
    assert root.attributes is not None
    assert root.attributes["fednode.resources.profile"] == "train"
    assert root.attributes["fednode.resources.gpus"] == 2
    assert root.attributes["fednode.resources.gpu_type"] == "a100"
    assert root.attributes["fednode.resources.deadline_seconds"] == 3600


async def test_a_run_over_a_cap_ends_not_allowed_with_the_cap_in_its_log(tmp_path: Path) -> None:
    policy = AdmissionPolicy(resources=ResourcePolicy(max_gpus=1, profiles=(TRAIN,)))
    async with lifecycle_under_test(tmp_path, policy=policy) as node:
        node.add_run(1, behaviour(), image="harbor.example/ml/train:v2")

        await node.lifecycle.sync()

        assert await node.finished(1) == RunStatus.NOT_ALLOWED.value
        assert "policies.resources.max_gpus allows at most 1" in node.log_of(1)
        assert node.runtime.started == []
