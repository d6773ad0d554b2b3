"""Which registry an image is pulled from, and which credential (if any) goes with it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from executors.credentials import RegistryCredential, credential_for, image_registry


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("python:3.12", "docker.io"),
        ("library/python", "docker.io"),
        ("vantage6/algorithm-base", "docker.io"),
        ("docker.io/library/python:3.12", "docker.io"),
        ("index.docker.io/library/python", "docker.io"),
        ("registry-1.docker.io/x/y", "docker.io"),
        ("harbor2.vantage6.ai/demo/average:latest", "harbor2.vantage6.ai"),
        ("Harbor.Example.org:8443/a/b@sha256:" + "0" * 64, "harbor.example.org:8443"),
        ("localhost/fednode/x", "localhost"),
        ("localhost:5000/x", "localhost:5000"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000"),
        ("docker://harbor.example.org/a", "harbor.example.org"),
        ("oras://ghcr.io/a/b:1", "ghcr.io"),
    ],
)
def test_the_registry_of_an_image_follows_dockers_reference_grammar(
    image: str, registry: str
) -> None:
    assert image_registry(image) == registry


def cred(registry: str, user: str = "u") -> RegistryCredential:
    return RegistryCredential(registry=registry, username=user, password="p")


def test_a_credential_goes_only_to_exactly_its_registry() -> None:
    creds = [cred("harbor.example.org", "h"), cred("https://index.docker.io/v1/", "d")]

    assert credential_for("harbor.example.org/demo/x", creds) == creds[0]
    assert credential_for("python:3.12", creds) == creds[1]
    for elsewhere in (
        "attacker.example/x",
        "harbor.example.org.attacker.example/x",  # a look-alike host
        "harbor.example.org:444/x",  # another port is another registry
        "attacker.example/harbor.example.org/x",  # the host only in the path
        "evil-harbor.example.org/x",
    ):
        assert credential_for(elsewhere, creds) is None, elsewhere


@pytest.mark.parametrize(
    "registry", ["harbor.example.org/project", "", "https://", "bad host", "a/b/c"]
)
def test_a_registry_must_be_a_host_or_host_and_port(registry: str) -> None:
    with pytest.raises(ValidationError):
        cred(registry)


def test_the_password_is_never_shown() -> None:
    credential = cred("harbor.example.org")
    assert "p'" not in repr(credential) and "**********" in repr(credential)
