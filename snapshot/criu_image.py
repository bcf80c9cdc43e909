"""CRIU image framing and the little protobuf the node needs to read and patch images.

An image file is an 8-byte magic prefix (common magic + the image's own magic; the
inventory has only its own 4 bytes) followed by messages, each a little-endian u32 length
and a protobuf body (criu/images/*.proto).
Only what the node patches is decoded: everything else is carried through byte for byte.
"""
from __future__ import annotations

import os
import struct


class ImageError(ValueError):
    pass


def varint(b: bytes, i: int) -> tuple[int, int]:
    r = shift = 0
    while True:
        if i >= len(b):
            raise ImageError("truncated varint")
        c = b[i]
        i += 1
        r |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return r, i


def enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(msg: bytes) -> list[tuple[int, int, bytes]]:
    """(field number, wire type, the field's raw bytes incl. its key) in order."""
    out, i = [], 0
    while i < len(msg):
        start = i
        key, i = varint(msg, i)
        wt = key & 7
        if wt == 0:
            _, i = varint(msg, i)
        elif wt == 1:
            i += 8
        elif wt == 2:
            n, i = varint(msg, i)
            i += n
        elif wt == 5:
            i += 4
        else:
            raise ImageError(f"unsupported wire type {wt}")
        if i > len(msg):
            raise ImageError("truncated field")
        out.append((key >> 3, wt, msg[start:i]))
    return out


def varint_fields(msg: bytes) -> dict[int, int]:
    """A message of varint fields only (pagemap entries) as {field: value}."""
    out = {}
    for num, wt, raw in fields(msg):
        if wt != 0:
            raise ImageError(f"unexpected wire type {wt} in field {num}")
        out[num] = varint(raw, varint(raw, 0)[1])[0]
    return out


def read_messages(data: bytes, magic_len: int = 8) -> tuple[bytes, list[bytes]]:
    """(magic prefix, message bodies). inventory.img has only its own 4-byte magic."""
    if len(data) < magic_len:
        raise ImageError("image too short")
    prefix, i, msgs = data[:magic_len], magic_len, []
    while i < len(data):
        if i + 4 > len(data):
            raise ImageError("truncated message length")
        (n,) = struct.unpack_from("<I", data, i)
        if i + 4 + n > len(data):
            raise ImageError("truncated message")
        msgs.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return prefix, msgs


def write_messages(prefix: bytes, msgs: list[bytes]) -> bytes:
    out = bytearray(prefix)
    for m in msgs:
        out += struct.pack("<I", len(m)) + m
    return bytes(out)


def with_varint(msg: bytes, num: int, value: int) -> bytes:
    """`msg` with varint field `num` set to `value` (replacing any occurrence)."""
    kept = b"".join(raw for n, _, raw in fields(msg) if n != num)
    return kept + enc_varint(num << 3) + enc_varint(value)


# -- inventory.img -------------------------------------------------------------------------
INVENTORY = "inventory.img"
INVENTORY_MAGIC = 0x58313116         # criu/include/magic.h (no common magic before it)
INVENTORY_NETWORK_LOCK = 11          # inventory_entry.network_lock_method
NETWORK_LOCK_SKIP = 2                # cr_options.h: IPTABLES, NFTABLES, SKIP


def skip_network_lock(image_dir) -> None:
    """Make restores of this dump skip CRIU's network lock.

    A restore uses the lock method recorded at dump time (`--network-lock` is ignored by
    `criu restore`), and runc's dump records iptables: every restore then runs
    iptables-restore five times (fork+exec from CRIU, three of them after the tasks are
    restored and before they resume). Our restores join a network namespace the node
    made fresh, with nothing to lock, and the snapshot guard refuses established TCP,
    the one thing the lock protects. runc 1.1.5 has no option for the method, and CRIU
    4.1.1 dies in RPC mode when a config file sets it, so the node patches the dump."""
    path = os.path.join(image_dir, INVENTORY)
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != struct.pack("<I", INVENTORY_MAGIC):
        raise ImageError(f"{INVENTORY}: bad magic {data[:4].hex()}")
    prefix, msgs = read_messages(data, magic_len=4)
    if len(msgs) != 1:
        raise ImageError(f"{INVENTORY}: expected one entry, found {len(msgs)}")
    data = write_messages(prefix, [with_varint(msgs[0], INVENTORY_NETWORK_LOCK,
                                               NETWORK_LOCK_SKIP)])
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
