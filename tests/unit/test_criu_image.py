"""CRIU image framing and the inventory patch (pure: synthetic images, no CRIU)."""
import struct

import pytest

from runtimed import cgroups
from snapshot import criu_image as ci

# An inventory as runc's dump of a container writes it (bytes from a real dump):
# img_version 2, fdinfo_per_id, root_ids {...}, ns_per_id, root_cg_set 1, lsmtype 0,
# network_lock_method 0 (iptables), plugins_entry {}, dump_criu_run_id "25c3...".
REAL_INVENTORY = bytes.fromhex(
    "163131584e000000080210011a18080110011801200128013002380340044806500758086005"
    "200128013000580062006a2432356333366265632d646461382d346438372d393863302d6633"
    "6464393238393634396300")[:-1]


def _inventory(tmp_path, data=REAL_INVENTORY):
    (tmp_path / ci.INVENTORY).write_bytes(data)
    return tmp_path


def _top_fields(data):
    prefix, msgs = ci.read_messages(data, magic_len=4)
    return prefix, {n: raw for n, _, raw in ci.fields(msgs[0])}


def test_skip_network_lock_sets_only_that_field(tmp_path):
    before = _top_fields(REAL_INVENTORY)
    assert before[1][11] == b"\x58\x00"                         # iptables, as dumped
    ci.skip_network_lock(_inventory(tmp_path))
    prefix, after = _top_fields((tmp_path / ci.INVENTORY).read_bytes())
    assert prefix == before[0]
    assert after.pop(11) == b"\x58" + bytes([ci.NETWORK_LOCK_SKIP])
    before[1].pop(11)
    assert after == before[1]                    # nested root_ids etc. byte for byte
    ci.skip_network_lock(tmp_path)               # idempotent
    assert _top_fields((tmp_path / ci.INVENTORY).read_bytes())[1][11] == b"\x58\x02"


def test_skip_network_lock_refuses_what_is_not_an_inventory(tmp_path):
    pagemap_like = struct.pack("<II", 0x54564319, 0x56084025) + struct.pack("<I", 2) + b"\x08\x01"
    with pytest.raises(ci.ImageError, match="magic"):
        ci.skip_network_lock(_inventory(tmp_path, pagemap_like))
    with pytest.raises(ci.ImageError, match="truncated"):
        ci.skip_network_lock(_inventory(tmp_path, REAL_INVENTORY[:-3]))
    with pytest.raises(FileNotFoundError):
        ci.skip_network_lock(tmp_path / "nowhere")


def test_fields_walk_every_wire_type_and_reject_truncation():
    msg = (b"\x08\x96\x01"                      # 1: varint 150
           + b"\x11" + b"\x01" * 8              # 2: fixed64
           + b"\x1a\x03abc"                     # 3: bytes
           + b"\x25" + b"\x02" * 4)             # 4: fixed32
    assert [(n, wt) for n, wt, _ in ci.fields(msg)] == [(1, 0), (2, 1), (3, 2), (4, 5)]
    assert b"".join(raw for _, _, raw in ci.fields(msg)) == msg
    assert ci.varint_fields(b"\x08\x96\x01\x10\x05") == {1: 150, 2: 5}
    with pytest.raises(ci.ImageError):
        ci.fields(b"\x1a\x05ab")
    with pytest.raises(ci.ImageError):
        ci.varint_fields(b"\x1a\x01a")
    assert ci.with_varint(b"\x08\x01\x10\x02", 1, 300) == b"\x10\x02\x08\xac\x02"


MOUNTS_HYBRID = """cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def test_favor_dynmods_targets_the_cgroup2_mount():
    assert cgroups.cgroup2_mount(MOUNTS_HYBRID) == "/sys/fs/cgroup/unified"
    assert cgroups.favor_dynmods(MOUNTS_HYBRID) == "would set favordynmods on /sys/fs/cgroup/unified"
    done = MOUNTS_HYBRID.replace("rw,relatime 0", "rw,relatime,favordynmods 0")
    assert "already set" in cgroups.favor_dynmods(done)
    assert cgroups.favor_dynmods("cgroup /sys/fs/cgroup/memory cgroup rw 0 0\n").startswith("no cgroup2")


def test_favor_dynmods_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(cgroups.FAVOR_ENV, "0")
    assert "left as is" in cgroups.favor_dynmods(MOUNTS_HYBRID)
