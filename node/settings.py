"""The node's configuration: one pydantic model, loaded from YAML with environment overrides.

Keys follow the vantage6 node configuration where one exists (``server_url``, ``port``,
``api_path``, ``api_key``, ``task_dir``, ``databases``, ``encryption``, ``policies``,
``algorithm_env``, ``share_algorithm_logs``, ``share_config``); fednode's own keys
(``executor``, ``proxy``, ``telemetry``, ``logging``, ``max_concurrent_runs``) sit beside
them. A vantage6 4 ``node.yaml`` is read as it is: :mod:`node.settings_v4` first carries
its other keys over (or drops them, each named in a note: :attr:`NodeSettings.carried_over`).

Sources, strongest first: explicit keyword arguments, environment variables
(``FEDNODE_`` prefix, ``__`` between nested keys, e.g. ``FEDNODE_PROXY__PORT=8080``), the
YAML file. Relative paths in the file are relative to the file's own folder.

Every way a configuration can be wrong ends in :class:`ConfigError`, which carries one
line per problem naming the key path, the offending value (secrets redacted) and what is
expected; :mod:`node.cli` prints those lines and exits 2.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    SerializeAsAny,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from executors.apptainer.config import ApptainerSettings
from executors.credentials import RegistryCredential, duplicate_registries
from executors.kubernetes.config import KubernetesSettings
from executors.podman.config import PodmanSettings
from executors.ports import DeclaredPort, ImagePorts
from executors.registry import GROUP as EXECUTOR_GROUP
from executors.registry import available_kinds, load_factory
from node.contract import is_contract_name
from node.redaction import REDACTED, is_secret_name, redact
from node.settings_v4 import CarriedOver, CarryOver, carry_over

ENV_PREFIX = "FEDNODE_"
ENV_NESTED_DELIMITER = "__"


def _pem_file(path: Path, *, what: str, marker: bytes, kind: str) -> Path:
    """``path`` if it can be read and holds ``marker``; else a ValueError saying which."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} cannot be read ({exc.strerror})") from None
    if marker not in data:
        raise ValueError(f"file is not a {kind}")
    return path


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` has one readable line per cause."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    """Base of every nested section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseType(enum.StrEnum):
    """The database types a vantage6 node knows; file-backed ones must exist locally."""

    CSV = "csv"
    PARQUET = "parquet"
    EXCEL = "excel"
    SQL = "sql"
    SPARQL = "sparql"
    OMOP = "omop"
    FOLDER = "folder"
    OTHER = "other"

    @property
    def is_local_path(self) -> bool:
        return self in {
            DatabaseType.CSV,
            DatabaseType.PARQUET,
            DatabaseType.EXCEL,
            DatabaseType.FOLDER,
        }


#: A variable name (or the part of one) an operator may give: letters, digits, underscores.
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _stringified(values: Any) -> Any:
    """Numbers and booleans of an environment map as text, as vantage6 4 passes them."""
    if isinstance(values, Mapping):
        return {
            key: str(value) if isinstance(value, int | float) else value
            for key, value in values.items()
        }
    return values


#: An environment map from the file: names as :data:`_ENV_NAME`, values text.
EnvironmentMap = Annotated[
    dict[Annotated[str, Field(pattern=_ENV_NAME)], str], BeforeValidator(_stringified)
]


class Database(_Section):
    """One data source offered to algorithms under ``label``.

    ``env`` (vantage6 4's key) holds settings only the algorithms that ask for this
    database need, user names and passwords say: a run that requested it gets each as
    ``<LABEL>_DB_PARAM_<KEY>`` (:mod:`node.contract`), other runs do not.
    """

    label: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]
    type: DatabaseType
    uri: str
    env: EnvironmentMap = Field(default_factory=dict)

    @field_validator("uri")
    @classmethod
    def _local_file_exists(cls, uri: str, info: ValidationInfo) -> str:
        kind = info.data.get("type")
        if isinstance(kind, DatabaseType) and kind.is_local_path:
            path = Path(uri)
            if kind is DatabaseType.FOLDER and not path.is_dir():
                raise ValueError("folder does not exist; give an existing folder")
            if kind is not DatabaseType.FOLDER and not path.is_file():
                raise ValueError(f"{kind.value} file does not exist; give the path of the file")
        return uri


class Encryption(_Section):
    """End-to-end encryption of task input and results (vantage6 RSA+AES scheme)."""

    enabled: bool = False
    private_key: Annotated[Path | None, Field(validate_default=True)] = None

    @field_validator("private_key")
    @classmethod
    def _key_readable(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if not info.data.get("enabled"):
            return path
        if path is None:
            raise ValueError("encryption is enabled, so give the path of the PEM private key")
        return _pem_file(path, what="private key", marker=b"PRIVATE KEY", kind="PEM private key")


class ResourceProfileSettings(_Section):
    """What the runs of some algorithms get; a key left out is the node's default."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    #: Regular expressions an image must match as a WHOLE (``re.fullmatch``), as in
    #: ``allowed_algorithms``; the first profile with a matching pattern applies.
    images: Annotated[list[str], Field(min_length=1)]
    cpu: Annotated[float | None, Field(gt=0)] = None
    memory_mb: Annotated[int | None, Field(gt=0)] = None
    gpus: Annotated[int | None, Field(ge=0)] = None
    #: The GPU model, as the executor names it (Kubernetes: the value of
    #: ``executor.gpu_type_label`` on GPU nodes; podman/apptainer: a ``gpu_devices`` type).
    gpu_type: str | None = None
    deadline_seconds: Annotated[int | None, Field(gt=0)] = None

    @field_validator("images")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        return _compiled(patterns)

    @model_validator(mode="after")
    def _type_needs_gpus(self) -> ResourceProfileSettings:
        if self.gpu_type is not None and not self.gpus:
            raise ValueError(f"profile {self.name!r} names a gpu_type; give it gpus: 1 or more")
        return self


class ResourceLimits(_Section):
    """Defaults, per-algorithm profiles and caps for what one run may use.

    The caps are checked at each run on what it would get (its profile's values or the
    defaults): a run over a cap ends ``not allowed`` with the cap named, so lowering a cap
    (``max_gpus: 0`` while the GPUs are serviced) needs no change to the profiles.
    """

    default_cpu: Annotated[float, Field(gt=0)] = 1.0
    default_memory_mb: Annotated[int, Field(gt=0)] = 1024
    #: GPUs for a run no profile covers (a vantage6 4 file's ``algorithm_device_requests:
    #: {gpu: true}`` sets it to ``max_gpus``: :mod:`node.settings_v4`).
    default_gpus: Annotated[int, Field(ge=0)] = 0
    max_cpu: Annotated[float, Field(gt=0)] = 4.0
    max_memory_mb: Annotated[int, Field(gt=0)] = 8192
    max_gpus: Annotated[int, Field(ge=0)] = 0
    default_deadline_seconds: Annotated[int, Field(gt=0)] = 24 * 3600
    #: Per-algorithm resources, first match wins (see :class:`ResourceProfileSettings`).
    profiles: list[ResourceProfileSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> ResourceLimits:
        if self.default_cpu > self.max_cpu:
            raise ValueError("default_cpu must not exceed max_cpu")
        if self.default_memory_mb > self.max_memory_mb:
            raise ValueError("default_memory_mb must not exceed max_memory_mb")
        if self.default_gpus > self.max_gpus:
            raise ValueError("default_gpus must not exceed max_gpus")
        names = [profile.name for profile in self.profiles]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"resource profile name(s) {', '.join(twice)} used more than once")
        return self


def _compiled(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return patterns


class Policies(_Section):
    """Who and what may run here; empty lists mean "no restriction" as in vantage6."""

    #: Regular expressions an image must match as a WHOLE (``re.fullmatch``).
    allowed_algorithms: list[str] = Field(default_factory=list)
    #: Refuse images not pinned by digest (``name@sha256:<64 hex>``).
    require_image_digest: bool = False
    allowed_organizations: list[int] = Field(default_factory=list)
    allowed_users: list[int] = Field(default_factory=list)
    resources: ResourceLimits = Field(default_factory=ResourceLimits)

    @field_validator("allowed_algorithms")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        return _compiled(patterns)


#: The executors fednode ships, by kind. Their settings are validated by their own models
#: without loading the executor (so choosing podman never imports the Kubernetes client).
BUILTIN_EXECUTORS: Mapping[str, type[BaseModel]] = MappingProxyType(
    {"podman": PodmanSettings, "kubernetes": KubernetesSettings, "apptainer": ApptainerSettings}
)
_builtin_executor_settings: TypeAdapter[PodmanSettings | KubernetesSettings | ApptainerSettings]
_builtin_executor_settings = TypeAdapter(
    Annotated[PodmanSettings | KubernetesSettings | ApptainerSettings, Field(discriminator="kind")]
)
#: Error type of the problems with ``executor.kind`` itself; their message is complete.
_KIND_ERROR = "fednode_executor_kind"


def _executor_settings(value: Any) -> BaseModel:
    """Validate ``executor``: the built-in kinds by their models, any other by its plugin's.

    The set of kinds is open, as in any plugin system: a kind that is not built in is looked
    up in the ``fednode.executors`` entry points and validated by that executor's
    ``settings_model``. Errors keep the kind in their location, as pydantic's discriminated
    union does, so :func:`describe_validation_error` can name the model's valid keys.
    """
    if isinstance(value, BaseModel) and "kind" in type(value).model_fields:
        return value  # an already-built settings object (keyword argument or default)
    if not isinstance(value, Mapping):
        raise PydanticCustomError(
            "executor_mapping",
            "expected a mapping with the executor's kind and its settings, e.g. {kind: podman}",
        )
    kind = value.get("kind")
    if kind is None:
        raise _kind_error(
            kind, f"required key is missing; {_kinds_hint()}", input_value=dict(value)
        )
    if isinstance(kind, str) and kind in BUILTIN_EXECUTORS:
        return _builtin_executor_settings.validate_python(value)
    model = _plugin_settings_model(kind)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ValidationError.from_exception_data(
            exc.title,
            [
                InitErrorDetails(
                    type=PydanticCustomError(error["type"], error["msg"]),
                    loc=(kind, *error["loc"]),
                    input=error["input"],
                )
                for error in exc.errors()
            ],
        ) from None


def _plugin_settings_model(kind: Any) -> type[BaseModel]:
    """The ``settings_model`` of the installed executor plugin of ``kind``."""
    if not isinstance(kind, str):
        raise _kind_error(kind, f"expected the name of an executor kind; {_kinds_hint()}")
    try:
        factory = load_factory(kind)
    except LookupError:
        raise _kind_error(
            kind,
            f"{kind!r} is neither built in nor an installed plugin; {_kinds_hint()}",
        ) from None
    except Exception as exc:  # a plugin that cannot even be imported is the operator's to fix
        raise _kind_error(
            kind, f"the executor plugin {kind!r} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from None
    model = getattr(factory, "settings_model", None)
    if not (
        isinstance(model, type) and issubclass(model, BaseModel) and "kind" in model.model_fields
    ):
        raise _kind_error(
            kind,
            f"the executor plugin {kind!r} is broken: its settings_model must be a pydantic "
            "model with a 'kind' field (see docs/executors.md, 'Writing an executor plugin')",
        )
    return model


def _kinds_hint() -> str:
    known = ", ".join(sorted({*BUILTIN_EXECUTORS, *available_kinds()}))
    return (
        f"use one of: {known}, or install a plugin that registers its kind in the "
        f"{EXECUTOR_GROUP!r} entry-point group (docs/executors.md, 'Writing an executor plugin')"
    )


def _kind_error(kind: Any, message: str, *, input_value: Any = None) -> ValidationError:
    """An error located at ``executor.kind`` whose message is the whole story."""
    return ValidationError.from_exception_data(
        "executor",
        [
            InitErrorDetails(
                type=PydanticCustomError(_KIND_ERROR, message),
                loc=("kind",),
                input=kind if input_value is None else input_value,
            )
        ],
    )


#: ``executor``: one of the built-in settings models, or an installed plugin's (any model
#: with a ``kind`` field). Serialised as the model it is, whatever its class.
ExecutorSettings = Annotated[
    PodmanSettings | KubernetesSettings | ApptainerSettings | SerializeAsAny[BaseModel],
    PlainValidator(_executor_settings),
]


#: An executor's name: a label value on its runs (``fednode.io/executor``).
EXECUTOR_NAME = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"


class ExecutorRoute(_Section):
    """Which runs go to an executor of ``executors``; any one rule that matches is enough.

    The executors are tried in order; a run no route matches goes to the first.
    """

    #: Regular expressions an image must match as a WHOLE (``re.fullmatch``).
    images: list[str] = Field(default_factory=list)
    #: Reference schemes: ``oras``, ``library``, ``docker``, ``sif`` (a ``*.sif`` path).
    schemes: list[Literal["oras", "library", "docker", "sif"]] = Field(default_factory=list)
    #: Names of resource profiles (``policies.resources.profiles``) whose runs go here.
    profiles: list[str] = Field(default_factory=list)

    @field_validator("images")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        return _compiled(patterns)


class ExecutorEntry(BaseModel):
    """One item of ``executors``: the executor's own settings plus ``name`` and ``route``.

    Written flat, as ``executor`` is (``{kind: apptainer, name: hpc, route: {...}, binary:
    ...}``); ``name`` defaults to the kind.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=EXECUTOR_NAME)]
    route: ExecutorRoute = Field(default_factory=ExecutorRoute)
    settings: ExecutorSettings

    @model_validator(mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if not isinstance(value, Mapping) or "settings" in value:
            return value
        rest = dict(value)
        name, route = rest.pop("name", None), rest.pop("route", {})
        return {
            "name": name if name is not None else rest.get("kind"),
            "route": route,
            "settings": rest,
        }

    @property
    def kind(self) -> str:
        return str(self.settings.model_dump(include={"kind"})["kind"])


class ProxySettings(_Section):
    """The algorithms' proxy (the only endpoint they may reach).

    With podman the proxy listens on the run network's gateway and ``host`` is not used;
    on Kubernetes it listens on ``host`` (``0.0.0.0``) and runs call the proxy Service's
    ClusterIP (``executor.proxy_service``), or ``advertise_host`` where there is no Service
    (out of a cluster). Give runs an address: on Kubernetes they cannot resolve names.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 7654
    advertise_host: str | None = None
    max_body_mb: Annotated[int, Field(gt=0)] = 16
    upstream_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    #: How long an algorithm's call waits for a server that refuses connections (a server
    #: restart) before it gets 503; vantage6's algorithm client does not retry.
    unreachable_patience_seconds: Annotated[float, Field(ge=0)] = 30.0
    #: Largest answer of the server passed to an algorithm; larger → 502.
    max_response_mb: Annotated[int, Field(gt=0)] = 64
    #: Connections one run may hold open to the proxy; more → 429 and closed.
    max_connections_per_run: Annotated[int, Field(gt=0)] = 32
    #: Idle keep-alive connections of algorithms are closed after this long.
    keepalive_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: Organizations one subtask may name (each needs its public key); more → 400.
    max_task_organizations: Annotated[int, Field(gt=0)] = 256
    #: Request/answer bodies parsed, encrypted or decrypted at once (all runs together).
    max_body_work: Annotated[int, Field(gt=0)] = 4
    #: Organizations' public keys are read again after this long (rotated keys).
    key_cache_seconds: Annotated[float, Field(gt=0)] = 300.0


class DeclaredPortSettings(_Section):
    """One port an image takes peer connections on, as ``EXPOSE`` + ``p<port>`` say."""

    port: Annotated[int, Field(ge=1, le=65535)]
    label: Annotated[str, Field(max_length=64)] | None = None


class ImagePortsRule(_Section):
    """The ports of the images whose name matches ``image`` (whole-name match)."""

    image: str
    ports: Annotated[list[DeclaredPortSettings], Field(min_length=1, max_length=16)]

    @field_validator("image")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value


class PeeringSettings(_Section):
    """Algorithm-to-algorithm connections between organizations, through a relay
    (docs/networking.md). Off unless ``relay_url`` is set; needs the organization's key
    pair (``encryption.private_key``): the two ends of a stream authenticate with it."""

    #: The relay's WebSocket URL, e.g. ``wss://relay.example.org/v1/connect``.
    relay_url: str | None = None
    #: Ports on the proxy's address where a run's peer addresses point, one per
    #: (run, peer run, port) a run looked up; from ``first_port`` on, ``ports`` of them.
    first_port: Annotated[int, Field(ge=1024, le=65535)] = 7700
    ports: Annotated[int, Field(ge=1, le=4096)] = 64
    #: Streams one run may hold (opened and accepted); more are refused.
    max_streams_per_run: Annotated[int, Field(gt=0)] = 64
    #: A stream with no byte either way for this long is reset.
    idle_seconds: Annotated[float, Field(gt=0)] = 600.0
    #: Bytes of one stream in flight (each way): the flow-control window.
    window_kb: Annotated[int, Field(ge=16, le=16384)] = 256
    #: Where runs reach the forwarder ports; ``None``: where they reach the proxy. On
    #: Kubernetes the proxy Service carries only the proxy port, so this is the node pod's
    #: own IP (the chart sets ``FEDNODE_PEERING__ADVERTISE_HOST`` from ``status.podIP``).
    advertise_host: str | None = None
    #: The ports of images whose configuration the executor cannot read (Kubernetes,
    #: apptainer: a SIF has no ``EXPOSE``, and its supervisor must know them first): the
    #: first rule whose ``image`` (a regular expression, whole-name match) matches gives
    #: them; an image no rule matches gets 8888, vantage6 4's default. Podman reads
    #: ``EXPOSE`` and ``p<port>`` labels from the image itself.
    image_ports: list[ImagePortsRule] = Field(default_factory=list)

    @field_validator("relay_url")
    @classmethod
    def _relay_url_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(wss?|https?)://\S+$", value):
            raise ValueError("expected the relay's URL, e.g. 'wss://relay.example.org/v1/connect'")
        return value

    @model_validator(mode="after")
    def _ports_fit(self) -> PeeringSettings:
        if self.first_port + self.ports - 1 > 65535:
            raise ValueError(f"first_port {self.first_port} + ports {self.ports} runs past 65535")
        return self

    @property
    def forwarder_ports(self) -> tuple[int, ...]:
        """The forwarder ports runs must reach; none while peering is off."""
        if self.relay_url is None:
            return ()
        return tuple(range(self.first_port, self.first_port + self.ports))

    @property
    def image_port_rules(self) -> tuple[ImagePorts, ...]:
        """``image_ports`` as executors take them (``ExecutorContext.peer_image_ports``)."""
        return tuple(
            ImagePorts(rule.image, tuple(DeclaredPort(p.port, p.label) for p in rule.ports))
            for rule in self.image_ports
        )


class HealthSettings(_Section):
    """The node's own probe endpoints (/healthz, /readyz, /status); not for algorithms."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 7656
    #: ``/status`` (node, organization and collaboration ids, runs in flight) answers only
    #: calls from the node's own host (loopback) unless this is true; the probes
    #: ``/healthz`` and ``/readyz`` answer anyone who reaches ``host``.
    status_public: bool = False
    #: ``/metrics`` (Prometheus text: counts and timings, no ids) on the same port.
    metrics: bool = True


class AdminSettings(_Section):
    """The operator's local admin endpoint (``fednode runs``/``logs``/``kill``): a unix
    socket, mode 0600, served only to the node's own user (``node/admin.py`` says why)."""

    enabled: bool = True
    #: ``None``: ``admin.sock`` in ``task_dir``.
    socket: Path | None = None


class TelemetrySettings(_Section):
    """OpenTelemetry traces: one trace per run, exported over OTLP/HTTP when configured."""

    #: The receiver's base URL (``http://`` or ``https://``); the node appends ``/v1/traces``.
    otlp_endpoint: str | None = None
    #: Headers sent with every export (an API key, a tenant); the values are secrets.
    otlp_headers: dict[str, SecretStr] = Field(default_factory=dict)
    #: A CA bundle (PEM) that verifies an ``https`` endpoint instead of the system's CAs.
    otlp_certificate: Path | None = None
    #: A client certificate and its key (PEM), for a receiver that asks for one (mTLS).
    otlp_client_certificate: Path | None = None
    otlp_client_key: Path | None = None
    otlp_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    service_name: str = "fednode"
    sampling_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, endpoint: str | None) -> str | None:
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise ValueError(
                "give the receiver's base URL with its scheme, e.g. http://jaeger:4318 or "
                "https://otel.example.org:4318"
            )
        return endpoint

    @field_validator("otlp_certificate", "otlp_client_certificate", "otlp_client_key")
    @classmethod
    def _readable_pem(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        return _pem_file(path, what="file", marker=b"-----BEGIN ", kind="PEM file")

    @model_validator(mode="after")
    def _tls_is_whole(self) -> TelemetrySettings:
        if (self.otlp_client_certificate is None) != (self.otlp_client_key is None):
            raise ValueError("give otlp_client_certificate and otlp_client_key together")
        tls = self.otlp_certificate or self.otlp_client_certificate
        if tls and not (self.otlp_endpoint or "").startswith("https://"):
            raise ValueError(
                "otlp_certificate/otlp_client_certificate need an https:// otlp_endpoint"
            )
        return self


class LoggingSettings(_Section):
    """Structured logs: JSON lines for machines, a readable console for people."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class NodeSettings(BaseSettings):
    """Everything a node needs to run, validated up front."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    name: str = "fednode"
    server_url: str
    port: Annotated[int, Field(ge=1, le=65535)] = 443
    api_path: str = "/api"
    api_key: SecretStr
    task_dir: Path
    databases: list[Database] = Field(default_factory=list)
    encryption: Encryption = Field(default_factory=Encryption)
    policies: Policies = Field(default_factory=Policies)
    #: Registry credentials, one per registry (vantage6's key); each goes only to its own.
    docker_registries: list[RegistryCredential] = Field(default_factory=list)
    executor: ExecutorSettings = Field(default_factory=PodmanSettings)
    #: Several executors, each run going to one by its route (the first is the default);
    #: instead of ``executor``.
    executors: list[ExecutorEntry] | None = None
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    peering: PeeringSettings = Field(default_factory=PeeringSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    max_concurrent_runs: Annotated[int, Field(ge=1)] = 16
    #: A run whose output file is larger fails (``failed``, the sizes in its log) and
    #: nothing of it is uploaded. Bytes, or a size such as ``64MiB``. The node holds a
    #: finishing run's output a few times over (read, encrypted, encoded): size its memory
    #: for about six times this per run finishing at once.
    max_output_bytes: Annotated[ByteSize, Field(ge=1)] = ByteSize(64 * 1024 * 1024)
    #: Of a longer log only the end is kept and uploaded, with a note saying what was cut.
    max_log_bytes: Annotated[ByteSize, Field(ge=1024)] = ByteSize(1024 * 1024)
    #: Extra variables every run's container gets (vantage6 4's key); the contract's own
    #: variables (``HOST``, ``INPUT_FILE``, a database's ...) cannot be given here.
    algorithm_env: EnvironmentMap = Field(default_factory=dict)
    #: false: the server gets no algorithm output in a run's log, only why the run ended;
    #: the log stays in this node's own log (vantage6 4's key and default).
    share_algorithm_logs: bool = True
    #: false: the node does not tell the server its policies and database labels
    #: (``node_info_update``), which collaborators otherwise see (vantage6 4's key).
    share_config: bool = True

    #: What :mod:`node.settings_v4` did with vantage6 4 keys of the file (not a setting).
    _carried_over: tuple[CarriedOver, ...] = PrivateAttr(default=())

    @property
    def admin_socket(self) -> Path:
        """Where the admin endpoint listens (and where the CLI finds it)."""
        return self.admin.socket or self.task_dir / "admin.sock"

    @field_validator("server_url")
    @classmethod
    def _server_url_shape(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/:]+$", value.rstrip("/")):
            raise ValueError(
                "expected the server's scheme and host, e.g. 'https://server.example.org' "
                "(the port goes in 'port', the path in 'api_path')"
            )
        return value.rstrip("/")

    @field_validator("api_path")
    @classmethod
    def _api_path_shape(cls, value: str) -> str:
        return "/" + value.strip("/") if value.strip("/") else ""

    @field_validator("databases")
    @classmethod
    def _labels_unique(cls, databases: list[Database]) -> list[Database]:
        seen: set[str] = set()
        for db in databases:
            if db.label in seen:
                raise ValueError(f"database label {db.label!r} is used twice")
            seen.add(db.label)
        return databases

    @field_validator("docker_registries")
    @classmethod
    def _one_credential_per_registry(
        cls, credentials: list[RegistryCredential]
    ) -> list[RegistryCredential]:
        twice = duplicate_registries(credentials)
        if twice:
            raise ValueError(
                f"registry {', '.join(twice)} has more than one credential; keep one per registry"
            )
        return credentials

    @model_validator(mode="after")
    def _algorithm_env_leaves_the_contract_alone(self) -> NodeSettings:
        labels = [db.label for db in self.databases]
        taken = sorted(name for name in self.algorithm_env if is_contract_name(name, labels))
        if taken:
            raise ValueError(
                f"algorithm_env.{taken[0]}: fednode sets "
                f"{'these variables' if len(taken) > 1 else 'this variable'} "
                f"({', '.join(taken)}) for every run (the vantage6 algorithm contract); "
                "remove it from algorithm_env (a database's settings go in its env)"
            )
        return self

    @model_validator(mode="after")
    def _executors_consistent(self) -> NodeSettings:
        if self.executors is None:
            return self
        if "executor" in self.model_fields_set:
            raise ValueError(
                "give executor (one) or executors (a list), not both; keep the one you use"
            )
        if not self.executors:
            raise ValueError("executors: give at least one executor (the first is the default)")
        names = [entry.name for entry in self.executors]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(
                f"executors: name(s) {', '.join(twice)} used more than once; give each "
                "executor of a kind used twice its own name"
            )
        known = {profile.name for profile in self.policies.resources.profiles}
        for entry in self.executors:
            unknown = sorted(set(entry.route.profiles) - known)
            if unknown:
                raise ValueError(
                    f"executors: {entry.name!r} routes profile(s) {', '.join(unknown)} that "
                    "policies.resources.profiles does not have"
                )
        return self

    @model_validator(mode="after")
    def _proxy_port_agrees(self) -> NodeSettings:
        for entry in self.executor_entries:
            executor = entry.settings
            where = "executor." if self.executors is None else f"executors {entry.name!r}: "
            if (
                isinstance(executor, KubernetesSettings)
                and self.proxy.enabled
                and executor.proxy_port != self.proxy.port
            ):
                raise ValueError(
                    f"{where}proxy_port ({executor.proxy_port}) must equal proxy.port "
                    f"({self.proxy.port}): the runs' NetworkPolicy lets them reach only that port"
                )
            if (
                isinstance(executor, KubernetesSettings)
                and executor.proxy_service is not None
                and self.proxy.advertise_host is not None
            ):
                raise ValueError(
                    f"give proxy.advertise_host or {where}proxy_service, not both: with "
                    "proxy_service runs are given that Service's ClusterIP"
                )
        return self

    @model_validator(mode="after")
    def _forwarders_reachable(self) -> NodeSettings:
        if self.peering.relay_url is None or self.peering.advertise_host is not None:
            return self
        for entry in self.executor_entries:
            if isinstance(entry.settings, KubernetesSettings) and entry.settings.proxy_service:
                raise ValueError(
                    "peering.advertise_host is needed with peering.relay_url on Kubernetes: "
                    "runs reach the proxy through its Service, which carries only the proxy "
                    "port, and the forwarder ports are on the node pod; set it to the pod's "
                    "IP (the Helm chart sets FEDNODE_PEERING__ADVERTISE_HOST from status.podIP)"
                )
        return self

    @property
    def carried_over(self) -> tuple[CarriedOver, ...]:
        """What was done with the vantage6 4 keys of the file: one note per warning line."""
        return self._carried_over

    @property
    def executor_entries(self) -> list[ExecutorEntry]:
        """Every executor with its name and route (``executor`` alone: one, named by kind)."""
        if self.executors is not None:
            return list(self.executors)
        kind = str(self.executor.model_dump(include={"kind"})["kind"])
        return [ExecutorEntry(name=kind, settings=self.executor)]

    @property
    def executor_kind(self) -> str:
        """The (first, default) executor's kind (``podman``, ``kubernetes``, ``apptainer``
        or a plugin's)."""
        return self.executor_entries[0].kind

    @property
    def server_api_url(self) -> str:
        """The server's REST base, e.g. ``https://server.example:443/api``."""
        return f"{self.server_url.rstrip('/')}:{self.port}{self.api_path}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit kwargs > environment > the YAML file being loaded (see load_settings).
        file_source = InitSettingsSource(settings_cls, init_kwargs=dict(_file_values.get()))
        return (init_settings, env_settings, file_source)


#: The values of the YAML file that :func:`load_settings` is loading right now.
_file_values: ContextVar[Mapping[str, Any]] = ContextVar(
    "fednode_file_values", default=MappingProxyType({})
)


def load_settings(path: Path | None = None, **overrides: Any) -> NodeSettings:
    """Read ``path`` (YAML) plus the environment into :class:`NodeSettings`.

    Raises :class:`ConfigError` with one line per problem; never a traceback for bad input.
    """
    carried = _carried_file(path) if path is not None else CarryOver({})
    token = _file_values.set(carried.values)
    try:
        settings = NodeSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(carried.problems + describe_validation_error(exc)) from None
    finally:
        _file_values.reset(token)
    if carried.problems:
        raise ConfigError(carried.problems)
    settings._carried_over = tuple(carried.notes)
    return settings


def read_file_values(path: Path) -> tuple[dict[str, Any], list[CarriedOver]]:
    """The file's values in fednode's keys (vantage6 4 ones carried over), paths absolute.

    What ``fednode config import`` prints; :class:`ConfigError` for what cannot be carried.
    """
    carried = _carried_file(path)
    if carried.problems:
        raise ConfigError(carried.problems)
    return carried.values, carried.notes


def _carried_file(path: Path) -> CarryOver:
    carried = carry_over(_read_yaml(path))
    _resolve_relative_paths(carried.values, base=path.absolute().parent)
    return carried


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: configuration file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{path}: expected a mapping of configuration keys, got {type(data).__name__}"]
        )
    return data


#: Settings keys that hold file-system paths (relative ones are relative to the file).
_PATH_KEYS = {
    ("task_dir",),
    ("encryption", "private_key"),
    ("executor", "kubeconfig"),
    ("executor", "image_cache"),
    ("telemetry", "otlp_certificate"),
    ("telemetry", "otlp_client_certificate"),
    ("telemetry", "otlp_client_key"),
}


def _resolve_relative_paths(values: dict[str, Any], *, base: Path) -> None:
    for keys in _PATH_KEYS:
        holder: Any = values
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(keys[-1]), str):
            holder[keys[-1]] = str(_absolute(holder[keys[-1]], base))
    for entry in values.get("executors") or []:
        for key in ("kubeconfig", "image_cache"):
            if isinstance(entry, dict) and isinstance(entry.get(key), str):
                entry[key] = str(_absolute(entry[key], base))
    executor = values.get("executor")
    if isinstance(executor, dict) and executor.get("kind") not in BUILTIN_EXECUTORS:
        # A plugin's path fields, found by their type: relative to the file as well.
        model = _executor_model(executor.get("kind", ""))
        for name, field in model.model_fields.items() if model is not None else ():
            if _mentions(field.annotation, Path) and isinstance(executor.get(name), str):
                executor[name] = str(_absolute(executor[name], base))
    for db in values.get("databases") or []:
        if isinstance(db, dict) and isinstance(db.get("uri"), str) and "://" not in db["uri"]:
            db["uri"] = str(_absolute(db["uri"], base))


def _absolute(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def describe_validation_error(exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into one operator-readable line each."""
    problems = []
    for error in exc.errors():
        kind = error["type"]
        tagged = list(error["loc"])  # with the executor kind, e.g. executor.kubernetes.x
        loc = _untagged(tagged, kind)
        key = _format_loc(loc)
        if kind == "missing":
            problems.append(f"{key}: required key is missing; {_hint(loc)}")
            continue
        if kind == _KIND_ERROR:
            problems.append(f"{key}: {error['msg']}")
            continue
        value = _redact(tagged, error.get("input"))
        if kind == "extra_forbidden":
            problems.append(f"{key}: unknown key (value {value}); {_known_keys(tagged)}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        if not loc:  # a rule across keys: the message names them
            problems.append(message)
            continue
        problems.append(f"{key}: {message} (got {value})")
    return problems


def _untagged(loc: list[int | str], error_type: str) -> list[int | str]:
    """``loc`` without the executor kind that validation puts after ``executor``.

    Pydantic's discriminated union puts it there for the built-in kinds, and
    :func:`_executor_settings` does the same for plugins; only the errors about the kind
    itself are located without it.
    """
    if len(loc) > 1 and loc[0] == "executor" and error_type != _KIND_ERROR:
        return [loc[0], *loc[2:]]
    if len(loc) > 3 and loc[0] == "executors" and loc[2] == "settings":
        # executors[i].settings.<kind>.key: written flat, as executors[i].key
        return [*loc[:2], *loc[4 if error_type != _KIND_ERROR else 3 :]]
    return loc


def _format_loc(loc: list[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _redact(loc: list[int | str], value: Any) -> str:
    if _is_secret(loc):
        return REDACTED
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_secret(loc: list[int | str]) -> bool:
    """A secret by its name, or by its type (a plugin's ``SecretStr`` field, say)."""
    if any(is_secret_name(str(part)) for part in loc):
        return True
    model = _model_at(loc[:-1]) if loc and isinstance(loc[-1], str) else None
    field = model.model_fields.get(str(loc[-1])) if model is not None else None
    return field is not None and _mentions(field.annotation, SecretStr)


def _mentions(annotation: Any, wanted: type) -> bool:
    if annotation is wanted:
        return True
    return any(_mentions(arg, wanted) for arg in getattr(annotation, "__args__", ()))


def _model_at(loc: list[int | str]) -> type[BaseModel] | None:
    """The settings model at a (tagged) location, if there is one."""
    model: type[BaseModel] | None = NodeSettings
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if model is None or isinstance(part, int):
            continue
        if model is NodeSettings and part == "executor":
            model = _executor_model(parts.pop(0)) if parts else None
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _section_of(field.annotation)
    return model


def _executor_model(kind: object) -> type[BaseModel] | None:
    """The settings model of an executor kind, built in or installed; None if neither."""
    if not isinstance(kind, str):
        return None
    if kind in BUILTIN_EXECUTORS:
        return BUILTIN_EXECUTORS[kind]
    try:
        model = getattr(load_factory(kind), "settings_model", None)
    except Exception:  # described already, by the error about executor.kind
        return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _section_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_of(arg)
        if found is not None:
            return found
    return None


def _known_keys(loc: list[int | str]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "remove it"
    return "remove it or use one of: " + ", ".join(sorted(model.model_fields))


def _hint(loc: list[int | str]) -> str:
    key = str(loc[-1]) if loc else ""
    env = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p).upper() for p in loc if isinstance(p, str))
    return f"set '{key}' in the file or the environment variable {env}"


def redacted_dump(settings: NodeSettings) -> dict[str, Any]:
    """The effective configuration as plain data, with every secret replaced by ``***``."""
    dumped: dict[str, Any] = redact(settings.model_dump(mode="json"))
    return dumped
