"""The real podman peer: a podman API service on a private socket, with fednode's images.

``podman_service`` (session scope) starts ``podman system service --time=0`` on a socket
in the session's temporary directory, or reuses the service at
``$FEDNODE_TEST_PODMAN_SOCKET``; waits until ``/_ping`` answers; checks that the locally
built images are there; and stops the service it started at the end of the session. At
the end it also removes the nftables tables the executor made for the default runs'
network (the nodes under test leave them in place when they stop, as a node should).

``podman_gpu_service`` (session scope) starts a second service, on the same storage and
images, in a mount namespace of its own where podman's CDI folder ``/run/cdi`` is a test
folder holding a spec of two STAND-IN GPUs (device nodes that are really ``/dev/null``
and ``/dev/zero``): GPU runs go through real CDI injection on a machine without a GPU.

Podman and the images come from ``scripts/podman-setup``. When either is missing the
tests that use this peer fail with the reason and that command: they are never skipped,
and nothing is mocked.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from executors.podman.config import PodmanSettings
from policies.podman_firewall import removal_ruleset

REPO = Path(__file__).resolve().parents[2]
SETUP_COMMAND = "scripts/podman-setup"
BASE_IMAGE = "localhost/fednode/python-base:latest"
AVERAGE_IMAGE = "localhost/fednode/average:latest"
DIAGNOSTICS_IMAGE = "localhost/fednode/diagnostics:latest"
SECRETSUM_IMAGE = "localhost/fednode/secretsum:latest"
API_PREFIX = "/v4.0.0/libpod"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class PodmanService:
    """A running podman API service and the names of the images built for the tests."""

    socket_path: Path
    base_image: str
    average_image: str
    diagnostics_image: str
    data_dir: Path  # the sample CSVs (employees_a.csv, employees_b.csv)
    secretsum_image: str = SECRETSUM_IMAGE  # peer-to-peer shares (algorithms/secretsum)

    @property
    def url(self) -> str:
        """The service address as podman (``--url``) and the docker SDK spell it."""
        return f"unix://{self.socket_path}"

    def cli(self, *args: str) -> list[str]:
        """A podman command line that goes through this service (podman remote)."""
        return ["podman", "--url", self.url, *args]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._socket_path))
        self.sock = sock


def _status(socket_path: Path, path: str, timeout: float = 5.0) -> int | None:
    """The HTTP status of ``GET path`` on the service, or None when it does not answer."""
    connection = _UnixHTTPConnection(socket_path, timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def _fail(reason: str) -> NoReturn:
    pytest.fail(f"podman peer: {reason}. Run `{SETUP_COMMAND}` first.", pytrace=False)


def _start_service(
    socket_path: Path, *, env: dict[str, str] | None = None, cdi_dir: Path | None = None
) -> subprocess.Popen[bytes]:
    """``podman system service`` on ``socket_path``; with ``cdi_dir``, one that finds its
    CDI specs there (see :func:`start_cdi_service`)."""
    podman = shutil.which("podman")
    if podman is None:
        _fail("podman is not installed")
    command = [str(podman), "system", "service", "--time=0", f"unix://{socket_path}"]
    if cdi_dir is not None:
        command = _in_own_cdi_dir(command, cdi_dir)
    log_path = socket_path.with_name("service.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            # conmon, which the service starts per container, writes a file named ``oom``
            # into its working directory when a container is OOM-killed: not the checkout.
            cwd=socket_path.parent,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while _status(socket_path, "/_ping", timeout=1.0) != 200:
        if process.poll() is not None:
            _fail(
                f"`podman system service` exited with {process.returncode}: "
                f"{log_path.read_text(errors='replace')[-2000:]}"
            )
        if time.monotonic() > deadline:
            _stop_service(process)
            _fail(f"`podman system service` did not answer /_ping within {START_TIMEOUT:.0f} s")
        time.sleep(0.05)
    return process


#: Where podman 4.3 reads CDI specs; it has no setting for another folder (``cdi_spec_dirs``
#: came with podman 4.5).
CDI_RUNTIME_DIR = Path("/run/cdi")


def _in_own_cdi_dir(command: list[str], cdi_dir: Path) -> list[str]:
    """``command`` in a mount namespace of its own where ``/run/cdi`` is ``cdi_dir``.

    podman 4.3 reads CDI specs only from ``/etc/cdi`` and ``/run/cdi``, so the service is
    pointed at the test's folder by a bind mount over ``/run/cdi`` that only it sees (the
    host's ``/run/cdi`` is created, empty, as the mount point, and left empty). Mounts
    propagate into that namespace (``slave``), none out of it.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        _fail("unshare (util-linux) is not installed")
    CDI_RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return [
        unshare,
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        script,
        "sh",
        str(cdi_dir),
        str(CDI_RUNTIME_DIR),
        *command,
    ]


#: The CDI kind of the stand-in GPUs (:func:`podman_gpu_service`).
STAND_IN_GPU_KIND = "fednode-test.example/gpu"
#: Each stand-in GPU's name → the host device node it really is and its numbers.
STAND_IN_GPUS = {"0": ("/dev/null", "1:3"), "1": ("/dev/zero", "1:5")}


