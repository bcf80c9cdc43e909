"""The meta tree as an EROFS image (lazyfs.metaimage): mounted by the kernel, checked by
fsck.erofs, and the same tree, entry for entry, as the meta tree written as files."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lazyfs import FileBlobSource, open_estargz, write_layer
from lazyfs.metaimage import MAGIC, build_image, mount_meta, unmount_image
from lazyfs.metatree import write_metatree
from lazyfs.testing import make_layer

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, trusted.*)")]


def _tree(tmp_path: Path):
    layer = make_layer(tmp_path / "layer", big=300_000)
    many = layer / "usr/share/many"               # a directory of several dirent blocks
    many.mkdir(parents=True)
    for i in range(400):
        (many / f"entry-{i:04d}-{'x' * (i % 60)}.py").write_text(f"v = {i}\n")
    os.symlink("t/" * 2042 + "target", layer / "usr/long-link")   # 4,090: no room inline
    os.setxattr(layer / "etc/hello.txt", "user.origin", b"lazy")
    os.setxattr(layer / "usr/share/many", "user.dir", b"yes")
    blob = write_layer(layer, tmp_path / "layer.esgz", chunk_size=64 * 1024)
    src = FileBlobSource(str(blob.path))
    try:
        return open_estargz(src, blob.toc_digest).tree
    finally:
        src.close()


def _walk(root: Path) -> dict:
    out, first = {}, {}
    for dirpath, dirs, files in os.walk(root):
        for n in ([""] if dirpath == str(root) else []) + dirs + files:
            p = os.path.join(dirpath, n) if n else dirpath
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False)
                      for k in os.listxattr(p, follow_symlinks=False)}
            link = os.readlink(p) if os.path.islink(p) else None
            size = 0 if os.path.isdir(p) else st.st_size         # dir sizes are fs-specific
            mtime = st.st_mtime_ns if rel != "." else 0           # the files' root: now
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, size, mtime, st.st_nlink, xattrs,
                        link, first.setdefault(st.st_ino, rel))   # hard links: one inode
    return out


def test_the_image_is_the_meta_tree(tmp_path: Path):
    tree = _tree(tmp_path)
    data, st = build_image(tree)
    assert int.from_bytes(data[1024:1028], "little") == MAGIC and len(data) % 4096 == 0
    assert build_image(tree)[0] == data                         # deterministic
    assert st.entries == len(tree.paths) and st.stubs > 400 and st.whiteouts >= 1
    image = tmp_path / "meta.erofs"
    image.write_bytes(data)
    fsck = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    files, mounted = tmp_path / "files", tmp_path / "mounted"
    write_metatree(tree, files)
    (tmp_path / "scratch").mkdir()
    stale = tmp_path / "scratch" / "meta-4194303-meta.erofs"   # its server died before mounting
    stale.write_bytes(b"x")
    mount_meta(tree, mounted, tmp_path / "scratch")
    try:
        assert not list((tmp_path / "scratch").iterdir())      # unlinked once mounted
        want, got = _walk(files), _walk(mounted)
        assert len(got) == len(tree.paths) > 400
        assert {k for k in want if want[k] != got.get(k)} == set()
        stub = mounted / "usr/lib/python3/big.bin"
        assert os.getxattr(stub, "trusted.overlay.metacopy") == b""
        assert os.getxattr(stub, "trusted.overlay.redirect") == b"/usr/lib/python3/big.bin"
        assert sorted(os.listdir(mounted / "usr/share/many"))[:2] == [
            "entry-0000-.py", "entry-0001-x.py"]
        assert (mounted / "usr/share/many/entry-0399-" f"{'x' * 39}.py").exists()
    finally:
        unmount_image(mounted)


def test_an_image_that_cannot_be_mounted_leaves_nothing(tmp_path: Path):
    """EROFS mounts from files on filesystems with a page-cache read path, not tmpfs: the
    mount fails (ENOTBLK), and the caller (the mount server) writes the files instead."""
    tree = _tree(tmp_path)
    shm = Path("/dev/shm") / f"lazyfs-test-{os.getpid()}"
    try:
        with pytest.raises(OSError):
            mount_meta(tree, tmp_path / "meta", shm)
        assert not (tmp_path / "meta").exists() and not list(shm.iterdir())
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_a_published_image_that_does_not_match_its_digest_is_built_instead(tmp_path: Path):
    """The mount server fetches a layer's published meta image and checks its digest; one
    that does not match (here: the eStargz itself, as a file source has one location) is
    not mounted: the server builds the image from the TOC, and says so in its log."""
    import json
    import time

    from lazyfs import MountSpec, SourceSpec, mount
    layer = make_layer(tmp_path / "layer")
    blob = write_layer(layer, tmp_path / "layer.esgz", prioritized=["etc/hello.txt"])
    mp, vd, status = tmp_path / "mnt", tmp_path / "vd", tmp_path / "status.json"
    mp.mkdir()
    vd.mkdir()
    h = mount(MountSpec(source=SourceSpec("file", str(blob.path)), mountpoint=str(mp),
                        toc_digest=blob.toc_digest, cache_dir=str(tmp_path / "cache"),
                        status_path=str(status), view_dir=str(vd),
                        meta_digest="sha256:" + "0" * 64),
              log_path=str(tmp_path / "mount.log"))
    try:
        deadline = time.monotonic() + 10
        while not (status.exists() and json.loads(status.read_text()).get("meta")):
            assert time.monotonic() < deadline, h.log_tail()
            time.sleep(0.05)
        assert json.loads(status.read_text())["meta"]["kind"] == "erofs image"
        assert "no published meta image" in h.log_tail()
        assert (vd / "meta/etc/hello.txt").exists() and os.path.ismount(vd / "meta")
    finally:
        h.unmount()
    assert not os.path.ismount(vd / "meta")          # the server detached it on its way out
