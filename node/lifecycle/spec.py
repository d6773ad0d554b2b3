"""From the server's run to the executor's :class:`~executors.spec.RunSpec`, without I/O.

:func:`build_spec` is the one place that decides what a run's container gets: the run's
ids and image, its decrypted input, its token (and the sealed copy the executor keeps with
the run), the vantage6 environment (databases, proxy address, trace context), the
resources the admission policy granted (the run's resource profile) and its deadline
(the profile's, else the node's). It is pure — everything it
needs is handed to it — so what a run is started with is testable without a server, a
runtime or an event loop. :class:`LifecycleConfig` holds the node-level facts it reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pydantic import SecretStr

from executors.spec import DatabaseMount, ProxyEndpoint, Resources, RunSpec
from node.contract import container_environment
from node.executor_set import LABEL_EXECUTOR, Routes
from node.server.models import NodeIdentity, Run
from policies.admission import Admitted


@dataclass(frozen=True)
class LifecycleConfig:
    """The node-level facts the lifecycle needs, fixed at start-up."""

    identity: NodeIdentity
    databases: tuple[DatabaseMount, ...]
    proxy: ProxyEndpoint | None
    max_concurrent_runs: int
    deadline_seconds: int
    executor_kind: str
    task_dir: Path
    allowed_algorithms: tuple[str, ...] = ()
    allowed_organizations: tuple[int, ...] = ()
    allowed_users: tuple[int, ...] = ()
    #: Each database's ``env`` by label: ``<LABEL>_DB_PARAM_*`` of the runs that ask for it.
    database_env: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    #: The node's ``algorithm_env``: every run gets these variables.
    algorithm_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: false: uploads carry no algorithm output in the run's log (``share_algorithm_logs``).
    share_algorithm_logs: bool = True
    #: false: the node does not send the server its policies and labels (``share_config``).
    share_config: bool = True
    #: With several executors (``executors:``): which run goes where, and the proxy
    #: address each one's runs are told (``proxy`` is the default executor's).
    routes: Routes | None = None
    proxies: Mapping[str, ProxyEndpoint] = field(default_factory=dict)

    def proxy_for(self, executor: str | None) -> ProxyEndpoint | None:
        """The proxy address a run on ``executor`` is told (None: no proxy)."""
        if self.proxy is None:
            return None
        return self.proxies.get(executor or "", self.proxy)


def build_spec(
    run: Run,
    *,
    config: LifecycleConfig,
    admitted: Admitted,
    input_bytes: bytes,
    token: str,
    sealed_token: str,
    trace_context: dict[str, str],
    executor: str | None = None,
) -> RunSpec:
    """What the executor is asked to start for ``run``, as the admission policy allowed it.

    ``sealed_token`` is ``token`` as :class:`node.token_seal.TokenSeal` sealed it: the
    executor keeps it with the run so that a restarted node gets the token back even where
    it may not read it from the runtime (Kubernetes Secrets).
    """
    task = run.task
    granted = admitted.resources
    proxy = config.proxy_for(executor)
    return RunSpec(
        run_id=run.id,
        task_id=task.id,
        organization_id=config.identity.organization_id,
        collaboration_id=config.identity.collaboration_id,
        parent_task_id=task.parent.id if task.parent else None,
        image=task.image,
        input=input_bytes,
        token=SecretStr(token),
        environment=container_environment(
            databases=config.databases,
            requested=[db.model_dump() for db in task.databases],
            proxy=proxy,
            trace_context=trace_context,
            database_env=config.database_env,
            algorithm_env=config.algorithm_env,
        ),
        databases=config.databases,
        requested_databases=tuple(dict.fromkeys(db.label for db in task.databases if db.label)),
        resources=Resources(
            cpu=granted.cpu,
            memory_mb=granted.memory_mb,
            gpus=granted.gpus,
            gpu_type=granted.gpu_type,
        ),
        deadline_seconds=granted.deadline_seconds or config.deadline_seconds,
        proxy=proxy,
        trace_context=trace_context,
        sealed_token=sealed_token,
        labels={LABEL_EXECUTOR: executor} if executor else {},
    )


def describe_resources(resources: Resources, *, profile: str | None) -> str:
    """One line saying what a run was given, e.g. ``gpu-train: 2 CPU, 4096 MB, 1 GPU (a100)``."""
    gpus = ""
    if resources.gpus:
        gpus = f", {resources.gpus} GPU" + (
            f" ({resources.gpu_type})" if resources.gpu_type else ""
        )
    return f"{profile or '(defaults)'}: {resources.cpu:g} CPU, {resources.memory_mb} MB{gpus}"
