"""Settings: the file is read, the environment wins, and every bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from executors.kubernetes.config import KubernetesSettings
from executors.podman.config import PodmanSettings
from node.settings import ConfigError, load_settings, redacted_dump

API_KEY = "4c6f1d7e-8a39-4b1e-9f0d-2a7c5e3b9d10"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("age\n30\n")
    return path


@pytest.fixture
def minimal(tmp_path: Path) -> str:
    return f"server_url: https://v6.example.org\napi_key: {API_KEY}\ntask_dir: ./tasks\n"


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


def test_valid_file_is_loaded_with_defaults_and_relative_paths_resolved(
    tmp_path: Path, minimal: str, csv_file: Path
) -> None:
    path = write(tmp_path, minimal + "databases:\n  - {label: default, type: csv, uri: data.csv}\n")
    settings = load_settings(path)
    assert settings.server_api_url == "https://v6.example.org:443/api"
    assert settings.task_dir == tmp_path / "tasks"
    assert settings.databases[0].uri == str(csv_file)
    assert isinstance(settings.executor, PodmanSettings)
    assert settings.api_key.get_secret_value() == API_KEY


def test_environment_overrides_beat_the_file(
    tmp_path: Path, minimal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, minimal + "proxy: {port: 7000}\nexecutor: {kind: kubernetes}\n")
    monkeypatch.setenv("FEDNODE_PROXY__PORT", "8123")
    monkeypatch.setenv("FEDNODE_EXECUTOR__PROXY_PORT", "8123")
    monkeypatch.setenv("FEDNODE_EXECUTOR__NAMESPACE", "from-env")
    monkeypatch.setenv("FEDNODE_MAX_CONCURRENT_RUNS", "3")
    settings = load_settings(path)
    assert settings.proxy.port == 8123
    assert isinstance(settings.executor, KubernetesSettings)
    assert settings.executor.namespace == "from-env"
    assert settings.max_concurrent_runs == 3


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope.yaml") == [
        f"{tmp_path / 'nope.yaml'}: configuration file not found"
    ]


def test_bad_yaml_names_line_and_column(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "server_url: [1,\nport: 2\n"))
    assert "not valid YAML at line" in problem


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "- a\n- b\n"))
    assert "expected a mapping" in problem


def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path: Path, minimal: str) -> None:
    (problem,) = problems_of(write(tmp_path, minimal + "proxy: {prot: 1}\n"))
    assert problem.startswith("proxy.prot: unknown key")
    assert "host, keepalive_timeout_seconds" in problem and "max_body_mb, " in problem


def test_wrong_type_names_key_value_and_expectation(tmp_path: Path, minimal: str) -> None:
    (problem,) = problems_of(write(tmp_path, minimal + "port: many\n"))
    assert problem.startswith("port:")
    assert "valid integer" in problem
    assert "'many'" in problem


def test_missing_required_key_says_how_to_set_it(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, f"server_url: https://x.org\napi_key: {API_KEY}\n"))
    assert problems == [
        "task_dir: required key is missing; set 'task_dir' in the file or the environment "
        "variable FEDNODE_TASK_DIR"
    ]


def test_database_file_that_does_not_exist(tmp_path: Path, minimal: str) -> None:
    (problem,) = problems_of(
        write(tmp_path, minimal + "databases:\n  - {label: db, type: csv, uri: gone.csv}\n")
    )
    assert problem.startswith("databases[0].uri: csv file does not exist")
    assert "gone.csv" in problem


def test_unreadable_private_key(tmp_path: Path, minimal: str) -> None:
    (problem,) = problems_of(
        write(tmp_path, minimal + "encryption: {enabled: true, private_key: missing.pem}\n")
    )
    assert problem.startswith("encryption.private_key: private key cannot be read")


def test_readable_private_key_is_accepted(tmp_path: Path, minimal: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path = write(tmp_path, minimal + "encryption: {enabled: true, private_key: key.pem}\n")
    assert load_settings(path).encryption.private_key == tmp_path / "key.pem"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "server_url: nohost\nport: x\nbogus: 1\n"))
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["api_key", "bogus", "port", "server_url", "task_dir"]


def test_secrets_never_appear_in_messages_or_dumps(tmp_path: Path, minimal: str) -> None:
    bad = minimal.replace(API_KEY, "") + "executor: {kind: podman, registry_password: [hunter2]}\n"
    problems = problems_of(write(tmp_path, bad))
    assert not any("hunter2" in p for p in problems)

    good = minimal + (
        "databases:\n  - {label: pg, type: sql, uri: 'postgresql://me:s3cret@db/x'}\n"
        "docker_registries: [{registry: harbor.example.org, username: robot, password: hunter2}]\n"
        "executor:\n  kind: apptainer\n  apptainer_environment:\n"
        "    MY_SERVICE_TOKEN: t0ken-value\n    HTTPS_PROXY: 'http://me:pr0xy-pw@proxy:3128'\n"
        "    LIBRARY_AUTH: libauth-value\n    APPTAINER_CACHEDIR: /var/cache/apptainer\n"
    )
    dumped = redacted_dump(load_settings(write(tmp_path, good)))
    for secret in (API_KEY, "hunter2", "s3cret", "t0ken-value", "pr0xy-pw", "libauth-value"):
        assert secret not in str(dumped)
    # What is not a secret stays readable.
    assert dumped["docker_registries"][0]["username"] == "robot"
    assert dumped["executor"]["apptainer_environment"]["APPTAINER_CACHEDIR"] == (
        "/var/cache/apptainer"
    )


def test_a_credential_for_every_registry_is_refused_with_the_fix(
    tmp_path: Path, minimal: str
) -> None:
    for kind in ("podman", "apptainer"):
        config = minimal + f"executor: {{kind: {kind}, registry_username: robot}}\n"
        (problem,) = problems_of(write(tmp_path, config))
        assert problem.startswith("executor.registry_username: one credential for every")
        assert "docker_registries" in problem
    config = minimal + (
        "executor: {kind: apptainer, apptainer_environment: {APPTAINER_DOCKER_PASSWORD: pw1}}\n"
    )
    (problem,) = problems_of(write(tmp_path, config))
    assert "APPTAINER_DOCKER_PASSWORD would send one credential to every registry" in problem
    assert "pw1" not in problem


def test_docker_registries_hold_one_credential_per_registry_host(
    tmp_path: Path, minimal: str
) -> None:
    config = minimal + (
        "docker_registries:\n"
        "  - {registry: 'https://index.docker.io/v1/', username: a, password: p}\n"
        "  - {registry: 'Harbor.Example.org:8443', username: b, password: p}\n"
    )
    settings = load_settings(write(tmp_path, config))
    assert [c.registry for c in settings.docker_registries] == [
        "docker.io",
        "harbor.example.org:8443",
    ]
    twice = config + "  - {registry: registry-1.docker.io, username: c, password: p}\n"
    (problem,) = problems_of(write(tmp_path, twice))
    assert "registry docker.io has more than one credential" in problem


def test_kubernetes_proxy_port_must_match_the_proxy(tmp_path: Path, minimal: str) -> None:
    (problem,) = problems_of(
        write(tmp_path, minimal + "proxy: {port: 8000}\nexecutor: {kind: kubernetes}\n")
    )
    assert "executor.proxy_port (7654) must equal proxy.port (8000)" in problem


def test_peering_on_kubernetes_needs_the_pod_address_for_its_forwarders(
    tmp_path: Path, minimal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = minimal + (
        "peering: {relay_url: 'wss://relay.example.org/v1/connect', first_port: 7700, ports: 2}\n"
        "executor: {kind: kubernetes, proxy_service: p}\n"
    )
    (problem,) = problems_of(write(tmp_path, config))
    assert "peering.advertise_host is needed" in problem
    assert "FEDNODE_PEERING__ADVERTISE_HOST" in problem
    monkeypatch.setenv("FEDNODE_PEERING__ADVERTISE_HOST", "10.1.2.3")
    settings = load_settings(write(tmp_path, config))
    assert settings.peering.forwarder_ports == (7700, 7701)
    assert load_settings(write(tmp_path, minimal)).peering.forwarder_ports == ()


def test_image_ports_are_checked_rules(tmp_path: Path, minimal: str) -> None:
    bad = minimal + (
        "peering:\n  image_ports:\n"
        "    - {image: 'mpc/(', ports: [{port: 5000}]}\n"
        "    - {image: 'x', ports: [{port: 70000}]}\n"
        "    - {image: 'y', ports: []}\n"
    )
    problems = problems_of(write(tmp_path, bad))
    assert len(problems) == 3
    assert "peering.image_ports[0].image" in problems[0] and "regular expression" in problems[0]
    assert "peering.image_ports[1].ports[0].port" in problems[1]
    assert "peering.image_ports[2].ports" in problems[2]


def test_docker_registries_can_come_from_the_environment_as_json(
    tmp_path: Path, minimal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "FEDNODE_DOCKER_REGISTRIES",
        '[{"registry": "harbor.example.org", "username": "robot", "password": "from-env"}]',
    )
    (credential,) = load_settings(write(tmp_path, minimal)).docker_registries
    assert credential.registry == "harbor.example.org"
    assert credential.password.get_secret_value() == "from-env"


def test_kubernetes_runs_get_the_proxy_services_address_or_advertise_host_not_both(
    tmp_path: Path, minimal: str
) -> None:
    both = "proxy: {advertise_host: 10.0.0.5}\nexecutor: {kind: kubernetes, proxy_service: p}\n"
    (problem,) = problems_of(write(tmp_path, minimal + both))
    assert "give proxy.advertise_host or executor.proxy_service, not both" in problem


def test_otlp_tls_files_are_relative_to_the_file_and_headers_are_secrets(
    tmp_path: Path, minimal: str
) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    (tmp_path / "client.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "client.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    path = write(
        tmp_path,
        minimal + "telemetry:\n  otlp_endpoint: https://otel.example.org:4318\n"
        "  otlp_headers: {x-tenant: hospital-a, authorization: Bearer s3cret-otlp}\n"
        "  otlp_certificate: ca.pem\n  otlp_client_certificate: client.pem\n"
        "  otlp_client_key: client.key\n",
    )
    telemetry = load_settings(path).telemetry
    assert telemetry.otlp_certificate == tmp_path / "ca.pem"
    assert telemetry.otlp_client_key == tmp_path / "client.key"
    assert telemetry.otlp_headers["x-tenant"].get_secret_value() == "hospital-a"
    assert "s3cret-otlp" not in str(redacted_dump(load_settings(path)))


@pytest.mark.parametrize(
    ("telemetry", "expected"),
    [
        (
            "{otlp_endpoint: 'jaeger:4318'}",
            "telemetry.otlp_endpoint: give the receiver's base URL with its scheme",
        ),
        (
            "{otlp_endpoint: 'http://jaeger:4318', otlp_certificate: ca.pem}",
            "telemetry: otlp_certificate/otlp_client_certificate need an https://",
        ),
        (
            "{otlp_endpoint: 'https://jaeger:4318', otlp_client_certificate: ca.pem}",
            "telemetry: give otlp_client_certificate and otlp_client_key together",
        ),
        (
            "{otlp_endpoint: 'https://jaeger:4318', otlp_certificate: gone.pem}",
            "telemetry.otlp_certificate: file cannot be read (No such file or directory)",
        ),
        (
            "{otlp_endpoint: 'https://jaeger:4318', otlp_certificate: node.yaml}",
            "telemetry.otlp_certificate: file is not a PEM file",
        ),
    ],
)
def test_otlp_settings_that_cannot_work_are_one_clear_line(
    tmp_path: Path, minimal: str, telemetry: str, expected: str
) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (problem,) = problems_of(write(tmp_path, minimal + f"telemetry: {telemetry}\n"))
    assert problem.startswith(expected), problem
