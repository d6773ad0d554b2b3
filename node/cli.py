"""The ``fednode`` command: the operator's entry point.

Commands are thin: they parse arguments, call into the node, and turn known failures into
a short message and an exit code (2 for bad configuration or usage; 3 when a running
node stopped because one of its services died, so that a supervisor restarts it), never
a traceback.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer
import yaml

from node import __version__
from node.posture import posture_warnings
from node.settings import (
    ConfigError,
    NodeSettings,
    load_settings,
    read_file_values,
    redacted_dump,
)

EXIT_BAD_CONFIG = 2
#: A service of the running node (socket link, event consumers, token refresher) died.
EXIT_SERVICE_DIED = 3

app = typer.Typer(
    name="fednode",
    help="An async, Kubernetes-native node for federated analytics (vantage6-compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check and explain the node configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
keys_app = typer.Typer(help="The organization's encryption key pair.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="The node configuration file (YAML).", show_default=False),
]


def example_config() -> str:
    """The commented example configuration shipped with the package."""
    return files("node").joinpath("resources/node.example.yaml").read_text(encoding="utf-8")


def load_or_exit(config: Path) -> NodeSettings:
    """Load the configuration, or print one line per problem and exit 2."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"fednode: {config} is not a valid configuration:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from None


@app.command()
def version() -> None:
    """Print fednode's version."""
    typer.echo(f"fednode {__version__}")


