"""A run's container token, sealed by the node: opens only for that run, under that api_key."""

from __future__ import annotations

import base64

import pytest

from node.token_seal import SealError, TokenSeal

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOnsidGFza19pZCI6MzR9fQ.c2lnbmF0dXJl"


def test_a_sealed_token_opens_for_its_run_and_does_not_show_the_token() -> None:
    seal = TokenSeal(api_key="node-api-key")
    sealed = seal.seal(TOKEN, run_id=12, task_id=34)

    assert TOKEN not in sealed
    assert sealed.isascii() and " " not in sealed  # fits a label or an annotation
    assert TokenSeal(api_key="node-api-key").unseal(sealed, run_id=12, task_id=34) == TOKEN


def test_each_seal_is_different_even_for_the_same_token() -> None:
    seal = TokenSeal(api_key="node-api-key")
    assert seal.seal(TOKEN, run_id=12, task_id=34) != seal.seal(TOKEN, run_id=12, task_id=34)


@pytest.mark.parametrize(("run_id", "task_id"), [(13, 34), (12, 35)])
def test_a_token_sealed_for_one_run_does_not_open_for_another(run_id: int, task_id: int) -> None:
    seal = TokenSeal(api_key="node-api-key")
    sealed = seal.seal(TOKEN, run_id=12, task_id=34)
    with pytest.raises(SealError, match="another run"):
        seal.unseal(sealed, run_id=run_id, task_id=task_id)


def test_an_altered_sealed_token_is_refused() -> None:
    seal = TokenSeal(api_key="node-api-key")
    sealed = seal.seal(TOKEN, run_id=12, task_id=34)
    body = sealed.removeprefix("v1.")
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[20] ^= 0x01
    tampered = "v1." + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(SealError, match="altered"):
        seal.unseal(tampered, run_id=12, task_id=34)


def test_a_token_sealed_under_another_api_key_is_refused() -> None:
    sealed = TokenSeal(api_key="the old api key").seal(TOKEN, run_id=12, task_id=34)
    with pytest.raises(SealError, match="another api_key"):
        TokenSeal(api_key="the rotated api key").unseal(sealed, run_id=12, task_id=34)


@pytest.mark.parametrize("sealed", ["", "t0ken", "v1.", "v1.%%%", "v1.AAAA"])
def test_what_is_not_a_sealed_token_is_refused_with_a_reason(sealed: str) -> None:
    with pytest.raises(SealError):
        TokenSeal(api_key="node-api-key").unseal(sealed, run_id=12, task_id=34)
