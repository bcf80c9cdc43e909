"""The FUSE adapter (pyfuse3 + trio): serves one LayerView read-only at a mountpoint.

The tree is the layer in overlay form (whiteouts are 0/0 char devices, opaque dirs carry
`trusted.overlay.opaque=y`), so the mountpoint works as an overlayfs lower dir exactly like
an unpacked layer. Metadata comes from the verified TOC and is answered in the trio loop;
file data is fetched in worker threads (bounded by a limiter) so a slow fetch never stalls
lookups. A failing source turns into EIO after the source's bounded retries; the next read
tries again, so the mount recovers when the source is back.

pyfuse3 allows one mount per process: `serve()` is what a `python -m lazyfs serve`
process runs (see mount.py).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from .early import DirWorkset, EarlyPrefetch
from .errors import LazyFSError
from .metaimage import (
    MetaImageStats,
    UnsupportedError,
    mount_image_bytes,
    mount_meta,
    unmount_image,
)
from .metatree import MetaTreeStats, write_metatree
from .tree import ROOT_INO, Node
from .view import LayerView, WouldBlock
from .workset import plan_workset

log = logging.getLogger("lazyfs")
# the meta tree as an EROFS image (metaimage.py) when the kernel mounts one; 0: as files
META_IMAGE = os.environ.get("LAZYFS_META_IMAGE", "1") != "0"
TIMEOUT = 3600.0            # the layer is immutable: the kernel may cache entries and attrs


class LazyOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, view: LayerView, *, fetch_threads: int = 16):
        super().__init__()
        self.view = view
        self.limiter = trio.CapacityLimiter(fetch_threads)
        self.parent = {ROOT_INO: ROOT_INO}            # directory inode -> its parent
        for node in view.tree.nodes.values():
            if node.is_dir:
                for _, child in node.children:
                    if view.tree.nodes[child].is_dir:
                        self.parent[child] = node.ino
        self.total_size = sum(n.size for n in view.tree.nodes.values())
        self.ops: collections.Counter[str] = collections.Counter()   # requests served, by kind
        # a layer without xattrs answers getxattr with ENOSYS: the kernel then answers
        # every later one itself (EOPNOTSUPP) instead of asking us, which overlayfs does
        # for each name it looks up in this lower layer (about half the requests of an
        # import-heavy start)
        self.has_xattrs = any(n.xattrs for n in view.tree.nodes.values())

    def _node(self, inode: int) -> Node:
        node = self.view.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.generation = node.ino, 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode, a.st_nlink = node.mode, node.nlink
        a.st_uid, a.st_gid, a.st_rdev = node.uid, node.gid, node.rdev
        a.st_size = node.size if node.is_reg else len(os.fsencode(node.link_target))
        a.st_blksize, a.st_blocks = 4096, (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        self.ops["lookup"] += 1
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(self.parent.get(parent_inode, ROOT_INO)))
        node = self.view.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            # a negative entry the kernel keeps (inode 0): imports probe many absent names
            a = pyfuse3.EntryAttributes()
            a.st_ino, a.entry_timeout = 0, TIMEOUT
            return a
        return self._attr(node)

    async def getattr(self, inode, ctx=None):
        self.ops["getattr"] += 1
        return self._attr(self._node(inode))

    async def readlink(self, inode, ctx):
        self.ops["readlink"] += 1
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.link_target)

    async def opendir(self, inode, ctx):
        self.ops["opendir"] += 1
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        self.ops["readdir"] += 1
        node = self._node(fh)
        dots = [(".", fh), ("..", self.parent.get(fh, ROOT_INO))]
        entries = dots + list(node.children)
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(
                    self.view.tree.nodes[ino]), i + 1):
                break

    async def releasedir(self, fh):
        return None

    async def open(self, inode, flags, ctx):
        self.ops["open"] += 1
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self.view.opened(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        self.ops["read"] += 1
        try:
            try:          # in memory or on local disk: answered here, no thread hand-off
                return self.view.read(fh, off, size, block=False)
            except WouldBlock:
                pass
            return await trio.to_thread.run_sync(
                functools.partial(self.view.read, fh, off, size, record=False),
                limiter=self.limiter)
        except LazyFSError as e:
            name = self.view.tree.nodes[fh].name
            log.error("read of %r at [%d, +%d) failed, answering EIO: %s", name, off, size, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):
        return None

    async def getxattr(self, inode, name, ctx):
        self.ops["getxattr"] += 1
        if not self.has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        value = dict(self._node(inode).xattrs).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode, ctx):
        self.ops["listxattr"] += 1
        return [os.fsencode(k) for k, _ in self._node(inode).xattrs]

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.total_size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files, s.f_ffree, s.f_favail = len(self.view.tree.nodes), 0, 0
        s.f_namemax = 255
        return s


def _follow(view: LayerView, early: EarlyPrefetch, data_dir: str,
            report: Callable[[], None]) -> None:
    """Serve the working set the helper writes: reads of its files wait for them; its
    result becomes this mount's prefetch and working-set status (reported at once: a
    node that waits for the working set polls that status)."""
    view.workset = DirWorkset(view.tree, plan_workset(view.tree), data_dir, early)
    view.counters.prefetch_state = f"running (helper {early.pid})"

    def done(res: dict) -> None:
        res = dict(res)
        view.prefetch_result(str(res.pop("prefetch", res.get("state"))),
                             int(res.pop("chunks", 0) or 0),
                             {**res, "helper": early.pid,
                              "after_s": round(time.monotonic() - early.started, 3)})
        try:
            report()
        except OSError as e:
            log.warning("status write failed: %s", e)
    early.on_done = done
    if early.done and early.result is not None:     # it ended before we looked
        done(early.result)


def _write_meta(view: LayerView, meta: str, meta_image: Callable[[], bytes | None] | None
                ) -> tuple[MetaImageStats | MetaTreeStats, str]:
    """The view's meta tree at `meta`: the layer's published image mounted, else an image
    built here, else files (metatree.py); returns its stats and which of the three."""
    if META_IMAGE:
        scratch = view.cache.root / "scratch"
        try:
            t0 = time.monotonic()
            published = meta_image() if meta_image is not None else None
            if published is not None:
                mount_image_bytes(published, meta, scratch)
                return MetaImageStats(len(view.tree.paths), None, None, len(published),
                                      round(time.monotonic() - t0, 3)), "published erofs image"
            return mount_meta(view.tree, meta, scratch), "erofs image"
        except (UnsupportedError, OSError) as e:
            log.info("meta tree as files, not an EROFS image: %s", e)
    return write_metatree(view.tree, meta), "files"


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{threading.get_native_id()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def serve(view: LayerView, mountpoint: str, *, fsname: str = "lazyfs", prefetch: bool = True,
          fetch_all: bool = False, status_path: str | None = None, allow_other: bool = True,
          view_dir: str | None = None, workset: bool = True, workset_only: bool = False,
          early: EarlyPrefetch | None = None,
          on_mounted: Callable[[], None] | None = None,
          meta_image: Callable[[], bytes | None] | None = None) -> None:
    """Mount `view` at `mountpoint` and serve until unmounted or SIGTERM/SIGINT.

    Blocks. With `view_dir`, the layer's meta tree is written to VIEW_DIR/meta before the
    mount appears (lazyfs.metatree), and with `workset` the prefetch writes the
    prioritized files whole into VIEW_DIR/data (lazyfs.workset; `workset_only`: their
    chunks are not kept in the chunk cache too). `status_path` gets a JSON status (source
    bytes, cache hits, errors, prefetch, meta tree, working set) twice a second while
    anything changes, and the access recorder is flushed alike. `early`: the helper
    already writing the working set into VIEW_DIR/data (lazyfs.early); this process then
    runs no prefetch of its own unless the meta tree fails. `meta_image`: gives the
    layer's published meta image (metaimage.py), checked, or None: then it is built here.
    """
    ops = LazyOperations(view)
    state: dict = {"terminated": False, "status": None}
    stop = threading.Event()

    def housekeeping_once() -> None:
        if view.recorder is not None:
            view.recorder.flush()
        status = {**view.status(), "ops": dict(ops.ops)}
        if status_path and status != state["status"]:
            state["status"] = status
            _write_json(Path(status_path), {"pid": os.getpid(), "mountpoint": mountpoint,
                                            "time": time.time(), **status})

    def release_meta() -> None:
        if state.get("meta_mount"):      # (the node detaches it first when it drops the view)
            with contextlib.suppress(OSError):
                unmount_image(state.pop("meta_mount"))

    def run_prefetch() -> None:
        try:
            if data_dir and not fetch_all:
                view.prefetch_workset(data_dir, stop, only=workset_only)
            else:
                view.prefetch(stop, everything=fetch_all)
        except BaseException as e:       # a bug: say so where the node looks
            log.exception("prefetch failed")
            view.counters.prefetch_state = f"failed: {type(e).__name__}: {e}"
            if data_dir and view.counters.workset is None:
                view.counters.workset = {"state": f"failed: {type(e).__name__}: {e}"}
        housekeeping_once()              # the node waits for this status

    data_dir = os.path.join(view_dir, "data") if view_dir and workset else None
    if view_dir:
        # before the mount appears (a node that sees the mount finds the tree complete),
        # and before the prefetch starts: its decoding threads would make each of the
        # ~60,000 system calls wait for the GIL (0.36 s instead of 0.08-0.09 s, measured)
        meta = os.path.join(view_dir, "meta")
        try:
            st, kind = _write_meta(view, meta, meta_image)
            if kind != "files":
                state["meta_mount"] = meta
            view.counters.meta = {"state": "done", "kind": kind, **dataclasses.asdict(st)}
            log.info("meta tree (%s): %d entries in %.3fs", kind, st.entries, st.seconds)
        except (LazyFSError, OSError) as e:
            log.warning("no meta tree in %s (the node serves the FUSE mount alone): %s",
                        view_dir, e)
            view.counters.meta = {"state": f"failed: {type(e).__name__}: {e}"}
            data_dir = None              # no view to serve it: the prefetch fills the cache
    if early is not None and data_dir:
        _follow(view, early, data_dir, housekeeping_once)
    elif prefetch or fetch_all:
        if early is not None:            # no view for its files: the cache instead
            early.kill()
        # started before the FUSE mount: what the node waits for need not wait for its setup
        threading.Thread(target=run_prefetch, name="lazyfs-prefetch", daemon=True).start()
    options = set(pyfuse3.default_options) | {"ro", f"fsname={fsname}", "subtype=lazyfs"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mountpoint, options)
    except BaseException:
        stop.set()
        release_meta()
        raise
    log.info("FUSE mount live at %s", mountpoint)

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                state["terminated"] = True
                pyfuse3.terminate()
                return

    async def housekeeping() -> None:
        while True:
            await trio.to_thread.run_sync(housekeeping_once)
            await trio.sleep(0.5)

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(on_signals)
            n.start_soon(housekeeping)
            if on_mounted is not None:
                on_mounted()
            await pyfuse3.main()
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        stop.set()
        try:
            housekeeping_once()
        except OSError as e:
            log.warning("final status write failed: %s", e)
        pyfuse3.close(unmount=state["terminated"])
        release_meta()
