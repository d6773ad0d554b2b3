"""The libpod client's byte-level helpers, without podman."""

from __future__ import annotations

import base64
import json
import struct

from executors.credentials import RegistryCredential
from executors.podman.api import demultiplex, registry_auth


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def test_multiplexed_logs_become_stdout_and_stderr_in_order() -> None:
    data = frame(1, b"1000 ") + frame(1, b"\n") + frame(2, b"oops\n") + frame(1, b"done\n")

    assert demultiplex(data) == b"1000 \noops\ndone\n"


def test_a_log_that_is_not_multiplexed_is_returned_as_it_is() -> None:
    assert demultiplex(b"plain text log\n") == b"plain text log\n"
    assert demultiplex(b"") == b""


def test_registry_credentials_are_base64_json_keyed_by_their_registry() -> None:
    credential = RegistryCredential(
        registry="harbor.example.org", username="robot", password="s3cret"
    )

    header = registry_auth(credential)

    assert json.loads(base64.urlsafe_b64decode(header)) == {
        "harbor.example.org": {"username": "robot", "password": "s3cret"}
    }