@app.command()
def start(config: ConfigOption) -> None:
    """Run the node until SIGTERM/SIGINT (then it shuts down cleanly)."""
    import asyncio

    from node.app import NodeStartError, serve
    from node.background import RootTaskDied
    from node.logging import configure_logging

    settings = load_or_exit(config)
    configure_logging(level=settings.logging.level, fmt=settings.logging.format)
    try:
        asyncio.run(serve(settings))
    except NodeStartError as exc:
        typer.echo(f"fednode: cannot start: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from None
    except RootTaskDied as exc:
        typer.echo(f"fednode: stopped: {exc}", err=True)
        raise typer.Exit(EXIT_SERVICE_DIED) from None


@app.command()
def status(config: ConfigOption) -> None:
    """Ask a running node (its health endpoint) how it is; exit 1 if it is not ready."""
    import json
    import urllib.error
    import urllib.request

    settings = load_or_exit(config)
    host = "127.0.0.1" if settings.health.host in ("0.0.0.0", "::") else settings.health.host
    url = f"http://{host}:{settings.health.port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        typer.echo(f"fednode: no node answers at {url} ({exc})", err=True)
        raise typer.Exit(1) from None
    _print_status(body)
    if not body.get("ready"):
        raise typer.Exit(1)


def _print_status(body: dict[str, object]) -> None:
    """A table on a terminal; ``key: value`` lines otherwise (for scripts and logs)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=False, box=None)
        table.add_column(style="bold", justify="right")
        table.add_column()
        for key, value in body.items():
            table.add_row(key, str(value))
        Console().print(table)
        return
    for key, value in body.items():
        typer.echo(f"{key:>18}: {value}")


RunArgument = Annotated[int, typer.Argument(help="The run's id (as `fednode runs` lists it).")]


def _admin_call(config: Path, method: str, path: str) -> tuple[int, bytes]:
    """One request to the running node's admin socket; exit 1 naming why when none answers."""
    from node.admin_client import AdminUnavailable, call

    settings = load_or_exit(config)
    try:
        return call(settings.admin_socket, method, path)
    except AdminUnavailable as exc:
        typer.echo(f"fednode: {exc}", err=True)
        raise typer.Exit(1) from None


def _admin_error(status: int, body: bytes) -> None:
    import json

    try:
        message = json.loads(body).get("error") or body.decode(errors="replace")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")
    typer.echo(f"fednode: {message} (HTTP {status})", err=True)
    raise typer.Exit(1)


@app.command()
def runs(config: ConfigOption) -> None:
    """List this node's runs: those in flight and those that ended lately, with their ages."""
    import json

    status_code, body = _admin_call(config, "GET", "/runs")
    if status_code != 200:
        _admin_error(status_code, body)
    listed = json.loads(body)["runs"]
    typer.echo(f"{'RUN':>8}  {'TASK':>8}  {'STATUS':<22} {'AGE':>8}  IMAGE")
    for run in listed:
        typer.echo(
            f"{run['run_id']:>8}  {run['task_id']:>8}  {run['status']:<22} "
            f"{_age(run['age_seconds']):>8}  {run['image']}"
        )


def _age(seconds: float) -> str:
    whole = int(seconds)
    if whole < 120:
        return f"{whole}s"
    if whole < 7200:
        return f"{whole // 60}m"
    if whole < 172800:
        return f"{whole // 3600}h"
    return f"{whole // 86400}d"


@app.command()
def logs(run: RunArgument, config: ConfigOption) -> None:
    """Print a run's container log, as the runtime has it now."""
    status_code, body = _admin_call(config, "GET", f"/runs/{run}/log")
    if status_code != 200:
        _admin_error(status_code, body)
    sys.stdout.write(body.decode(errors="replace"))


@app.command()
def kill(run: RunArgument, config: ConfigOption) -> None:
    """Kill one of this node's runs (it ends `killed`, and the server is told)."""
    status_code, body = _admin_call(config, "POST", f"/runs/{run}/kill")
    if status_code != 202:
        _admin_error(status_code, body)
    typer.echo(f"fednode: kill of run {run} requested")


@keys_app.command("create")
def keys_create(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Where to write the private key (PEM, mode 0600)."),
    ] = Path("private_key.pem"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a key file that exists.")
    ] = False,
) -> None:
    """Create the organization's RSA key pair: the private key to a 0600 file, the public
    key to stdout. Point encryption.private_key at the file; the node publishes the public
    key at the server when it starts."""
    from node.keys import KeyFileExists, create_private_key

    try:
        public = create_private_key(out, overwrite=overwrite)
    except KeyFileExists:
        typer.echo(f"fednode: {out} exists; give another --out, or --overwrite", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from None
    except OSError as exc:
        typer.echo(f"fednode: cannot write {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from None
    typer.echo(f"fednode: private key written to {out} (mode 0600)", err=True)
    sys.stdout.write(public)


@app.command("gpu-check")
def gpu_check(
    config: ConfigOption,
    image: Annotated[
        str, typer.Option(help="An image whose entry point writes `nvidia-smi -L` to its output.")
    ],
    runs: Annotated[int, typer.Option(min=1, help="Runs started at once.")] = 2,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs each run asks for.")] = 1,
    timeout: Annotated[float, typer.Option(help="Seconds the runs may take.")] = 300.0,
    executor: Annotated[
        str | None, typer.Option(help="With executors: the one to check (default: the first).")
    ] = None,
) -> None:
    """Check that runs see exactly the GPUs they are given, through this node's executor."""
    import asyncio

    from node.gpu_check import check
    from node.logging import configure_logging

    settings = load_or_exit(config)
    names = [entry.name for entry in settings.executor_entries]
    if executor is not None and executor not in names:
        typer.echo(f"fednode: no executor {executor!r} here (have: {', '.join(names)})", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG)
    configure_logging(level="WARNING", fmt=settings.logging.format)
    verdict = asyncio.run(
        check(settings, image=image, runs=runs, gpus=gpus, seconds=timeout, executor_name=executor)
    )
    for line in verdict.lines:
        typer.echo(line)
    typer.echo(f"gpu-check: {'PASSED' if verdict.passed else 'FAILED'}")
    if not verdict.passed:
        raise typer.Exit(1)


@config_app.command("check")
def config_check(config: ConfigOption) -> None:
    """Validate a configuration; print the effective configuration with secrets redacted."""
    settings = load_or_exit(config)
    for note in settings.carried_over:
        typer.echo(f"fednode: warning: {note.line}", err=True)
    for warning in posture_warnings(settings):
        typer.echo(f"fednode: warning: {warning.message}", err=True)
    typer.echo(f"# {config}: valid. Effective configuration (secrets redacted):")
    typer.echo(yaml.safe_dump(redacted_dump(settings), sort_keys=False).rstrip())


@config_app.command("import")
def config_import(
    v4_config: Annotated[
        Path, typer.Argument(help="A vantage6 4 node configuration file.", show_default=False)
    ],
) -> None:
    """Print the fednode configuration equivalent to a vantage6 4 node.yaml.

    Keys fednode honours are carried over (paths made absolute, so the printed file works
    wherever it is saved); what fednode does instead for the others is said on stderr and
    in the file's first lines. Secrets are printed as the file has them.
    """
    try:
        values, notes = read_file_values(v4_config)
        load_settings(None, **values)  # the printed file must be valid as it is
    except ConfigError as exc:
        typer.echo(f"fednode: {v4_config} cannot be carried over:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from None
    for note in notes:
        typer.echo(f"fednode: warning: {note.line}", err=True)
    header = [f"# fednode configuration carried over from {v4_config.absolute()}"]
    header += [f"# warning: {note.line}" for note in notes]
    header.append("# Check it with:  fednode config check -c <this file>")
    typer.echo("\n".join(header))
    typer.echo(yaml.safe_dump(values, sort_keys=False).rstrip())


@config_app.command("example")
def config_example() -> None:
    """Print a commented example configuration (every key, with its default)."""
    sys.stdout.write(example_config())


@app.command()
def relay(
    server: Annotated[
        str,
        typer.Option(help="The vantage6 server's API URL, e.g. https://v6.example.org/api"),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7800,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run a relay: nodes meet here for algorithm-to-algorithm streams (docs/networking.md)."""
    import asyncio

    from node.logging import configure_logging
    from peering.serve import serve_relay, tls_context

    try:
        tls = tls_context(tls_cert, tls_key)
    except (ValueError, OSError) as exc:
        typer.echo(f"fednode relay: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from None
    configure_logging(level=log_level.upper(), fmt="auto")
    asyncio.run(serve_relay(server_api_url=server.rstrip("/"), host=host, port=port, tls=tls))


def main() -> None:  # pragma: no cover - console-script shim
    app()
