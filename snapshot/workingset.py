"""Working set of a lazily restored snapshot.

A lazy restore (`criu restore --lazy-pages`) resumes the process before its anonymous
memory is back; every page it touches first is a userfaultfd round trip to the
`criu lazy-pages` daemon (~50-100 us here), and a Python process touches a few hundred
to a few thousand pages just to answer its first call. We record those pages from the
daemon's log ("#PF at 0x...") and, for the next restores, clear CRIU's PE_LAZY flag on
the pagemap entries that cover them: CRIU then copies the working set in before
resuming (a sequential read, like an eager restore of a small snapshot) and leaves only
the rest to the daemon's background transfer. An eager restore reads every entry
regardless of PE_LAZY, so the rewritten pagemap is safe for both modes.

Image format (criu/images/pagemap.proto): 4-byte common magic, 4-byte PAGEMAP magic,
then u32-length-prefixed protobuf messages, a pagemap_head (pages_id) and entries
{1: vaddr, 2: nr_pages, 3: in_parent, 4: flags}. Pages of non-parent entries are stored
back to back in pages-<id>.img in entry order, so splitting an entry into consecutive
pieces keeps every page at its offset.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import criu_image

PAGE = 4096
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
# Pages made eager per faulted page (the aligned block around it). CRIU copies eager
# pages of a lazy restore into freshly faulted memory at ~1.3 GB/s, so every block costs
# before the tasks resume, while a page left out costs a fault only if it is touched.
# Measured on the heavy snapshot (317 recorded pages; `runtimectl run` of a lazy-restored
# function, drained before each call, 8 interleaved rounds): restore-to-result p50
# 128.6 ms with blocks of 1 page, 144.4 ms with 16 (20 MB eager), 147.8 ms with no
# working set. RUNTIMED_WS_CLUSTER_PAGES overrides it.
CLUSTER_PAGES = 1

_PF = re.compile(rb"#PF at 0x([0-9a-f]+)")


class PagemapError(criu_image.ImageError):
    pass


@dataclass(frozen=True)
class Entry:
    vaddr: int
    nr_pages: int
    flags: int
    in_parent: bool | None = None        # None: field absent in the image

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)


def faulted_pages(lazy_pages_log: bytes) -> set[int]:
    """Page addresses the lazy-pages daemon was asked for (its -v4 log)."""
    return {int(m.group(1), 16) & ~(PAGE - 1) for m in _PF.finditer(lazy_pages_log)}


def read_pagemap(data: bytes) -> tuple[bytes, bytes, list[Entry]]:
    """(magic prefix, head message, entries)."""
    if len(data) < 12:
        raise PagemapError("pagemap image too short")
    try:
        prefix, msgs = criu_image.read_messages(data)
        if not msgs:
            raise PagemapError("pagemap image has no head")
        entries = []
        for m in msgs[1:]:
            f = criu_image.varint_fields(m)
            if 1 not in f or 2 not in f:
                raise PagemapError("pagemap entry without vaddr/nr_pages")
            entries.append(Entry(f[1], f[2], f.get(4, PE_PRESENT),
                                 bool(f[3]) if 3 in f else None))
    except criu_image.ImageError as e:
        raise PagemapError(str(e)) from None
    return prefix, msgs[0], entries


def _enc_entry(e: Entry) -> bytes:
    enc = criu_image.enc_varint
    body = b"\x08" + enc(e.vaddr) + b"\x10" + enc(e.nr_pages)
    if e.in_parent is not None:
        body += b"\x18" + enc(int(e.in_parent))
    body += b"\x20" + enc(e.flags)
    return body


def write_pagemap(prefix: bytes, head: bytes, entries: list[Entry]) -> bytes:
    return criu_image.write_messages(prefix, [head] + [_enc_entry(e) for e in entries])


# -- the rewrite ------------------------------------------------------------------------------
def _blocks(pages: set[int], cluster: int) -> set[int]:
    span = cluster * PAGE
    return {p - p % span for p in pages}


def mark_eager(entries: list[Entry], pages: set[int],
               cluster: int = CLUSTER_PAGES) -> tuple[list[Entry], int]:
    """Entries with PE_LAZY cleared on every page in the working set's blocks (split where
    needed); also the number of pages made eager."""
    blocks = _blocks(pages, cluster)
    span = cluster * PAGE
    out: list[Entry] = []
    eager = 0
    for e in entries:
        if not e.lazy:
            out.append(e)
            continue
        run_start, run_hot = e.vaddr, None
        for k in range(e.nr_pages):
            addr = e.vaddr + k * PAGE
            hot = (addr - addr % span) in blocks
            if run_hot is None:
                run_hot = hot
            elif hot != run_hot:
                out.append(_piece(e, run_start, addr, run_hot))
                eager += (addr - run_start) // PAGE if run_hot else 0
                run_start, run_hot = addr, hot
        end = e.vaddr + e.nr_pages * PAGE
        out.append(_piece(e, run_start, end, bool(run_hot)))
        eager += (end - run_start) // PAGE if run_hot else 0
    return out, eager      # runs within one entry alternate, so nothing to merge


def _piece(e: Entry, start: int, end: int, hot: bool) -> Entry:
    return Entry(start, (end - start) // PAGE, e.flags & ~PE_LAZY if hot else e.flags,
                 e.in_parent)


def lazy_pages(entries: list[Entry]) -> int:
    return sum(e.nr_pages for e in entries if e.lazy)
