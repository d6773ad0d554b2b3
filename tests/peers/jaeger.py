"""The real tracing peer: Jaeger v1.76.0 all-in-one (collector, query API, memory storage).

``jaeger`` (session scope) starts the binary ``scripts/jaeger-setup`` built, on free
loopback ports, as an operator would run a tracing backend that is not on the node's
network: its OTLP/HTTP receiver speaks **TLS only** (a certificate for 127.0.0.1 signed
by a CA made for the session; the node is given that CA). A node that did not verify the
certificate against the given CA would get nothing into it. Tests read what arrived
through Jaeger's query API (``GET /api/traces``), the one its UI uses.

Not multi-tenant: Jaeger v1's multi-tenancy reads the tenant header only on gRPC (its
OTLP/HTTP receiver is built without ``include_metadata``, so every OTLP/HTTP export is
refused 403 "missing tenant header", whatever the client sends — tried). That the node
sends its configured headers is proven against a TLS receiver of the tests' own
(``tests/unit/test_telemetry_export.py``); here the header is sent and ignored.

When the binary is missing the tests fail with that command, never skip.
"""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, NoReturn

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.peers.podman import _stop_service

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "jaeger-setup"
START_TIMEOUT = 60.0
TENANT_HEADER = "x-tenant"
TENANT = "hospital-a"


@dataclass(frozen=True)
class Jaeger:
    """A running Jaeger: where the node exports to, and how a test asks what arrived."""

    #: ``https://127.0.0.1:<port>``: the OTLP/HTTP receiver's base URL.
    otlp_endpoint: str
    #: The CA that signed the receiver's certificate (PEM file).
    ca_file: Path
    #: ``http://127.0.0.1:<port>``: the query API (and UI).
    query_url: str
    tenant: str
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {TENANT_HEADER: self.tenant}

    def get(self, path: str, **params: str) -> Any:
        """``GET`` a query API path as this tenant; the decoded JSON answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        request = urllib.request.Request(f"{self.query_url}{path}{query}", headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def traces(self, *, service: str, tags: dict[str, str]) -> list[dict[str, Any]]:
        """The traces of ``service`` with a span carrying all ``tags`` (Jaeger's search)."""
        found: list[dict[str, Any]] = self.get(
            "/api/traces", service=service, tags=json.dumps(tags), limit="20", lookback="1h"
        )["data"]
        return found

    def wait_for_traces(
        self, *, service: str, tags: dict[str, str], timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """:meth:`traces`, asked again until one is there (spans arrive in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.traces(service=service, tags=tags)
            if found:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"jaeger: no trace of {service} with {tags} within {timeout:.0f} s")
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _fail(reason: str) -> NoReturn:
    pytest.fail(f"jaeger peer: {reason}. Run `scripts/jaeger-setup` first.", pytrace=False)


def _binary() -> Path:
    found = subprocess.run([str(SETUP), "path"], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        _fail("the Jaeger binary is not built")
    return Path(found.stdout.strip())


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fednode test tracing CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    """A real Jaeger with a TLS, multi-tenant OTLP receiver; fails (never skips) without it."""
    binary = _binary()
    root = tmp_path_factory.mktemp("jaeger")
    ca, cert, key = _certificates(root)
    otlp, query, admin = _free_port(), _free_port(), _free_port()
    address = "127.0.0.1:{}".format
    log_path = root / "jaeger.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(binary),
                f"--collector.otlp.http.host-port={address(otlp)}",
                "--collector.otlp.http.tls.enabled=true",
                f"--collector.otlp.http.tls.cert={cert}",
                f"--collector.otlp.http.tls.key={key}",
                f"--collector.otlp.grpc.host-port={address(_free_port())}",
                f"--collector.http-server.host-port={address(_free_port())}",
                f"--collector.grpc-server.host-port={address(_free_port())}",
                f"--query.http-server.host-port={address(query)}",
                f"--query.grpc-server.host-port={address(_free_port())}",
                f"--admin.http.host-port={address(admin)}",
                "--memory.max-traces=10000",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=root,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (_answers(f"http://{address(admin)}/") and _answers(f"http://{address(query)}/")):
            if process.poll() is not None:
                _fail(f"jaeger exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                _fail(f"jaeger did not answer within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)
        yield Jaeger(
            otlp_endpoint=f"https://{address(otlp)}",
            ca_file=ca,
            query_url=f"http://{address(query)}",
            tenant=TENANT,
            log_path=log_path,
        )
    finally:
        _stop_service(process)
