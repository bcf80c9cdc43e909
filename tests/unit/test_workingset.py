"""Working-set rewrite of CRIU pagemaps (pure: synthetic images, no CRIU)."""
import struct

import pytest

from snapshot import workingset as ws
from snapshot.workingset import PAGE, PE_LAZY, PE_PRESENT, Entry

PREFIX = struct.pack("<II", 0x54564319, 0x56084025)
HEAD = b"\x08\x01"                                   # pagemap_head {pages_id: 1}


def _image(entries):
    return ws.write_pagemap(PREFIX, HEAD, entries)


def test_round_trip_is_byte_exact():
    entries = [Entry(0x400000, 1, PE_PRESENT), Entry(0x7F0000000000, 300, PE_PRESENT | PE_LAZY),
               Entry(0x7F0000200000, 2, PE_PRESENT, in_parent=False)]
    data = _image(entries)
    prefix, head, back = ws.read_pagemap(data)
    assert (prefix, head, back) == (PREFIX, HEAD, entries)
    assert ws.write_pagemap(prefix, head, back) == data


def test_mark_eager_splits_only_lazy_entries_and_keeps_page_order():
    base = 0x7F0000000000
    entries = [Entry(0x400000, 4, PE_PRESENT), Entry(base, 64, PE_PRESENT | PE_LAZY)]
    faults = {base + 20 * PAGE + 123 & ~(PAGE - 1), 0x400000}   # 2nd is not lazy: ignored
    new, eager = ws.mark_eager(entries, faults, cluster=16)
    assert new[0] == entries[0]
    # pages 16..31 (the faulted page's 16-page block) become eager, the rest stay lazy
    assert new[1:] == [Entry(base, 16, PE_PRESENT | PE_LAZY), Entry(base + 16 * PAGE, 16, PE_PRESENT),
                       Entry(base + 32 * PAGE, 32, PE_PRESENT | PE_LAZY)]
    assert eager == 16
    assert sum(e.nr_pages for e in new) == sum(e.nr_pages for e in entries)
    # consecutive pieces: every page keeps its place in pages-N.img
    for a, b in zip(new[1:], new[2:]):
        assert a.vaddr + a.nr_pages * PAGE == b.vaddr
    assert ws.lazy_pages(new) == 48


def test_mark_eager_whole_entry_and_empty_working_set():
    e = [Entry(0x1000000, 8, PE_PRESENT | PE_LAZY)]
    assert ws.mark_eager(e, set())[0] == e
    new, eager = ws.mark_eager(e, {0x1000000 + 3 * PAGE}, cluster=16)
    assert new == [Entry(0x1000000, 8, PE_PRESENT)] and eager == 8


def test_faulted_pages_from_daemon_log():
    log = (b"(00.174504) uffd: 1-8: #PF at 0x7f8acf151000\n"
           b"(00.174741) uffd: 1-8: #PF at 0x7f8ac39a3abc\n"
           b"(00.210390) uffd: 1-8: uffd_copy: 0x7fffe3359000/4096\n")
    assert ws.faulted_pages(log) == {0x7F8ACF151000, 0x7F8AC39A3000}


@pytest.mark.parametrize("data", [b"", PREFIX, PREFIX + struct.pack("<I", 50) + b"\x08",
                                  PREFIX + struct.pack("<I", 2) + HEAD + struct.pack("<I", 2) + b"\x08\x80"])
def test_malformed_pagemaps_raise(data):
    with pytest.raises(ws.PagemapError):
        ws.read_pagemap(data)
