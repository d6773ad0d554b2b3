"""End-to-end sessions between two nodes: what makes the relay blind.

The relay forwards a node's messages under the node identity it authenticated; it cannot
read them or forge them. Each pair of nodes agrees on a session:

1. The initiator sends ``HELLO``: a fresh session id, its organization id and a fresh
   X25519 public key, signed (RSA-PSS, SHA-256) with its **organization's private key** —
   the key whose public half the vantage6 server already publishes for the organization
   (``GET /organization/<id>``, ``public_key``), so no new PKI is needed.
2. The responder fetches that organization's public key from the server (through a
   :class:`PeerDirectory`), verifies the signature, and answers ``REPLY`` with its own
   X25519 key, signed over both keys. The session then knows the peer's organization
   *cryptographically*: streams are admitted against it (the run that opens one must be
   that organization's), not against what the relay says.
3. Both derive two AES-256-GCM keys (one per direction) with HKDF-SHA256 from the X25519
   secret, salted with the hash of the signed transcript. Every ``SEALED`` message carries
   the session id and a counter; the counter is the GCM nonce and must grow, so a message
   replayed or reordered by the relay is refused. The node ids of both ends are
   authenticated as associated data, so a message cannot be redirected to another node.

A handshake that fails names why (unknown organization, no public key, bad signature)
in a ``REJECT`` and in the node's log; no stream is opened without a session.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.logging import get_logger
from peering.frames import (
    FrameError,
    MessageKind,
    json_message,
    message_kind,
    parse_json,
    parse_sealed,
    sealed_header,
    sealed_message,
)

log = get_logger(__name__)

PROTOCOL = b"fednode-peering-v1"
_IDS = struct.Struct(">IIIQ")  # from node, to node, organization, session id
_NODES = struct.Struct(">II")
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
#: A session is used for at most this many messages per direction, then renewed.
MAX_MESSAGES = 2**40


class SessionError(Exception):
    """A handshake or message that fails authentication; the reason is for the log."""


class _UnknownSession(SessionError):
    def __init__(self, peer: int, session_id: int) -> None:
        super().__init__(f"unknown session {session_id:#x} from node {peer}")
        self.session_id = session_id


class PeerDirectory(Protocol):
    """The organizations' published keys (the node answers from its server link)."""

    async def public_key(self, organization_id: int) -> rsa.RSAPublicKey:
        """The organization's published public key; raises ``LookupError`` if it has none."""


Send = Callable[[int, bytes], Awaitable[None]]


@dataclass
class _Session:
    session_id: int
    peer: int
    send_key: AESGCM
    receive_key: AESGCM
    send_direction: bytes
    receive_direction: bytes
    organization: int  # the peer's, proven by its signature
    sent: int = 0
    received: int = -1


@dataclass
class _Pending:
    session_id: int
    secret: X25519PrivateKey
    hello: bytes  # the signed transcript of our HELLO
    done: asyncio.Future[_Session] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > 2048:
        raise SessionError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:
        raise SessionError(f"{what} is not base64") from None


def _transcript(
    step: bytes, sender: int, receiver: int, organization: int, session_id: int, *keys: bytes
) -> bytes:
    """What a HELLO (``step`` b"hello") or REPLY (b"reply") signs: the protocol, who sends
    to whom for which organization and session, and the X25519 keys so far."""
    return (
        PROTOCOL
        + b" "
        + step
        + _IDS.pack(sender, receiver, organization, session_id)
        + b"".join(keys)
    )


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _int(value: Any, what: str, *, bits: int = 32) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**bits:
        raise SessionError(f"{what} is not a valid id")
    return value


