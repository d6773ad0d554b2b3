"""The run's container token, sealed by the node, so a restarted node can re-admit the run.

Why this exists: the proxy accepts a run's calls only while the node's run table holds the
run's container token, and that table lives in memory. After a restart the node adopts the
runs still going (:meth:`node.lifecycle.reconcile.Reconciler.reconcile`) and must give the
proxy their tokens again. Podman and apptainer runs keep the token in a file under
``task_dir`` that the node can read back; a Kubernetes run keeps it only in a Secret,
which the node may create and delete but deliberately not read (so the node's credentials
cannot harvest tokens). Rather than widen that, the node seals the token itself before the
run starts and hands the sealed value to the executor as an opaque string
(:attr:`executors.spec.RunSpec.sealed_token`); the executor stores it with the run (a Job
annotation, a container label, the run's record) and hands it back in
:class:`executors.spec.RunState`. Whoever can read those objects sees only ciphertext.

How: AES-256-GCM with a key derived by HKDF-SHA256 from the node's ``api_key`` (the one
secret every node has, and has again after a restart) and a fednode-specific ``info``; a
fresh 96-bit nonce per seal; the run id and task id as associated data, so a sealed value
copied onto another run's object does not open. A rotated ``api_key`` makes older sealed
values unreadable: :meth:`TokenSeal.unseal` then raises :class:`SealError` and the node
falls back to the token file, or says why the run's calls will be refused.

Format: ``v1.`` followed by URL-safe base64 (no padding) of nonce ‖ ciphertext ‖ tag.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Separates this key from anything else derived from the ``api_key``; change with the format.
HKDF_INFO = b"fednode/run-token-seal/v1"
_PREFIX = "v1."
_NONCE_BYTES = 12


class SealError(ValueError):
    """A sealed token that does not open: another key, another run, tampered or malformed."""


class TokenSeal:
    """Seals and unseals container tokens with a key derived from the node's ``api_key``."""

    def __init__(self, *, api_key: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(
            api_key.encode()
        )
        self._aead = AESGCM(key)

    def seal(self, token: str, *, run_id: int, task_id: int) -> str:
        """The token, encrypted and bound to this run; safe to store beside the run."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, token.encode(), _associated(run_id, task_id))
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def unseal(self, sealed: str, *, run_id: int, task_id: int) -> str:
        """The token sealed for this run; :class:`SealError` says why it cannot be had."""
        if not sealed.startswith(_PREFIX):
            raise SealError("not a sealed token of this format (expected 'v1.')")
        body = sealed.removeprefix(_PREFIX)
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError) as exc:
            raise SealError(f"not base64: {exc}") from None
        if len(raw) <= _NONCE_BYTES + 16:
            raise SealError("too short to hold a token")
        nonce, ciphertext = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        try:
            token = self._aead.decrypt(nonce, ciphertext, _associated(run_id, task_id))
        except InvalidTag:
            raise SealError(
                "does not open: sealed for another run, altered, or under another api_key"
            ) from None
        return token.decode()


def _associated(run_id: int, task_id: int) -> bytes:
    return f"fednode run {run_id} task {task_id}".encode()
