"""Frames between the node daemon and the in-container agent.

The channel is the container's stdin (daemon -> agent) and a private dup of its
stdout (agent -> daemon): plain pipes, which CRIU checkpoints and `runc restore`
re-attaches to fresh pipes (PLATFORM.md), so a restored agent can re-handshake.

A frame is `>II` (header length, payload length), a JSON header, then raw
payload bytes (pickles travel as payload, never inside JSON). The daemon is root
and never unpickles anything the container sends: payloads are opaque bytes that
it stores and hands to the SDK, which does the unpickling in the user's process.
This module is imported by the agent, so it uses the standard library only.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

HEADER = struct.Struct(">II")
MAX_HEADER = 1 << 20          # 1 MiB of JSON is already absurd
MAX_PAYLOAD = 1 << 30         # 1 GiB: arguments/results above this belong in a volume


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


@dataclass(frozen=True)
class Frame:
    op: str
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def encode(op: str, payload: bytes = b"", **header: Any) -> bytes:
    header["op"] = op
    raw = json.dumps(header, separators=(",", ":")).encode()
    return HEADER.pack(len(raw), len(payload)) + raw + payload


def decode_header(prefix: bytes) -> tuple[int, int]:
    hlen, plen = HEADER.unpack(prefix)
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large (header {hlen} B, payload {plen} B)")
    return hlen, plen


def decode_body(raw_header: bytes, payload: bytes) -> Frame:
    try:
        header = json.loads(raw_header)
    except ValueError as e:
        raise ProtocolError(f"bad frame header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError("frame header must be an object with a string 'op'")
    return Frame(header.pop("op"), header, payload)


def read_frame_blocking(fd: int) -> Frame | None:
    """Read one frame from a blocking fd; None on clean EOF (agent side)."""
    import os

    def exact(n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                if buf:
                    raise ProtocolError("EOF inside a frame")
                return None
            buf += chunk
        return bytes(buf)

    prefix = exact(HEADER.size)
    if prefix is None:
        return None
    hlen, plen = decode_header(prefix)
    raw = exact(hlen) if hlen else b""
    payload = exact(plen) if plen else b""
    if raw is None or payload is None:
        raise ProtocolError("EOF inside a frame")
    return decode_body(raw, payload)


async def read_frame(reader) -> Frame | None:
    """Read one frame from an asyncio.StreamReader; None on clean EOF (daemon side)."""
    import asyncio

    try:
        prefix = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("EOF inside a frame") from None
        return None
    hlen, plen = decode_header(prefix)
    try:
        raw = await reader.readexactly(hlen)
        payload = await reader.readexactly(plen) if plen else b""
    except asyncio.IncompleteReadError:
        raise ProtocolError("EOF inside a frame") from None
    return decode_body(raw, payload)