class Sessions:
    """This node's sessions with its peers: handshakes, sealing and opening messages."""

    def __init__(
        self,
        *,
        node_id: int,
        organization_id: int,
        private_key: rsa.RSAPrivateKey,
        directory: PeerDirectory,
        send: Send,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.node_id = node_id
        self.organization_id = organization_id
        self._private_key = private_key
        self._directory = directory
        self._send = send
        self._handshake_timeout = handshake_timeout
        self._current: dict[int, _Session] = {}  # peer -> the session we send with
        self._by_id: dict[tuple[int, int], _Session] = {}  # (peer, session id) -> session
        self._pending: dict[int, _Pending] = {}  # peer -> our handshake under way
        self._send_locks: dict[int, asyncio.Lock] = {}
        #: Called with (peer, reason) when the sessions with a peer are dropped; the
        #: stream layer ends that peer's streams.
        self.on_peer_lost: Callable[[int, str], None] = lambda peer, reason: None

    # -- sending ------------------------------------------------------------------------

    async def seal_to(self, peer: int, plaintext: bytes) -> None:
        """Encrypt ``plaintext`` for ``peer`` and send it, agreeing on a session first."""
        lock = self._send_locks.setdefault(peer, asyncio.Lock())
        async with lock:
            session = self._current.get(peer)
            if session is None or session.sent >= MAX_MESSAGES:
                session = await self._handshake(peer)
            counter = session.sent
            session.sent += 1
            header = sealed_header(session.session_id, counter)
            nonce = session.send_direction + counter.to_bytes(8, "big")
            aad = header + _NODES.pack(self.node_id, peer)
            ciphertext = session.send_key.encrypt(nonce, plaintext, aad)
            await self._send(peer, sealed_message(session.session_id, counter, ciphertext))

    async def _handshake(self, peer: int) -> _Session:
        pending = self._pending.get(peer)
        if pending is None:
            session_id = int.from_bytes(os.urandom(8), "big") or 1
            secret = X25519PrivateKey.generate()
            transcript = _transcript(
                b"hello",
                self.node_id,
                peer,
                self.organization_id,
                session_id,
                _raw(secret.public_key()),
            )
            pending = _Pending(session_id, secret, transcript)
            self._pending[peer] = pending
            hello = {
                "session": session_id,
                "organization": self.organization_id,
                "key": _b64(_raw(secret.public_key())),
                "signature": _b64(self._sign(transcript)),
            }
            await self._send(peer, json_message(MessageKind.HELLO, hello))
        try:
            return await asyncio.wait_for(asyncio.shield(pending.done), self._handshake_timeout)
        except TimeoutError:
            raise SessionError(f"node {peer} did not answer the handshake") from None
        finally:
            if self._pending.get(peer) is pending and pending.done.done():
                del self._pending[peer]
            elif self._pending.get(peer) is pending and not pending.done.done():
                # Timed out: forget it so the next try starts afresh.
                pending.done.cancel()
                del self._pending[peer]

    def _sign(self, transcript: bytes) -> bytes:
        return self._private_key.sign(transcript, _PSS, hashes.SHA256())

    # -- receiving ----------------------------------------------------------------------

    async def receive(self, peer: int, payload: bytes) -> tuple[bytes, int] | None:
        """Handle one message from ``peer`` (as the relay names it).

        Returns the plaintext of a ``SEALED`` message with the organization that signed the
        session it came in; handshakes are answered here and return ``None``. Raises
        :class:`SessionError` for a message that fails checks (the caller logs it and drops
        the message) and :class:`FrameError` for bytes that are not a message at all.
        """
        kind = message_kind(payload)
        if kind is MessageKind.SEALED:
            try:
                return self._open(peer, payload)
            except _UnknownSession as exc:
                # We restarted (or forgot it): tell the peer to agree on a new one.
                await self._reject(peer, exc.session_id, "unknown session")
                raise
        if kind is MessageKind.HELLO:
            await self._answer(peer, parse_json(payload))
        elif kind is MessageKind.REPLY:
            await self._complete(peer, parse_json(payload))
        else:
            body = parse_json(payload)
            self.forget(peer, reason=str(body.get("reason", "refused"))[:200])
        return None

    def _open(self, peer: int, payload: bytes) -> tuple[bytes, int]:
        sealed = parse_sealed(payload)
        session = self._by_id.get((peer, sealed.session_id))
        if session is None:
            raise _UnknownSession(peer, sealed.session_id)
        if sealed.counter <= session.received:
            raise SessionError(f"replayed or reordered message from node {peer}")
        nonce = session.receive_direction + sealed.counter.to_bytes(8, "big")
        aad = sealed.header + _NODES.pack(peer, self.node_id)
        try:
            plaintext = session.receive_key.decrypt(nonce, sealed.ciphertext, aad)
        except InvalidTag:
            raise SessionError(f"a message from node {peer} failed authentication") from None
        session.received = sealed.counter
        return plaintext, session.organization

    async def _verify(
        self, peer: int, body: dict[str, Any], transcript_of: Callable[[int, bytes], bytes]
    ) -> tuple[int, bytes, bytes]:
        """(organization, the peer's X25519 key, the transcript it signed), once verified."""
        organization = _int(body.get("organization"), "organization")
        key = _unb64(body.get("key"), "key")
        if len(key) != 32:
            raise SessionError("key is not an X25519 public key")
        signature = _unb64(body.get("signature"), "signature")
        try:
            public_key = await self._directory.public_key(organization)
        except LookupError as exc:
            raise SessionError(f"organization {organization} has no usable key: {exc}") from None
        transcript = transcript_of(organization, key)
        try:
            public_key.verify(signature, transcript, _PSS, hashes.SHA256())
        except InvalidSignature:
            raise SessionError(
                f"node {peer}'s handshake is not signed by organization {organization}'s key"
            ) from None
        return organization, key, transcript

    async def _answer(self, peer: int, body: dict[str, Any]) -> None:
        session_id = _int(body.get("session"), "session", bits=64)
        try:
            organization, their_key, hello = await self._verify(
                peer,
                body,
                lambda org, key: _transcript(b"hello", peer, self.node_id, org, session_id, key),
            )
        except SessionError as exc:
            await self._reject(peer, session_id, str(exc))
            raise
        secret = X25519PrivateKey.generate()
        reply = _transcript(
            b"reply",
            self.node_id,
            peer,
            self.organization_id,
            session_id,
            their_key,
            _raw(secret.public_key()),
        )
        session = self._derive(peer, session_id, secret, their_key, hello + reply, initiator=False)
        session.organization = organization
        self._by_id[(peer, session_id)] = session
        answer = {
            "session": session_id,
            "organization": self.organization_id,
            "key": _b64(_raw(secret.public_key())),
            "signature": _b64(self._sign(reply)),
        }
        await self._send(peer, json_message(MessageKind.REPLY, answer))
        # A peer that starts a new session has lost the old one (e.g. it restarted).
        if peer not in self._pending:
            self._current[peer] = session
        log.info("peering.session.accepted", peer=peer, session=f"{session_id:#x}")

    async def _complete(self, peer: int, body: dict[str, Any]) -> None:
        pending = self._pending.get(peer)
        session_id = _int(body.get("session"), "session", bits=64)
        if pending is None or pending.session_id != session_id or pending.done.done():
            raise SessionError(f"node {peer} answered a handshake we did not start")
        ours = _raw(pending.secret.public_key())
        try:
            organization, their_key, reply = await self._verify(
                peer,
                body,
                lambda org, key: _transcript(
                    b"reply", peer, self.node_id, org, session_id, ours, key
                ),
            )
        except SessionError as exc:
            pending.done.set_exception(exc)
            pending.done.exception()  # retrieved: the waiter may have timed out
            raise
        session = self._derive(
            peer, session_id, pending.secret, their_key, pending.hello + reply, initiator=True
        )
        session.organization = organization
        self._by_id[(peer, session_id)] = session
        self._current[peer] = session
        pending.done.set_result(session)
        log.info("peering.session.established", peer=peer, session=f"{session_id:#x}")

    def _derive(
        self,
        peer: int,
        session_id: int,
        secret: X25519PrivateKey,
        their_key: bytes,
        transcript: bytes,
        *,
        initiator: bool,
    ) -> _Session:
        shared = secret.exchange(X25519PublicKey.from_public_bytes(their_key))
        keys = HKDF(
            algorithm=hashes.SHA256(),
            length=64,
            salt=hashlib.sha256(transcript).digest(),
            info=PROTOCOL + b" keys",
        ).derive(shared)
        forward, backward = AESGCM(keys[:32]), AESGCM(keys[32:])
        out_dir, in_dir = (b"\0\0\0\1", b"\0\0\0\2") if initiator else (b"\0\0\0\2", b"\0\0\0\1")
        if initiator:
            return _Session(session_id, peer, forward, backward, out_dir, in_dir, 0)
        return _Session(session_id, peer, backward, forward, out_dir, in_dir, 0)

    async def _reject(self, peer: int, session_id: int, reason: str) -> None:
        message = json_message(MessageKind.REJECT, {"session": session_id, "reason": reason[:200]})
        try:
            await self._send(peer, message)
        except (ConnectionError, FrameError) as exc:
            log.info("peering.reject_not_sent", peer=peer, error=str(exc))

    def forget(self, peer: int, *, reason: str) -> None:
        """Drop every session with ``peer`` (it refused us, restarted or is gone)."""
        self._current.pop(peer, None)
        for key in [key for key in self._by_id if key[0] == peer]:
            del self._by_id[key]
        pending = self._pending.pop(peer, None)
        if pending is not None and not pending.done.done():
            pending.done.set_exception(SessionError(f"node {peer} refused: {reason}"))
            pending.done.exception()
        log.info("peering.session.forgotten", peer=peer, reason=reason)
        self.on_peer_lost(peer, reason)
