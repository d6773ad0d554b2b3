"""End-to-end encryption of run input and results, byte-compatible with vantage6 4.x.

The server never sees plain input or results of an encrypted collaboration. The sender
encrypts for the receiving organization's RSA public key; the receiver decrypts with its
private key. The wire format is vantage6's hybrid scheme::

    base64(RSA-PKCS1v15(aes_key)) $ base64(iv) $ base64(AES-256-CTR(aes_key, iv, data))

Public keys travel as base64 of the PEM ``SubjectPublicKeyInfo``. In an unencrypted
collaboration the same calls only base64-encode (vantage6's "dummy" cryptor).

Decryption accepts what vantage6's own UI sends, where the AES key and the message may
carry one more base64 layer; encryption produces what the vantage6 Python node produces.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEPARATOR = "$"
AES_KEY_BYTES = 32
IV_BYTES = 16
NOT_OURS = "cannot decrypt: not encrypted for this organization's key, or corrupt"


class CryptoError(ValueError):
    """Data or a key that cannot be used (not this organization's, corrupt, truncated)."""


class Cryptor(Protocol):
    """Encrypts for another organization, decrypts what was encrypted for this one."""

    @property
    def encrypted(self) -> bool: ...

    def encrypt(self, data: bytes, public_key: str | None) -> str: ...

    def decrypt(self, data: str) -> bytes: ...


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=False)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CryptoError(f"not base64: {exc}") from None


class PlainCryptor:
    """Unencrypted collaborations: input and results are only base64-encoded."""

    encrypted = False

    def encrypt(self, data: bytes, public_key: str | None = None) -> str:
        return b64encode(data)

    def decrypt(self, data: str) -> bytes:
        return b64decode(data)


class RSACryptor:
    """Encrypted collaborations: the vantage6 RSA + AES-CTR hybrid scheme."""

    encrypted = True

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._private_key = private_key

    @classmethod
    def from_file(cls, path: Path) -> RSACryptor:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CryptoError(f"cannot load private key {path}: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CryptoError(f"{path} is not an RSA private key")
        return cls(key)

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        """This organization's private key (peering signs its handshakes with it)."""
        return self._private_key

    @property
    def public_key(self) -> str:
        """This organization's public key as the server stores it (base64 of PEM)."""
        pem = self._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return b64encode(pem)

    def encrypt(self, data: bytes, public_key: str | None) -> str:
        if not public_key:
            raise CryptoError("the receiving organization has no public key on the server")
        try:
            receiver = serialization.load_pem_public_key(b64decode(public_key))
        except ValueError as exc:
            raise CryptoError(f"invalid public key: {exc}") from None
        if not isinstance(receiver, rsa.RSAPublicKey):
            raise CryptoError("the receiving organization's key is not an RSA key")
        aes_key = os.urandom(AES_KEY_BYTES)
        iv = os.urandom(IV_BYTES)
        encryptor = Cipher(algorithms.AES(aes_key), modes.CTR(iv)).encryptor()
        body = encryptor.update(data) + encryptor.finalize()
        wrapped_key = receiver.encrypt(aes_key, padding.PKCS1v15())
        return SEPARATOR.join((b64encode(wrapped_key), b64encode(iv), b64encode(body)))

    def decrypt(self, data: str) -> bytes:
        parts = data.split(SEPARATOR, 2)
        if len(parts) != 3:
            raise CryptoError("encrypted data must have three '$'-separated parts")
        wrapped_key, iv, body = (b64decode(part) for part in parts)
        try:
            aes_key = self._private_key.decrypt(wrapped_key, padding.PKCS1v15())
        except ValueError:
            raise CryptoError(
                "cannot unwrap the key: not encrypted for this organization"
            ) from None
        if len(aes_key) != AES_KEY_BYTES:
            # vantage6's UI base64-encodes the AES key before wrapping it.
            aes_key = _maybe_unwrap_base64(aes_key)
        if len(aes_key) != AES_KEY_BYTES or len(iv) != IV_BYTES:
            # PKCS#1 v1.5 with implicit rejection returns random bytes for a foreign key.
            raise CryptoError(NOT_OURS)
        decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(iv)).decryptor()
        plain = decryptor.update(body) + decryptor.finalize()
        return _maybe_unwrap_json_base64(plain)


def _maybe_unwrap_base64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data


def _maybe_unwrap_json_base64(plain: bytes) -> bytes:
    """vantage6's UI base64-encodes messages before encrypting; JSON is never wrapped."""
    try:
        json.loads(plain)
        return plain
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        return base64.b64decode(plain, validate=True)
    except (binascii.Error, ValueError):
        return plain


def cryptor_for(*, encrypted: bool, private_key: Path | None) -> Cryptor:
    """The cryptor a collaboration needs; raises :class:`CryptoError` if it cannot be made."""
    if not encrypted:
        return PlainCryptor()
    if private_key is None:
        raise CryptoError(
            "the collaboration is encrypted but encryption.private_key is not configured"
        )
    return RSACryptor.from_file(private_key)
