"""What a valid but exposed configuration is warned about, and who may read ``/status``."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from node.health import is_loopback, make_health_app
from node.posture import posture_warnings
from node.settings import load_settings

FEDNODE = Path(sys.executable).with_name("fednode")
PEM = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "node.yaml"
    path.write_text("server_url: https://v6.example.org\napi_key: k\ntask_dir: ./tasks\n" + extra)
    return path


def test_an_empty_allow_list_is_warned_about_once_and_a_set_one_is_not(tmp_path: Path) -> None:
    (warning,) = posture_warnings(load_settings(write_config(tmp_path)))
    assert warning.event == "node.any_image_allowed"
    assert "any collaborator can run any image" in warning.message

    listed = "policies: {allowed_algorithms: ['harbor\\\\.example/demo/.*']}\n"
    assert posture_warnings(load_settings(write_config(tmp_path, listed))) == []


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, True), (0o644, True)])
def test_a_private_key_others_may_read_is_warned_about(
    tmp_path: Path, mode: int, warned: bool
) -> None:
    key = tmp_path / "org.pem"
    key.write_text(PEM)
    key.chmod(mode)
    extra = (
        "policies: {allowed_algorithms: [x]}\n"
        f"encryption: {{enabled: true, private_key: {key}}}\n"
    )
    found = posture_warnings(load_settings(write_config(tmp_path, extra)))
    assert [w.event for w in found] == (["node.private_key_readable_by_others"] if warned else [])
    if warned:
        assert f"chmod 600 {key}" in found[0].message


def test_config_check_prints_the_warnings_on_stderr(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(FEDNODE), "config", "check", "-c", str(write_config(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fednode: warning: policies.allowed_algorithms is empty" in proc.stderr


@pytest.mark.parametrize(
    ("remote", "local"),
    [
        ("127.0.0.1", True),
        ("127.5.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        (None, True),  # a unix socket peer
        ("10.0.0.7", False),
        ("192.0.2.2", False),
        ("::ffff:10.0.0.7", False),
        ("not-an-address", False),
    ],
)
def test_loopback_peers_are_recognised(remote: str | None, local: bool) -> None:
    assert is_loopback(remote) is local


def outside_address() -> str:
    """An address of this host that is not loopback (where a pod's probes arrive)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
        address = str(probe.getsockname()[0])
    assert not address.startswith("127."), "this host has no address but loopback"
    return address


@pytest.fixture
async def health_on_all_addresses() -> AsyncIterator[int]:
    app = make_health_app(status=lambda: {"ready": True, "missing": [], "node_id": 7})
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)  # a TCPSite listens through asyncio
    yield int(server.sockets[0].getsockname()[1])
    await runner.cleanup()


async def test_status_answers_only_loopback_while_the_probes_answer_anyone(
    health_on_all_addresses: int,
) -> None:
    port, outside = health_on_all_addresses, outside_address()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/status") as local:
            assert local.status == 200 and (await local.json())["node_id"] == 7
        async with http.get(f"http://{outside}:{port}/status") as remote:
            assert remote.status == 403
            assert "node_id" not in await remote.text()
        for probe in ("/healthz", "/readyz"):
            async with http.get(f"http://{outside}:{port}{probe}") as answer:
                assert answer.status == 200, probe
