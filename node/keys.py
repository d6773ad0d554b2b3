"""The organization's RSA key pair, as ``fednode keys create`` makes it.

vantage6 4.x encrypts task input and results for an organization with RSA-OAEP and the
organization's public key (``node/crypto.py``); ``v6 node create-private-key`` makes the
pair. Here: a 4096-bit key, the private half written as unencrypted PKCS#8 PEM to a file
created with mode 0600 (never more open, not even for a moment: ``O_EXCL`` and the mode at
``open``, or a 0600 temporary file renamed over an existing one with ``overwrite``), the
public half returned as PEM. The node publishes the public key at the server when it
starts (``node/app.py``), so nothing else needs to be uploaded by hand.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KEY_BITS = 4096


class KeyFileExists(FileExistsError):
    """The key file is there already and ``overwrite`` was not asked for."""


def create_private_key(path: Path, *, overwrite: bool = False, bits: int = KEY_BITS) -> str:
    """Write a new private key to ``path`` (mode 0600); return the public key (PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    target = path.with_name(f".{path.name}.tmp") if overwrite else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if overwrite:  # a temporary file left by an interrupted run: replace it
            target.unlink()
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        else:
            raise KeyFileExists(str(path)) from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask
            file.write(private)
        if overwrite:
            target.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
