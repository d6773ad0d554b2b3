"""The byte formats of peering: the relay's envelope, the session messages, the stream frames.

Three layers, each a plain byte string wrapped in the one below:

* **Envelope** — one WebSocket binary message between a node and the relay: a 4-byte
  big-endian node id, then the payload. A node writes the *destination* node's id; the
  relay rewrites it to the *source* node's id (which it authenticated) before forwarding.
  The relay reads nothing else.
* **Session message** — the payload: one kind byte, then ``HELLO``/``REPLY`` (the signed
  handshake, JSON), ``SEALED`` (an AES-GCM ciphertext with its session id and counter) or
  ``REJECT`` (an unauthenticated, informative refusal of a handshake).
* **Stream frame** — the plaintext of a ``SEALED`` message: kind, flags, stream id, body.

Every decoder checks lengths and raises :class:`FrameError`; nothing here trusts a size
it read. The relay's text messages (``welcome``, ``unreachable``) are JSON, see
:mod:`peering.relay`.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

#: The largest data body in one stream frame; bigger writes are split.
MAX_DATA = 16 * 1024
#: The largest WebSocket message a node or the relay accepts (a data frame plus headers).
MAX_MESSAGE = 64 * 1024
#: The largest JSON body of a control frame (OPEN, REFUSE, RESET, HELLO, REPLY).
MAX_JSON = 8 * 1024

_ENVELOPE = struct.Struct(">I")
_SEALED = struct.Struct(">QQ")  # session id, counter
_STREAM = struct.Struct(">BBI")  # kind, flags, stream id
_CREDIT = struct.Struct(">I")


class FrameError(ValueError):
    """Bytes that are not a well-formed frame of this protocol."""


# -- envelope -----------------------------------------------------------------------------


def envelope(node_id: int, payload: bytes) -> bytes:
    if not 0 < node_id < 2**32:
        raise FrameError(f"node id out of range: {node_id}")
    return _ENVELOPE.pack(node_id) + payload


def open_envelope(message: bytes) -> tuple[int, bytes]:
    """``(node id, payload)`` of one envelope."""
    if len(message) < _ENVELOPE.size + 1:
        raise FrameError("envelope too short")
    if len(message) > MAX_MESSAGE:
        raise FrameError(f"envelope of {len(message)} bytes exceeds {MAX_MESSAGE}")
    (node_id,) = _ENVELOPE.unpack_from(message)
    if node_id == 0:
        raise FrameError("envelope names node 0")
    return node_id, message[_ENVELOPE.size :]


# -- session messages ---------------------------------------------------------------------


class MessageKind(enum.IntEnum):
    HELLO = 1
    REPLY = 2
    SEALED = 3
    REJECT = 4


def json_message(kind: MessageKind, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_JSON:
        raise FrameError(f"{kind.name} body of {len(data)} bytes exceeds {MAX_JSON}")
    return bytes([kind]) + data


def sealed_message(session_id: int, counter: int, ciphertext: bytes) -> bytes:
    return bytes([MessageKind.SEALED]) + _SEALED.pack(session_id, counter) + ciphertext


def sealed_header(session_id: int, counter: int) -> bytes:
    """The bytes before the ciphertext: authenticated as associated data."""
    return bytes([MessageKind.SEALED]) + _SEALED.pack(session_id, counter)


@dataclass(frozen=True, slots=True)
class Sealed:
    session_id: int
    counter: int
    header: bytes
    ciphertext: bytes


def message_kind(payload: bytes) -> MessageKind:
    if not payload:
        raise FrameError("empty message")
    try:
        return MessageKind(payload[0])
    except ValueError:
        raise FrameError(f"unknown message kind {payload[0]}") from None


def parse_json(payload: bytes) -> dict[str, Any]:
    """The JSON object of a HELLO, REPLY or REJECT message."""
    body = payload[1:]
    if len(body) > MAX_JSON:
        raise FrameError(f"message body of {len(body)} bytes exceeds {MAX_JSON}")
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise FrameError(f"message body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError("message body is not a JSON object")
    return value


def parse_sealed(payload: bytes) -> Sealed:
    end = 1 + _SEALED.size
    if len(payload) < end + 16:  # the GCM tag alone is 16 bytes
        raise FrameError("sealed message too short")
    session_id, counter = _SEALED.unpack_from(payload, 1)
    return Sealed(session_id, counter, payload[:end], payload[end:])


# -- stream frames ------------------------------------------------------------------------


class FrameKind(enum.IntEnum):
    OPEN = 1  # body: JSON {"src_run", "dst_run", "port"}
    ACCEPT = 2
    REFUSE = 3  # body: JSON {"reason"}
    DATA = 4  # body: bytes, at most MAX_DATA
    CREDIT = 5  # body: 4-byte count of bytes the receiver consumed
    EOF = 6  # the sender will write no more
    RESET = 7  # body: JSON {"reason"}; the stream is gone both ways


#: ``flags`` bit: the frame comes from the side that opened the stream. Each side numbers
#: the streams it opens, so a stream is (peer node, opened here?, id).
FROM_OPENER = 0x01


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    from_opener: bool
    stream_id: int
    body: bytes = b""

    def encode(self) -> bytes:
        flags = FROM_OPENER if self.from_opener else 0
        return _STREAM.pack(self.kind, flags, self.stream_id) + self.body

    def json(self) -> dict[str, Any]:
        if len(self.body) > MAX_JSON:
            raise FrameError(f"{self.kind.name} body exceeds {MAX_JSON} bytes")
        try:
            value = json.loads(self.body)
        except ValueError as exc:
            raise FrameError(f"{self.kind.name} body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise FrameError(f"{self.kind.name} body is not a JSON object")
        return value

    def credit(self) -> int:
        if len(self.body) != _CREDIT.size:
            raise FrameError("CREDIT body must be 4 bytes")
        value: int = _CREDIT.unpack(self.body)[0]
        return value


def decode_frame(plaintext: bytes) -> Frame:
    if len(plaintext) < _STREAM.size:
        raise FrameError("stream frame too short")
    kind_byte, flags, stream_id = _STREAM.unpack_from(plaintext)
    try:
        kind = FrameKind(kind_byte)
    except ValueError:
        raise FrameError(f"unknown stream frame kind {kind_byte}") from None
    body = plaintext[_STREAM.size :]
    if kind is FrameKind.DATA and len(body) > MAX_DATA:
        raise FrameError(f"DATA frame of {len(body)} bytes exceeds {MAX_DATA}")
    return Frame(kind, bool(flags & FROM_OPENER), stream_id, body)


def json_frame(kind: FrameKind, from_opener: bool, stream_id: int, body: dict[str, Any]) -> Frame:
    return Frame(kind, from_opener, stream_id, json.dumps(body, separators=(",", ":")).encode())


def credit_frame(from_opener: bool, stream_id: int, count: int) -> Frame:
    return Frame(FrameKind.CREDIT, from_opener, stream_id, _CREDIT.pack(count))
