"""Lazy image layers on a node: mount what is missing, pull it behind, share what was learned.

The life of a layer this node lacks (see docs/design.md, "Lazy images"):

1. mount   its eStargz from the dispatcher over FUSE (`lazyfs.mount_layer`); the mount
           prefetches the blob's prioritized area (the recorded working set, if the blob
           has one) in few large range reads and records which files the container opens.
           The mount server writes the layer's metadata as a local tree of overlay
           metacopy stubs and the working set's files whole into a data dir, and the node
           mounts the "view" (lazyfs/metatree.py): a read-only overlay of that tree with
           the data dir and the FUSE mount as data-only layers, used as the containers'
           lower dir. The kernel answers every lookup and readdir, working-set files are
           read from the tmpfs, only other files' data goes through FUSE. With the
           `nowait` policy (default) the start goes ahead at once (a file it opens before
           the file is written reads through FUSE, which waits for it); `wait` waits until
           the working set is written;
2. pull    the full tar.zst behind it. With the `defer` policy (default) the pull waits
           until the first call on the layer finished (bounded by PULL_DEFER_S), so it
           does not compete with that call's on-demand reads for the CPUs, and unpacks at
           the lowest CPU priority;
3. publish once the layer is local and the blob had no working set yet, rewrite its
           eStargz with the recorded files first (a `nice`d `python -m lazyfs convert`),
           upload it and make the dispatcher serve it for the layer from now on. The
           layer key and its files stay the same; only the eStargz blob (and its TOC
           and diff_id, the tar being reordered) change. Later lazy mounts on any node
           then prefetch exactly that working set.

The chunk cache the mounts share is kept within a byte budget (least recently used
chunks go first, chunks of a live mount never), pruned in the background.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

from .layers import LayerStore
from .rootfs import MS_RDONLY, MountError, mount, umount

log = logging.getLogger(__name__)

PULL_POLICIES = ("defer", "now")
WORKSET_POLICIES = ("wait", "nowait", "off")
WORKSET_WAIT_S = 60.0                # the longest a mount waits for its working set
PULL_DEFER_S = 30.0                  # the longest a full pull waits for the first call
PRUNE_INTERVAL_S = 30.0
DEFAULT_CACHE_BUDGET_MB = 4096
DEFAULT_WORKSET_TMPFS = "25%"        # tmpfs size for view dirs ("0": node's disk)
WORKSET_RELEASE_S = 60.0             # a local layer's unused view goes after this
VIEW_MIN_KERNEL = (6, 8)             # data-only lower layers (6.5), escaped xwhiteouts (6.8)
UNPACK_WAIT_S = 120.0                # the longest forget() waits for a background unpack


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def view_supported(release: str | None = None) -> bool:
    """Whether this kernel mounts views (lazyfs.metatree) with the semantics they need."""
    release = release or os.uname().release
    try:
        version = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return version >= VIEW_MIN_KERNEL


def _thread_nice(value: int) -> None:
    """Set this thread's nice value only (Linux schedules threads singly); root may raise
    it back."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except OSError:
        pass


