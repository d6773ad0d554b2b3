"""fednode's crypto against vantage6-common 4.15.2's own cryptors, both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.crypto import CryptoError, PlainCryptor, RSACryptor
from tests.peers.v6client import V6UserClient

pytestmark = pytest.mark.v6server

PAYLOAD = json.dumps({"method": "partial_average", "kwargs": {"column_name": "age"}}).encode()


@pytest.fixture(scope="module")
def org_key(v6_user: V6UserClient, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "org.pem"
    v6_user.generate_key(path)  # made by vantage6 itself
    return path


def test_vantage6_encrypted_input_decrypts_in_fednode(v6_user: V6UserClient, org_key: Path) -> None:
    ours = RSACryptor.from_file(org_key)
    assert ours.public_key == v6_user.public_key_of(org_key)
    ciphertext = v6_user.encrypt(PAYLOAD, ours.public_key, kind="rsa")
    assert ours.decrypt(ciphertext) == PAYLOAD


def test_fednode_encrypted_result_decrypts_in_vantage6(
    v6_user: V6UserClient, org_key: Path
) -> None:
    public_key = v6_user.public_key_of(org_key)
    ciphertext = RSACryptor.from_file(org_key).encrypt(PAYLOAD, public_key)
    assert v6_user.decrypt(ciphertext, org_key, kind="rsa") == PAYLOAD


def test_unencrypted_collaborations_are_base64_both_ways(v6_user: V6UserClient) -> None:
    plain = PlainCryptor()
    assert plain.decrypt(v6_user.encrypt(PAYLOAD, None, kind="dummy")) == PAYLOAD
    assert v6_user.decrypt(plain.encrypt(PAYLOAD), None, kind="dummy") == PAYLOAD


def test_data_for_another_organization_is_a_clear_error(
    v6_user: V6UserClient, org_key: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.pem"
    other_public = v6_user.generate_key(other)
    ciphertext = v6_user.encrypt(PAYLOAD, other_public, kind="rsa")
    with pytest.raises(CryptoError, match="not encrypted for this organization"):
        RSACryptor.from_file(org_key).decrypt(ciphertext)
