"""runtimed.protocol: frames between daemon and agent (and node and dispatcher)."""
from __future__ import annotations

import asyncio
import os

import pytest

from runtimed import protocol
from runtimed.protocol import HEADER, Frame, ProtocolError


def pipe_with(data: bytes) -> int:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def read_all_blocking(data: bytes) -> list[Frame]:
    fd = pipe_with(data)
    try:
        out = []
        while (f := protocol.read_frame_blocking(fd)) is not None:
            out.append(f)
        return out
    finally:
        os.close(fd)


def read_all_async(data: bytes) -> list[Frame]:
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out = []
        while (f := await protocol.read_frame(reader)) is not None:
            out.append(f)
        return out
    return asyncio.run(go())


FRAMES = [("init", b"\x00\x01pickle\xff" * 100, {"workdir": "/srv"}),
          ("log", "héllo\n".encode(), {"stream": "stderr", "call_id": "call-1"}),
          ("result", b"", {"ok": True, "run_ms": 1.5}),
          ("exit", b"", {})]


@pytest.mark.parametrize("reader", [read_all_blocking, read_all_async])
def test_round_trip(reader):
    data = b"".join(protocol.encode(op, payload, **hdr) for op, payload, hdr in FRAMES)
    frames = reader(data)
    assert [(f.op, f.payload, f.header) for f in frames] == FRAMES
    assert frames[1].get("stream") == "stderr" and frames[1].get("missing", 7) == 7


def test_encode_layout():
    data = protocol.encode("call", b"PAYLOAD", call_id="c1")
    hlen, plen = HEADER.unpack(data[:HEADER.size])
    assert plen == 7 and data.endswith(b"PAYLOAD")
    assert len(data) == HEADER.size + hlen + plen
    f = protocol.decode_body(data[HEADER.size:HEADER.size + hlen], data[HEADER.size + hlen:])
    assert f == Frame("call", {"call_id": "c1"}, b"PAYLOAD")


def test_large_payload_round_trip():
    payload = os.urandom(3 << 20)
    (f,) = read_all_async(protocol.encode("result", payload, ok=True))
    assert f.payload == payload


@pytest.mark.parametrize("hlen, plen", [(protocol.MAX_HEADER + 1, 0),
                                        (10, protocol.MAX_PAYLOAD + 1),
                                        (2**32 - 1, 2**32 - 1)])
def test_oversize_header_refused(hlen, plen):
    prefix = HEADER.pack(hlen, plen)
    with pytest.raises(ProtocolError, match="too large"):
        protocol.decode_header(prefix)
    with pytest.raises(ProtocolError, match="too large"):
        read_all_async(prefix + b"{}")
    with pytest.raises(ProtocolError, match="too large"):
        read_all_blocking(prefix + b"{}")


@pytest.mark.parametrize("bad", [b"not json", b"[1,2]", b'{"no_op": 1}', b'{"op": 3}'])
def test_bad_header_refused(bad):
    data = HEADER.pack(len(bad), 0) + bad
    with pytest.raises(ProtocolError):
        read_all_async(data)
    with pytest.raises(ProtocolError):
        read_all_blocking(data)


def test_clean_eof_is_none():
    assert read_all_async(b"") == []
    assert read_all_blocking(b"") == []


FULL = protocol.encode("call", b"0123456789", call_id="c")


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size + 3, len(FULL) - 10 + 4,
                                 len(FULL) - 1])
def test_eof_inside_a_frame(cut):
    data = protocol.encode("log", b"x") + FULL[:cut]
    with pytest.raises(ProtocolError, match="EOF inside a frame"):
        read_all_async(data)
    with pytest.raises(ProtocolError, match="EOF inside a frame"):
        read_all_blocking(data)


@pytest.mark.parametrize("cut", [HEADER.size, len(FULL) - 10])
def test_eof_at_a_section_boundary_async(cut):
    """Right after the length prefix, or right after the JSON header: still truncated."""
    with pytest.raises(ProtocolError, match="EOF inside a frame"):
        read_all_async(FULL[:cut])


def test_eof_before_payload_blocking():
    with pytest.raises(ProtocolError, match="EOF inside a frame"):
        read_all_blocking(FULL[:len(FULL) - 10])


def test_eof_right_after_prefix_blocking_is_an_error():
    with pytest.raises(ProtocolError):
        read_all_blocking(FULL[:HEADER.size])