class LazyLayers:
    def __init__(self, node_dir: Path, layers: LayerStore, blobs):
        self.dir, self.layers, self.blobs = node_dir, layers, blobs
        self.mount_dir = node_dir / "lz"
        self.cache_dir = node_dir / "lazy-cache"
        # view dirs (meta tree + working-set data) live on a tmpfs: they are rebuilt at
        # every mount (never the only copy), and creating their ~10,000 entries on the
        # node's ext4 (no journal here) cost as much CPU as inflating the data when many
        # inodes were freed in the last minutes (each new inode skips the recently
        # deleted ones); the RAM they take is given back once the layer is local and no
        # container's overlay uses the view any more
        self.ws_root = self.mount_dir / "ws"
        self.use_views = os.environ.get("RUNTIMED_LAZY_VIEW", "1") != "0" and view_supported()
        self.ws_tmpfs = os.environ.get("RUNTIMED_LAZY_WS_TMPFS", DEFAULT_WORKSET_TMPFS)
        self._local_since: dict[str, float] = {}      # layer key -> when seen local (ws held)
        # a mount server started ahead, its imports done, waiting for its mount (saves
        # ~0.3 s of each lazy start); replaced once the start it served has had its call
        self.spare = os.environ.get("RUNTIMED_LAZY_SPARE", "1") != "0"
        self._spare = None
        self.enabled = os.environ.get("RUNTIMED_LAZY_IMAGES", "1") != "0"
        self.prefetch = True            # mount-time prefetch of a blob's prioritized area
        policy = os.environ.get("RUNTIMED_LAZY_PULL", "defer")
        self.pull_policy = policy if policy in PULL_POLICIES else "defer"
        self.publish = os.environ.get("RUNTIMED_LAZY_PUBLISH", "1") != "0"
        # nowait: the start goes ahead while the working set is written (files it opens
        # before they are written read through FUSE): 1,155-1,190 ms vs 1,294-1,345 ms for
        # waiting (heavy stack, bench lazy_prefetch vs lazy_prefetch_wait, 4 runs)
        ws_policy = os.environ.get("RUNTIMED_LAZY_WORKSET", "nowait")
        self.workset = ws_policy if ws_policy in WORKSET_POLICIES else "nowait"
        self.cache_budget = _env_int("RUNTIMED_LAZY_CACHE_MB", DEFAULT_CACHE_BUDGET_MB) << 20
        self.token: str | None = None
        self.cache_usage: dict | None = None
        self.published: dict[str, dict] = {}          # layer key -> what this node published
        self._locks: dict[str, asyncio.Lock] = {}
        self._first_call: dict[str, asyncio.Event] = {}
        self._gen: dict[str, int] = {}                # layer key -> mount generation
        self._bg: set[asyncio.Task] = set()
        self._behind: dict[str, asyncio.Task] = {}    # layer key -> its pull and publish
        self._unpacks = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lazy-unpack")
        self._unpacking: dict[str, concurrent.futures.Future] = {}   # layer key -> its unpack
        self._prune_lock = asyncio.Lock()

    # -- 1. mount ---------------------------------------------------------------------------
    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        k = key[:16]
        return (self.mount_dir / k, self.mount_dir / f"{k}.access.json",
                self.mount_dir / f"{k}.status.json")

    def _view_paths(self, key: str) -> tuple[Path, Path]:
        """(the dir the mount server writes meta/ and data/ into, the view's mountpoint)"""
        return self.ws_root / key[:16], self.mount_dir / f"{key[:16]}.view"

    def _mount_ws_root(self) -> None:
        """The tmpfs for working-set dirs (a plain dir when that is off or fails)."""
        self.ws_root.mkdir(parents=True, exist_ok=True)
        if self.ws_tmpfs in ("", "0", "off") or os.path.ismount(self.ws_root):
            return
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.ws_tmpfs},mode=0700",
                            "runtimed-lazy-ws", str(self.ws_root)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            log.warning("no tmpfs for working-set dirs (%s): they go to the node's disk",
                        r.stderr.strip())

    def _unmount_ws_root(self) -> None:
        if os.path.ismount(self.ws_root):
            umount(str(self.ws_root))    # detached: a container still using a dir keeps it

    @staticmethod
    def _overlays_using(path: Path) -> bool:
        """Whether any overlay mount has `path` among its lower dirs."""
        want = str(path)
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if " - overlay " in line and want in line:
                    opts = line.rsplit(" ", 1)[-1]
                    for opt in opts.split(","):
                        if opt.startswith("lowerdir=") and want in opt[9:].split(":"):
                            return True
        return False

    def release_views(self, grace_s: float = WORKSET_RELEASE_S) -> list[str]:
        """Drop the views of layers that are local now (new containers use the local layer)
        once `grace_s` passed (a container being set up may still have chosen the view)
        and no overlay uses them: overlayfs lower dirs must not change under a mounted
        overlay, so a view in use stays. Returns the keys released."""
        now, out = time.monotonic(), []
        for key in list(self.layers.views):
            if not self.layers.has(key):
                self._local_since.pop(key, None)
                continue
            since = self._local_since.setdefault(key, now)
            if now - since < grace_s or self._overlays_using(self._view_paths(key)[1]):
                continue
            self._drop_view(key)
            out.append(key)
        if out:
            log.info("released the views of %d local layers", len(out))
        return out

    def _drop_view(self, key: str) -> None:
        """Unmount the layer's view (detached: a container still using it keeps it) and
        remove its dirs; before the FUSE mount goes, which the view holds busy."""
        self.layers.views.pop(key, None)
        self._local_since.pop(key, None)
        view_dir, mp = self._view_paths(key)
        # the view, then the meta tree's EROFS image the mount server mounted under it
        for m in (mp, view_dir / "meta"):
            if os.path.ismount(m):
                umount(str(m))
        shutil.rmtree(view_dir, ignore_errors=True)

    def _mount_view(self, key: str, fuse_mp: Path, with_data: bool) -> Path | None:
        """Mount the view over the tree the mount server wrote; None (the FUSE mount is
        used alone) when it did not write one or the mount fails."""
        from lazyfs.metatree import view_options
        view_dir, mp = self._view_paths(key)
        if not (view_dir / "meta").is_dir():
            return None
        data = [view_dir / "data"] if with_data else []
        for d in data:
            d.mkdir(mode=0o700, exist_ok=True)
        mp.mkdir(exist_ok=True)
        try:
            mount("overlay", str(mp), "overlay", MS_RDONLY,
                  view_options(view_dir / "meta", [*data, fuse_mp]))
        except (MountError, ValueError) as e:
            log.warning("layer %s: no view, containers read the FUSE mount: %s", key[:16], e)
            return None
        return mp

    @staticmethod
    def _wait_workset(h, timeout: float = WORKSET_WAIT_S) -> str:
        """Block until the mount's working set is written or will not be (its prefetch or
        write failed, the server exited, `timeout`); returns the outcome."""
        deadline = time.monotonic() + timeout
        while True:
            state = (h.status().get("workset") or {}).get("state")
            if state is not None:
                return state
            if h.proc.poll() is not None:
                return "server exited"
            if time.monotonic() > deadline:
                return "timeout"
            time.sleep(0.005)

    async def mount(self, key: str, info: dict) -> bool:
        """Policy: a layer this node lacks is mounted lazily so the container starts now;
        the full layer is pulled behind it. False: pull it fully first."""
        if not self.enabled or not self.token or not info.get("estargz_digest") \
                or not hasattr(self.blobs, "base_url"):
            return False
        if key in self.layers.lazy:
            return True
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key in self.layers.lazy:
                return True
            import lazyfs
            mp, record, status = self._paths(key)
            mp.mkdir(parents=True, exist_ok=True)
            status.unlink(missing_ok=True)         # an earlier mount's, not this one's
            self._drop_view(key)                   # ... and so is a view left
            view_dir, _ = self._view_paths(key)
            if self.use_views:
                view_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            use_ws = self.use_views and self.prefetch and self.workset != "off" \
                and bool(info.get("prefetch_files"))
            loop = asyncio.get_running_loop()
            server, self._spare = self._spare, None
            t_mount = time.perf_counter()
            try:
                h = await loop.run_in_executor(None, lambda: lazyfs.mount_layer(
                    mp, digest=info["estargz_digest"], dispatcher_url=self.blobs.base_url,
                    token=self.token, toc_digest=info.get("toc_digest"),
                    size=info.get("estargz_size"), cache_dir=str(self.cache_dir),
                    record_path=str(record), status_path=str(status),
                    prefetch=self.prefetch, view_dir=str(view_dir) if self.use_views else None,
                    workset=use_ws,
                    # working-set chunks are not stored twice (~0.8 s of a 2-core node):
                    # a start that reads such a file through FUSE before it is written
                    # waits for the file and reads it from the data dir
                    workset_only=True, server=server, meta_digest=info.get("meta_digest"),
                    meta_size=info.get("meta_size")))
            except Exception as e:  # noqa: BLE001 - fall back to a full pull
                log.warning("lazy mount of layer %s failed, pulling it fully: %s", key[:16], e)
                if server is not None:
                    self._spawn(self._refill_spare())
                return False
            log.info("layer %s: lazy mount live after %.3fs", key[:16],
                     time.perf_counter() - t_mount)
            view = await loop.run_in_executor(
                None, self._mount_view, key, Path(h.mountpoint), use_ws) if self.use_views else None
            if view is not None:
                self.layers.views[key] = view
                if use_ws and self.workset == "wait":
                    t0 = time.perf_counter()
                    outcome = await loop.run_in_executor(None, self._wait_workset, h)
                    log.info("layer %s: working set %s after %.2fs", key[:16], outcome,
                             time.perf_counter() - t0)
            self.layers.lazy[key] = h
            self._first_call[key] = asyncio.Event()
            self._gen[key] = gen = self._gen.get(key, 0) + 1
            self._behind[key] = self._spawn(self._behind_mount(key, info, gen))
            if server is not None:
                self._spawn(self._refill_spare(self._first_call[key]))
            return True

    def _start_spare(self) -> None:
        if self.spare and self._spare is None:
            from lazyfs.mount import spawn_server
            self._spare = spawn_server(str(self.cache_dir))

    async def _refill_spare(self, after: asyncio.Event | None = None) -> None:
        """A new spare server, once the start that took the last one had its call (its
        imports would take a CPU from that start)."""
        if after is not None:
            try:
                await asyncio.wait_for(after.wait(), PULL_DEFER_S)
            except TimeoutError:
                pass
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._start_spare)
        except OSError as e:
            log.warning("no spare lazy mount server: %s", e)

    def _stop_spare(self) -> None:
        p, self._spare = self._spare, None
        if p is not None:
            try:
                p.stdin.close()            # an unused spare exits at the end of its input
                p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()

    def call_done(self, keys: list[str]) -> None:
        """A call on these layers ended: a deferred full pull may start now."""
        for k in keys:
            ev = self._first_call.get(k)
            if ev is not None:
                ev.set()

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    # -- 2. pull ----------------------------------------------------------------------------
    async def _behind_mount(self, key: str, info: dict, gen: int) -> None:
        """Pull, then publish, for the mount of generation `gen`; a `forget` of the layer
        (eviction) makes it stop at its next step."""
        def wanted() -> bool:
            return self._gen.get(key) == gen and key in self.layers.lazy
        if not info.get("archive"):
            return
        if self.pull_policy == "defer":
            try:
                await asyncio.wait_for(self._first_call[key].wait(), PULL_DEFER_S)
            except TimeoutError:
                pass
        t0 = time.perf_counter()
        try:
            if not wanted() or self.layers.has(key):
                return
            path = await self.blobs.fetch(info["archive"])
            # its own pool, so that forget() can wait for an unpack that is under way
            job = self._unpacks.submit(self._adopt_low, key, path, wanted)
            self._unpacking[key] = job
            await asyncio.wrap_future(job)
            if self._unpacking.get(key) is job:
                del self._unpacking[key]
            if not wanted():
                return
            log.info("layer %s is now local (was lazy; pulled in %.1fs)", key[:16],
                     time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - the lazy mount keeps serving
            log.warning("background pull of layer %s failed: %s", key[:16], e)
            return
        if self.publish and not info.get("prefetch_files"):
            try:
                await self._publish(key, info)
            except Exception as e:  # noqa: BLE001 - an optimization for later mounts
                log.warning("publishing the recorded prefetch of layer %s failed: %s",
                            key[:16], e)
        await self.prune()

    def _adopt_low(self, key: str, path: Path, wanted) -> None:
        _thread_nice(19)         # the unpack (zstd + tar) yields the CPUs to the containers
        try:
            self.layers.adopt_archive(key, path, wanted=wanted)
        finally:
            _thread_nice(0)      # pool threads are reused

    # -- 3. publish -------------------------------------------------------------------------
    async def _publish(self, key: str, info: dict, settle_s: float = 1.0) -> dict | None:
        """Rewrite the layer's eStargz with the files its lazy mount saw opened first and
        make the dispatcher serve it. Returns the dispatcher's answer (None: nothing to do)."""
        _, record, _ = self._paths(key)
        await asyncio.sleep(settle_s)            # the recorder flushes twice a second
        if not record.exists() or not self.layers.has(key):
            return None
        out = self.dir / "b" / f"{key[:16]}.prefetch.estargz"
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "nice", "-n", "15", sys.executable, "-m", "lazyfs", "convert",
            str(self.layers.path(key) / "fs"), str(out), "--prioritized-from", str(record),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        stdout, stderr = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"lazyfs convert failed: {stderr.decode()[-500:]}")
        blob = json.loads(stdout)
        try:
            if not blob["prioritized"]:
                return None
            await self.blobs.put_file(out, blob["digest"].split(":")[-1])
        finally:
            out.unlink(missing_ok=True)
        body = {"estargz_digest": blob["digest"], "toc_digest": blob["toc_digest"],
                "estargz_size": blob["size"], "diff_id": blob["diff_id"],
                "uncompressed_size": blob["uncompressed_size"],
                "prefetch_files": len(blob["prioritized"]),
                "replaces": info.get("estargz_digest", "")}
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=60)) as s, \
                s.post(f"{self.blobs.base_url}/v1/layers/{key}/estargz", json=body) as r:
            if r.status >= 300:
                raise RuntimeError(f"dispatcher refused it: {r.status} {await r.text()}")
            answer = await r.json()
        self.published[key] = {**body, "convert_s": round(time.perf_counter() - t0, 2)}
        log.info("layer %s: published eStargz %s with %d recorded files first (%.1fs)",
                 key[:16], blob["digest"][:19], len(blob["prioritized"]),
                 time.perf_counter() - t0)
        return answer

    # -- chunk cache --------------------------------------------------------------------------
    async def forget(self, key: str) -> None:
        """Unmount the layer's lazy mount (if any) and drop its chunks from the cache
        (those another live mount serves stay): as a node that never saw the layer."""
        h = self.layers.lazy.pop(key, None)
        self._gen[key] = self._gen.get(key, 0) + 1     # its pull and publish stop
        behind = self._behind.pop(key, None)
        if behind is not None:
            # now, not at their next step: a download of the layer's archive in flight
            # would take the CPUs from the next start (an unpack already under way ends
            # in its thread and is dropped)
            behind.cancel()
        self._first_call.pop(key, None)
        self._drop_view(key)
        job = self._unpacking.pop(key, None)
        if job is not None and not job.done():
            # an unpack cannot be stopped midway (it then drops what it wrote): wait for it,
            # so a layer forgotten is gone and its unpack takes no CPU from the next start
            t0 = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: concurrent.futures.wait([job], timeout=UNPACK_WAIT_S))
            log.info("layer %s: waited %.1fs for its background unpack to end", key[:16],
                     time.perf_counter() - t0)
        if h is None:
            return
        from lazyfs.cache import ChunkCache
        loop = asyncio.get_running_loop()
        cache = ChunkCache(self.cache_dir)
        chunks = cache.pinned_by(h.proc.pid)
        await loop.run_in_executor(None, h.unmount)
        await loop.run_in_executor(None, cache.remove, chunks)

    async def prune(self) -> dict:
        """Bring the chunk cache within its budget now; returns its usage."""
        from lazyfs.cache import ChunkCache
        async with self._prune_lock:
            u = await asyncio.get_running_loop().run_in_executor(
                None, lambda: ChunkCache(self.cache_dir).prune_usage(self.cache_budget))
        self.cache_usage = {"bytes": u.bytes, "chunks": u.chunks,
                            "pinned_bytes": u.pinned_bytes, "budget_bytes": self.cache_budget,
                            "measured_at": time.time()}
        if u.freed_chunks:
            log.info("chunk cache: pruned %d chunks (%.1f MiB), %.1f MiB left", u.freed_chunks,
                     u.freed_bytes / 2**20, u.bytes / 2**20)
        return self.cache_usage

    async def prune_loop(self, interval: float = PRUNE_INTERVAL_S) -> None:
        while True:
            try:
                await self.prune()
                await asyncio.get_running_loop().run_in_executor(None, self.release_views)
            except Exception as e:  # noqa: BLE001 - try again next round
                log.warning("chunk cache pruning or view release failed: %s", e)
            await asyncio.sleep(interval)

    def start(self, token: str | None) -> None:
        self.token = token
        self._mount_ws_root()
        if self.enabled:
            self._spawn(self._refill_spare())
        self._spawn(self.prune_loop())

    # -- introspection, shutdown --------------------------------------------------------------
    def states(self, out: dict[str, dict]) -> None:
        """Add each lazily mounted layer's state to `out` (key[:16] -> layer entry)."""
        for k, h in self.layers.lazy.items():
            st = h.status()
            entry = out.setdefault(k[:16], {"key": k[:16], "state": "lazy", "source": "estargz"})
            entry.update(was_lazy=True,
                         bytes_fetched=(st.get("source") or {}).get("bytes_received"),
                         fetched_chunks=st.get("fetched_chunks"),
                         prefetched_chunks=st.get("prefetched_chunks"),
                         prefetch=st.get("prefetch"), workset=st.get("workset"),
                         view=k in self.layers.views, meta=st.get("meta"))
            if k in self.published:
                entry["published_prefetch_files"] = self.published[k]["prefetch_files"]

    def config(self) -> dict:
        return {"lazy_images": self.enabled, "lazy_prefetch": self.prefetch,
                "lazy_workset": self.workset, "lazy_pull": self.pull_policy, "lazy_publish": self.publish,
                "lazy_cache_mb": self.cache_budget >> 20}

    def configure(self, body: dict) -> dict:
        if "lazy_images" in body:
            self.enabled = bool(body["lazy_images"])
        if "lazy_prefetch" in body:
            self.prefetch = bool(body["lazy_prefetch"])
        if body.get("lazy_workset") in WORKSET_POLICIES:
            self.workset = body["lazy_workset"]
        if body.get("lazy_pull") in PULL_POLICIES:
            self.pull_policy = body["lazy_pull"]
        if "lazy_publish" in body:
            self.publish = bool(body["lazy_publish"])
        if "lazy_cache_mb" in body:
            self.cache_budget = max(0, int(body["lazy_cache_mb"])) << 20
            self._spawn(self.prune())
        return self.config()

    async def shutdown(self) -> None:
        for t in list(self._bg):
            t.cancel()
        loop = asyncio.get_running_loop()
        for key, h in list(self.layers.lazy.items()):
            self._drop_view(key)
            try:
                await loop.run_in_executor(None, h.unmount)
            except Exception as e:  # noqa: BLE001
                log.warning("unmount of lazy layer %s: %s", key[:16], e)
        self.layers.lazy.clear()
        await loop.run_in_executor(None, self._stop_spare)
        self._unpacks.shutdown(wait=False, cancel_futures=True)
        try:
            self._unmount_ws_root()
        except OSError as e:
            log.warning("unmounting the working-set tmpfs: %s", e)
