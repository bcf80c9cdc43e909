"""lazyfs.metaimage, the pure part: what it refuses and where the inodes go."""
from __future__ import annotations

import stat
import struct

import pytest

from lazyfs.metaimage import BLK, MAGIC, UnsupportedError, build_image
from lazyfs.toc import TOC, TOCEntry
from lazyfs.tree import build_tree


def _tree(*entries: TOCEntry):
    return build_tree(TOC(entries=entries), 1 << 20)


def test_an_xattr_erofs_cannot_name_is_refused():
    tree = _tree(TOCEntry(name="d/", type="dir", mode=0o755, xattrs={"system.nfs4": b"x"}))
    with pytest.raises(UnsupportedError, match="system.nfs4"):
        build_image(tree)


def test_layout_root_first_and_every_inode_in_one_block():
    names = [f"d/{'n' * 200}-{i}" for i in range(60)]          # a dir of several blocks
    tree = _tree(TOCEntry(name="d/", type="dir", mode=0o755),
                 *[TOCEntry(name=n, type="symlink", link_name="x" * 3000, mode=0o777)
                   for n in names])
    data, st = build_image(tree)
    magic, = struct.unpack_from("<I", data, 1024)
    root_nid, = struct.unpack_from("<H", data, 1024 + 14)
    blocks, = struct.unpack_from("<I", data, 1024 + 36)
    assert magic == MAGIC and blocks * BLK == len(data) and st.entries == 62
    assert root_nid * 32 == 1024 + 128                       # right after the superblock
    mode, = struct.unpack_from("<H", data, root_nid * 32 + 4)
    assert stat.S_ISDIR(mode)
    # 3,000-byte symlinks are inline: each inode with its target within one block
    pos = 1024 + 128
    seen = 0
    while pos < len(data) and seen < 62:
        fmt, xcount, mode = struct.unpack_from("<HHH", data, pos)
        if fmt & 1 == 0:                                     # no inode here: padding
            pos += 32
            continue
        size, = struct.unpack_from("<Q", data, pos + 8)
        layout = fmt >> 1
        if stat.S_ISLNK(mode):
            assert layout == 2 and pos % BLK + 64 + size <= BLK
        seen += 1
        pos += 64 + (size if layout == 2 else 0)
        pos += -pos % 32
    assert seen == 62


@pytest.mark.parametrize("entry", [
    TOCEntry(name="f", type="reg", size=0, mode=0o644, uid=1 << 33),       # owner > 32 bits
    TOCEntry(name="f", type="reg", size=0, mode=0o644, modtime="1960-01-01T00:00:00Z"),
])
def test_values_an_inode_cannot_hold_are_refused(entry):
    with pytest.raises(UnsupportedError):
        build_image(_tree(entry))