@dataclass(frozen=True)
class PodmanGpuService:
    """A podman service whose CDI registry has two stand-in GPUs (no GPU here)."""

    socket_path: Path
    kind: str = STAND_IN_GPU_KIND

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def device(self, name: str) -> str:
        return f"{self.kind}={name}"


#: A FAKE ``nvidia-smi -L``: one line per stand-in GPU file the container was given.
FAKE_NVIDIA_SMI = """#!/bin/sh
# A FAKE nvidia-smi (fednode tests): lists the stand-in GPUs this container was given.
[ "$1" = "-L" ] || { echo "fake nvidia-smi: only -L" >&2; exit 2; }
i=0
for gpu in /run/fakegpu/gpu*; do
  [ -e "$gpu" ] || continue
  echo "GPU $i: Stand-in GPU (UUID: $(cat "$gpu"))"
  i=$((i + 1))
done
"""


def write_stand_in_gpus(folder: Path) -> Path:
    """A CDI spec of two STAND-IN GPUs, in ``folder/specs``; returns that folder.

    Each device makes the edits NVIDIA's generated specs make, with harmless values: a
    device node ``/dev/fakegpu<n>`` (really ``/dev/null`` or ``/dev/zero``), an
    environment variable ``FAKE_GPU_VISIBLE=<n>`` and a bound file ``/run/fakegpu/gpu<n>``
    holding its UUID ``GPU-stand-in-<n>``; and, for every GPU container, a FAKE
    ``nvidia-smi`` at ``/usr/local/bin/nvidia-smi`` (as NVIDIA's spec binds the host's)
    whose ``-L`` lists those files, so ``fednode gpu-check`` runs here too.
    """
    specs = folder / "specs"
    specs.mkdir(exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    devices = []
    for name, (host_node, _) in STAND_IN_GPUS.items():
        id_file = folder / f"gpu{name}"
        id_file.write_text(f"GPU-stand-in-{name}")
        id_file.chmod(0o644)
        edits = {
            "env": [f"FAKE_GPU_VISIBLE={name}"],
            "deviceNodes": [{"path": f"/dev/fakegpu{name}", "hostPath": host_node}],
            "mounts": [_bind(id_file, f"/run/fakegpu/gpu{name}")],
        }
        devices.append({"name": name, "containerEdits": edits})
    spec = {
        "cdiVersion": "0.5.0",
        "kind": STAND_IN_GPU_KIND,
        "devices": devices,
        "containerEdits": {"mounts": [_bind(smi, "/usr/local/bin/nvidia-smi")]},
    }
    (specs / "fednode-test.json").write_text(json.dumps(spec))
    return specs


def _bind(host: Path, container: str) -> dict[str, object]:
    return {"hostPath": str(host), "containerPath": container, "options": ["ro", "bind"]}


@pytest.fixture(scope="session")
def podman_gpu_service(
    podman_service: PodmanService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodmanGpuService]:
    """A second podman service (the same storage and images as ``podman_service``) whose
    CDI specs are a test folder's: two stand-in GPUs (:func:`write_stand_in_gpus`)."""
    folder = tmp_path_factory.mktemp("podman-gpu")
    socket_path = folder / "podman.sock"
    process = _start_service(socket_path, cdi_dir=write_stand_in_gpus(folder))
    try:
        yield PodmanGpuService(socket_path)
    finally:
        _stop_service(process)


def _stop_service(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def podman_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanService]:
    """The podman API service with fednode's images; fails (never skips) when unavailable."""
    process: subprocess.Popen[bytes] | None = None
    reused = os.environ.get("FEDNODE_TEST_PODMAN_SOCKET")
    if reused:
        socket_path = Path(reused)
        if _status(socket_path, "/_ping") != 200:
            _fail(f"no podman service answers on FEDNODE_TEST_PODMAN_SOCKET={reused}")
    else:
        socket_path = tmp_path_factory.mktemp("podman") / "podman.sock"
        process = _start_service(socket_path)
    try:
        images = (BASE_IMAGE, AVERAGE_IMAGE, DIAGNOSTICS_IMAGE, SECRETSUM_IMAGE)
        missing = [
            image
            for image in images
            if _status(socket_path, f"{API_PREFIX}/images/{image}/exists") != 204
        ]
        if missing:
            _fail(f"image(s) missing: {', '.join(missing)}")
        yield PodmanService(
            socket_path=socket_path,
            base_image=BASE_IMAGE,
            average_image=AVERAGE_IMAGE,
            diagnostics_image=DIAGNOSTICS_IMAGE,
            data_dir=REPO / "algorithms" / "data",
        )
    finally:
        if process is not None:
            _stop_service(process)
        _remove_firewall(PodmanSettings().network)


def _remove_firewall(network: str) -> None:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is not None:
        script = removal_ruleset(network)
        subprocess.run([nft, "-f", "-"], input=script, text=True, check=False, capture_output=True)
