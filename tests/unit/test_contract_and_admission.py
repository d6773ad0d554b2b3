"""The container environment follows the vantage6 4.x contract; admission is vantage6-like."""

from __future__ import annotations

import pytest

from executors.spec import DatabaseMount, ProxyEndpoint, network_address
from node.contract import container_environment, decode_value, encode_value
from policies.admission import (
    Admission,
    AdmissionPolicy,
    Admitted,
    Refused,
    ResourcePolicy,
    ResourceRequest,
)


def test_values_are_base32_with_bang_padding_and_round_trip() -> None:
    assert encode_value("a") == "ME!!!!!!"
    assert decode_value(encode_value("/mnt/task/input")) == "/mnt/task/input"


def test_environment_describes_files_proxy_and_databases() -> None:
    csv = DatabaseMount(label="default", type="csv", uri="/data/a.csv", is_local_path=True)
    sql = DatabaseMount(label="pg", type="sql", uri="postgresql://db/x", is_local_path=False)
    env = container_environment(
        databases=[csv, sql],
        requested=[{"label": "default", "parameters": '{"query": "select 1"}'}],
        proxy=ProxyEndpoint(host="10.0.0.2", port=7654),
        trace_context={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    plain = {k: decode_value(v) for k, v in env.items() if k != "TRACEPARENT"}
    assert plain["INPUT_FILE"] == "/mnt/task/input"
    assert plain["OUTPUT_FILE"] == "/mnt/task/output"
    assert plain["TOKEN_FILE"] == "/mnt/task/token"
    assert (plain["HOST"], plain["PORT"], plain["API_PATH"]) == ("http://10.0.0.2", "7654", "")
    assert plain["USER_REQUESTED_DATABASE_LABELS"] == "default"
    assert plain["DEFAULT_DATABASE_URI"] == "/mnt/data/default/a.csv"
    assert plain["DEFAULT_DATABASE_TYPE"] == "csv"
    assert plain["DEFAULT_QUERY"] == "select 1"
    assert plain["PG_DATABASE_URI"] == "postgresql://db/x"
    assert plain["DB_LABELS"] == "default,pg"
    assert env["TRACEPARENT"].startswith("00-111")


def test_an_ipv6_proxy_address_is_written_in_brackets() -> None:
    env = container_environment(
        databases=[], requested=[], proxy=ProxyEndpoint(host="fd00:10:96::1a", port=7654)
    )
    assert decode_value(env["HOST"]) == "http://[fd00:10:96::1a]"


def policy(**kwargs: object) -> Admission:
    return Admission(AdmissionPolicy.model_validate(kwargs))


def test_image_must_match_an_allowed_pattern() -> None:
    admission = policy(allowed_algorithms=[r"^localhost/fednode/.*$"])
    assert isinstance(
        admission.decide(image="localhost/fednode/average", organization_id=1, user_id=1), Admitted
    )
    refused = admission.decide(image="evil/miner", organization_id=1, user_id=1)
    assert isinstance(refused, Refused) and "policies.allowed_algorithms" in refused.reason


@pytest.mark.parametrize(
    "image",
    [
        "harbor.example/demo/evil",  # a prefix pattern no longer admits what follows it
        "harbor.example/demo/average:1.0-evil",
        "harborXexample/demo/average:1.0",  # an escaped dot matches only a dot
        "harbor.example.attacker.example/demo/average:1.0",
        "attacker.example/harbor.example/demo/average:1.0",
    ],
)
def test_allowed_algorithms_must_match_the_whole_image(image: str) -> None:
    admission = policy(
        allowed_algorithms=["harbor.example/demo/", r"harbor\.example/demo/average:1\.0"]
    )
    assert isinstance(
        admission.decide(image="harbor.example/demo/average:1.0", organization_id=1, user_id=1),
        Admitted,
    )
    refused = admission.decide(image=image, organization_id=1, user_id=1)
    assert isinstance(refused, Refused), image


def test_digest_pinning_refuses_a_tag_and_names_the_setting() -> None:
    admission = policy(require_image_digest=True)
    pinned = "harbor.example/demo/average@sha256:" + "a" * 64
    assert isinstance(admission.decide(image=pinned, organization_id=1, user_id=1), Admitted)
    for image in (
        "harbor.example/demo/average:1.0",
        "harbor.example/demo/average@sha256:" + "a" * 63,
        "harbor.example/demo/average@sha256:" + "A" * 64,
    ):
        refused = admission.decide(image=image, organization_id=1, user_id=1)
        assert isinstance(refused, Refused), image
        assert "policies.require_image_digest" in refused.reason


def test_a_database_the_node_does_not_have_is_refused_with_the_labels_it_has() -> None:
    admission = policy(known_databases=["default", "pg"])
    assert isinstance(
        admission.decide(image="x", organization_id=1, user_id=1, databases=["pg"]), Admitted
    )
    for labels in (["a=b"], ["default", "nope"], [""]):
        refused = admission.decide(image="x", organization_id=1, user_id=1, databases=labels)
        assert isinstance(refused, Refused), labels
        assert "this node does not have (default, pg)" in refused.reason


def test_organization_or_user_lists_allow_either() -> None:
    admission = policy(allowed_organizations=[2], allowed_users=[9])
    assert isinstance(admission.decide(image="x", organization_id=2, user_id=1), Admitted)
    assert isinstance(admission.decide(image="x", organization_id=5, user_id=9), Admitted)
    refused = admission.decide(image="x", organization_id=5, user_id=1)
    assert isinstance(refused, Refused) and "organization 5" in refused.reason


def test_resources_get_defaults_and_caps() -> None:
    admission = Admission(
        AdmissionPolicy(
            resources=ResourcePolicy(
                default_cpu=0.5, default_memory_mb=64, max_gpus=2, max_memory_mb=100
            )
        )
    )
    granted = admission.decide(image="x", organization_id=1, user_id=1)
    assert isinstance(granted, Admitted) and granted.resources.cpu == 0.5
    too_many = admission.decide(
        image="x", organization_id=1, user_id=1, request=ResourceRequest(gpus=3)
    )
    assert isinstance(too_many, Refused) and "at most 2" in too_many.reason


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("postgresql://u:p@db.example:6543/clinic", ("db.example", 6543)),
        ("postgresql+psycopg2://u@10.0.0.5/clinic", ("10.0.0.5", 5432)),
        ("mysql://db/x", ("db", 3306)),
        ("http://[2001:db8::1]/sparql", ("2001:db8::1", 80)),
        ("sqlite:///data/x.db", None),
        ("weird://host/x", None),
        ("http://host:notaport/", None),
    ],
)
def test_a_network_database_uri_names_its_host_and_port(
    uri: str, address: tuple[str, int] | None
) -> None:
    assert network_address(uri) == address
