"""The node daemon's core (root): runs calls in the fastest tier it has, builds images.

Tiers today: warm (an idle container of the function) and cold (new container:
netns + overlay rootfs + runc + agent import). Snapshot restore and fork zygotes
plug in as further tiers (see DESIGN.md).
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import psutil

from sdk.exception import (ContainerCrashError, Error, ExecutionError, InvalidError,
                           NodeUnavailableError, NotFoundError, SnapshotError)
from snapshot.store import SnapshotIncompatible

from . import agentfs, bundle, cgroups, criu_env, rootfs
from .blobs import BlobSource
from .builder import Builder, layer_keys
from .config import Paths
from .container import (Container, ContainerConfig, NodeContext, RemoteInitError,
                        start_lazy_pages)
from .gpu_snapshot import ENV_TOOL, GpuTarget
from .ids import new_id
from .lazy_daemons import SpareLazyDaemons
from .lazy_layers import LazyLayers
from .layers import LayerStore
from .netns import NetworkManager
from .runc import Runc
from .snapshots import SnapshotManager
from .warm_pool import FunctionPool, PoolPolicy, Work

log = logging.getLogger(__name__)
Emit = Callable[[dict], None]
PR_SET_CHILD_SUBREAPER = 36
# A cold start of a snapshot function waits this long for a snapshot of it that is still
# being stored (then restores it) before it starts cold instead.
SETTLE_WAIT_S = 2.0


class Node:
    def __init__(self, paths: Paths, name: str, blobs: BlobSource, *,
                 memory_budget_mb: int | None = None, max_containers_per_function: int = 4):
        self.paths, self.name, self.blobs = paths, name, blobs
        self.node_id = f"node-{name}"
        self.dir = paths.node_dir(name)
        self.runc = Runc(criu=str(paths.criu), restore_env=criu_env.restore_env(self.dir),
                         dump_env=criu_env.dump_env(self.dir))
        self.network = NetworkManager(owner=str(self.dir))
        self.layers = LayerStore(self.dir / "l", paths.base_rootfs)
        self.ctx: NodeContext | None = None
        self.builder: Builder | None = None
        self.snapshots = SnapshotManager(self.dir / "s", self.runc)
        self.pools: dict[str, FunctionPool] = {}
        self.active: dict[str, dict] = {}
        total_mb = psutil.virtual_memory().total // 2**20
        self.memory_budget_mb = memory_budget_mb or int(total_mb * 0.75)
        self.max_per_fn = max_containers_per_function
        self.reserved_mb = 0
        self._mem_cond = asyncio.Condition()
        self.started_at = time.time()
        self.gpus = NodeGpus(self.dir / "gpu")
        self.lazy = LazyLayers(self.dir, self.layers, blobs)
        self._fn_latest: dict[str, dict] = {}        # function id -> newest description
        self.token: str | None = None          # for pulling snapshots from peer nodes
        self._snapshot_peers: dict[str, list[str]] = {}   # function id -> peer node URLs
        self.stats = {"calls": 0, "cold": 0, "warm": 0, "restore": 0, "errors": 0,
                      "snapshots_taken": 0, "snapshot_failures": 0, "restore_fallbacks": 0,
                      "preempted": 0}
        self._gpu_preempted: dict[str, dict] = {}     # container id -> who took its GPUs
        self._gpu_gone: dict[str, asyncio.Event] = {}  # set when that container is gone

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if os.geteuid() != 0:
            raise ExecutionError("the node daemon must run as root (it drives runc and mounts)")
        # Container inits are re-parented to us, so we can read their exit status.
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        for d in ("c", "l", "b", "a"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        await self._cleanup_stale()
        await asyncio.get_running_loop().run_in_executor(
            None, criu_env.refresh_kdat_cache, str(self.paths.criu))
        log.info("cgroup migration lock: %s", cgroups.favor_dynmods())
        agent_dir = agentfs.prepare(self.dir / "a")
        empty = self.dir / "empty"
        empty.mkdir(exist_ok=True)
        empty.chmod(0o555)
        criu = str(self.paths.criu)
        spares = SpareLazyDaemons(self.dir / "lzd",
                                  lambda image_dir, work: start_lazy_pages(criu, image_dir, work))
        self.snapshots.on_drop_hot = spares.drop
        self.ctx = NodeContext(self.runc, self.network, self.dir / "c", agent_dir,
                               empty_dir=str(empty), lazy_spares=spares)
        self.builder = Builder(self.ctx, self.layers, self.blobs, self.dir / "b")
        self.builder.lazy_policy = self.lazy.mount
        self.builder.access_dir = self.dir / "lz"
        self.lazy.start(self.token)
        self.network.refill_async(delay=0)      # at start nothing competes: fill it now
        await asyncio.get_running_loop().run_in_executor(None, self.gpus.start)

    async def _cleanup_stale(self) -> None:
        """A previous daemon may have died (kill -9): remove its containers, mounts, netns."""
        # Only containers whose dirs live under this node's state dir are ours: other
        # node daemons on the same machine share the runc root.
        cdir = self.dir / "c"
        mine = [d.name for d in cdir.iterdir()] if cdir.exists() else []
        running = set(await self.runc.list_ids())
        for cid in mine:
            if cid in running:
                await self.runc.kill(cid)
                await self.runc.delete(cid)
            else:       # restored by CRIU directly (criu_restore.py): only its cgroup knows it
                await asyncio.get_running_loop().run_in_executor(
                    None, cgroups.v1_kill_and_remove, f"/runtimed/{cid}")
        for cid in mine:
            rootfs.teardown(cdir / cid)
        for mp in (self.dir / "lz").glob("*") if (self.dir / "lz").exists() else []:
            if mp.is_dir() and os.path.ismount(mp):    # a lazy mount whose server died with us
                rootfs.umount(str(mp))
        self.layers.cleanup_tmp()
        await asyncio.get_running_loop().run_in_executor(None, self._kill_stale_spares)
        n = self.network.cleanup_stale()
        if mine or n:
            log.info("cleaned up %d stale containers, %d netns", len(mine), n)

    def _kill_stale_spares(self) -> None:
        """Spare lazy-pages daemons of a daemon that died wait for a restore forever."""
        mark = f"{self.dir / 'lzd'}/"
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(a.startswith(mark) for a in p.info["cmdline"] or ()):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(self.dir / "lzd", ignore_errors=True)

    async def shutdown(self) -> None:
        await self.snapshots.settle(timeout=60)        # a dump being stored is not lost
        if self.ctx is not None and self.ctx.lazy_spares is not None:
            await self.ctx.lazy_spares.close()
        for pool in list(self.pools.values()):
            await pool.close()
        self.pools.clear()
        await self.lazy.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self.network.drain)

    # -- images ------------------------------------------------------------------------------
    async def build(self, image: dict, emit: Emit) -> list[dict]:
        assert self.builder is not None
        return await self.builder.ensure(image, emit, build=True)

    # -- calls -------------------------------------------------------------------------------
    def _pool(self, fn: dict) -> FunctionPool:
        key = fn["id"]
        # New containers use the newest description: its image's layer fields change when
        # a layer's eStargz is republished with a recorded prefetch area.
        self._fn_latest[key] = fn
        pool = self.pools.get(key)
        if pool is None:
            policy = PoolPolicy(
                min_containers=int(fn.get("min_containers") or 0),
                max_containers=int(fn.get("max_containers") or self.max_per_fn),
                scaledown_window=float(fn.get("scaledown_window") or 60.0))
            pool = FunctionPool(key, policy, lambda: self._new_container(self._fn_latest[key]))
            self.pools[key] = pool
        return pool

    async def drain(self, function_id: str) -> int:
        """Stop the function's idle containers (so its next call starts cold or restores)."""
        pool = self.pools.get(function_id)
        if pool is None:
            return 0
        n = await pool.evict_idle(len(pool.containers))
        for _ in range(100):          # eviction finishes in the containers' tasks
            if not any(c.state.value == "idle" for c in pool.containers):
                break
            await asyncio.sleep(0.01)
        return n

    async def prewarm(self, fn: dict) -> None:
        self._pool(fn)._scale()

    async def run(self, req: dict, emit: Emit) -> dict:
        """Run one call; returns {ok, payload, exc..., tier, container_id, spans}."""
        fn = req["function"]
        call_id = req["call_id"]
        loop = asyncio.get_running_loop()
        t_submit = time.perf_counter()
        self.active[call_id] = {"call_id": call_id, "function": fn.get("name"),
                                "since": time.time(), "state": "queued"}

        async def in_container(c: Container) -> dict:
            self.active[call_id].update(state="running", container=c.id)
            queue_ms = (time.perf_counter() - t_submit) * 1000
            fork = bool(fn.get("fork"))
            # The call paid for the container's start only if it was already waiting
            # when the container became ready; otherwise the container was idle: warm.
            started_for_it = c.calls_served == 0 and c.ready_at >= t_submit
            tier = c.tier if started_for_it else ("fork" if fork else "warm")
            t0 = time.perf_counter()
            try:
                frame = await c.call(call_id, req["args"],
                                     method=fn.get("method") or req.get("method"),
                                     timeout=float(fn.get("timeout") or 300),
                                     sink=lambda s, t: emit({"type": "log", "stream": s,
                                                             "text": t}),
                                     fork=fork)
            except Exception as e:
                if c.id in self._gpu_preempted:     # we killed it: its GPUs were taken
                    self.stats["preempted"] += 1
                    raise self._preempted_error(c.id) from e
                raise
            spans = {"queue": round(queue_ms, 3)}
            if started_for_it:
                spans.update(c.spans.items)
            if frame.get("fork_ms") is not None:
                spans["fork"] = round(float(frame.get("fork_ms")), 3)
            spans["execute"] = round(float(frame.get("run_ms", 0) or 0), 3)
            extra = {"snapshot": c.snapshot_note} if tier in (
                "cold", "restore", "restore_lazy", "restore_peer") and c.snapshot_note else {}
            if c.restore_mode and c.calls_served == 1 and started_for_it:
                # restore -> first result: lazy restores pay their page faults in the call
                self.snapshots.record_restore(c.restore_mode[0], c.restore_mode[1],
                                              (time.perf_counter() - c.restore_mode[2]) * 1000)
            spans["call"] = round((time.perf_counter() - t0) * 1000, 3)
            return {"ok": bool(frame.get("ok")), "payload": frame.payload,
                    "exc_type": frame.get("exc_type"), "exc_module": frame.get("exc_module"),
                    "message": frame.get("message"), "traceback": frame.get("traceback"),
                    "tier": tier, "container_id": c.id, "node_id": self.node_id, "spans": spans,
                    **extra}

        self._snapshot_peers[fn["id"]] = list(req.get("snapshot_peers") or [])
        fut: asyncio.Future = loop.create_future()
        self._pool(fn).submit(Work(call_id, in_container, fut))
        try:
            result = await fut
            self.stats[result["tier"]] = self.stats.get(result["tier"], 0) + 1
            return result
        except RemoteInitError as e:
            f = e.frame
            return {"ok": False, "payload": f.payload, "exc_type": f.get("exc_type"),
                    "exc_module": f.get("exc_module"), "message": f.get("message"),
                    "traceback": f.get("traceback"), "tier": "cold", "node_id": self.node_id,
                    "spans": {}, "init_error": True}
        except Error:
            self.stats["errors"] += 1
            raise
        except Exception as e:
            self.stats["errors"] += 1
            log.exception("call %s failed in the node", call_id)
            raise ContainerCrashError(f"the node could not run the call: {e}") from e
        finally:
            self.stats["calls"] += 1
            self.active.pop(call_id, None)
            self.lazy.call_done(layer_keys(fn["image"]))
            if fut.done() is False:
                fut.cancel()

    async def _new_container(self, fn: dict) -> Container:
        assert self.ctx is not None and self.builder is not None
        image = fn["image"]
        t0 = time.perf_counter()
        await self.builder.ensure(image, lambda ev: None, build=False)
        blob_path = await self.blobs.fetch(fn["blob"])
        t_image = (time.perf_counter() - t0) * 1000
        memory = int(fn.get("memory") or 128)
        await self._reserve(memory, fn["id"])
        cid = new_id("ctr", 6)
        try:
            gpu, eviction = await self.gpus.reserve(fn, cid, self._idle_containers)
        except BaseException:
            await self._release(memory)
            raise
        if eviction is not None and (eviction.preempted or eviction.reclaimed):
            await self._stop_gpu_holders(eviction, fn)
        cfg = ContainerConfig(
            layers=tuple(d for k in layer_keys(image) for d in self.layers.lower_dirs(k)),
            env=tuple(sorted((image.get("env") or {}).items())) + tuple(
                sorted((fn.get("env") or {}).items())),
            workdir=image.get("workdir") or "/",
            cpu=float(fn.get("cpu") or 0.125), cpu_limit=float(fn.get("cpu_limit") or 0),
            memory_mb=memory, network=not fn.get("block_network", False))
        if gpu is not None:
            cfg = dataclasses.replace(
                cfg, gpu=gpu, env=cfg.env + gpu.start_env((image.get("env") or {}).get(
                    "LD_LIBRARY_PATH", "")),
                binds=cfg.binds + tuple(bundle.BindMount(src, dst, ro)
                                        for src, dst, ro in gpu.binds()))
        try:
            c = await self._start_container(fn, cfg, blob_path, cid)
        except BaseException:
            await self._release(memory)
            await self._gpus_released(cid)
            raise
        c.on_destroy.append(lambda: self._gpus_released(cid))
        c.spans.items["image"] = round(t_image, 3)
        c.on_destroy.append(lambda: self._release(memory))
        if cid in self._gpu_preempted:      # its GPUs were taken while it was starting
            err = self._preempted_error(cid)
            await c.destroy()
            raise err
        return c

    # -- GPU preemption --------------------------------------------------------------------------
    def _idle_containers(self) -> frozenset[str]:
        return frozenset(c.id for p in self.pools.values() for c in p.containers
                         if c.state.value == "idle")

    def _gpu_allocations(self) -> list[dict]:
        calls = {a["container"]: cid for cid, a in self.active.items() if a.get("container")}
        return self.gpus.allocations_wire(self._idle_containers(), calls)

    async def _stop_gpu_holders(self, eviction, fn: dict, wait_s: float = 30.0) -> None:
        """Stop the containers whose GPUs `reserve` just gave to a new container of `fn`,
        and wait until they are gone (their processes no longer hold the GPUs). A call
        running in one fails with GpuPreemptedError: the dispatcher requeues it."""
        pool = self.pools.get(fn["id"])
        by_call = pool.queue[0].call_id if pool is not None and pool.queue else ""
        waits = []
        for a in eviction.preempted + eviction.reclaimed:
            self._gpu_preempted[a.alloc_id] = {
                "by_call": by_call, "by_function": str(fn.get("name", fn["id"])),
                "priority": eviction.placement.priority, "gpus": a.gpus,
                "victim_priority": a.priority}
            waits.append(self._gpu_gone.setdefault(a.alloc_id, asyncio.Event()))
        for a in eviction.preempted + eviction.reclaimed:
            for p in list(self.pools.values()):
                if await p.stop(a.alloc_id):
                    log.info("GPU %s: stopped %s container %s (priority %d) for %s (priority %d)",
                             ",".join(map(str, a.gpus)),
                             "busy" if a in eviction.preempted else "idle", a.alloc_id,
                             a.priority, by_call or fn["id"], eviction.placement.priority)
                    break
            # not in a pool: still starting; _new_container stops it once started
        try:
            await asyncio.wait_for(asyncio.gather(*(w.wait() for w in waits)), wait_s)
        except TimeoutError:
            log.warning("preempted containers still running after %.0f s: %s", wait_s,
                        [a.alloc_id for a in eviction.preempted + eviction.reclaimed])

    async def _gpus_released(self, cid: str) -> None:
        await self.gpus.release(cid)
        self._gpu_preempted.pop(cid, None)
        ev = self._gpu_gone.pop(cid, None)
        if ev is not None:
            ev.set()

    def _preempted_error(self, cid: str) -> Error:
        from cuda_restore.errors import GpuPreemptedError
        why = self._gpu_preempted.get(cid, {})
        by = why.get("by_call") or f"a call of {why.get('by_function', '?')}"
        return GpuPreemptedError(
            f"preempted on {self.node_id}: GPU {','.join(map(str, why.get('gpus', ())))} "
            f"given to {by} (priority {why.get('priority', '?')} > "
            f"{why.get('victim_priority', '?')}); the call is queued again",
            by_call=why.get("by_call", ""), by_function=why.get("by_function", ""),
            priority=int(why.get("priority", 0)), node_id=self.node_id,
            gpus=tuple(why.get("gpus", ())))

    async def _start_container(self, fn: dict, cfg: ContainerConfig, blob_path: Path,
                               cid: str | None = None) -> Container:
        """Restore the function's snapshot if this node has a usable one, else cold start
        (taking the snapshot at the snapshot point when the function asks for one)."""
        note = ""
        storing = False
        if fn.get("snapshot"):
            # A snapshot just taken may still be being stored: worth a short wait.
            storing = not await self.snapshots.settle(fn["id"], timeout=SETTLE_WAIT_S)
            found = self.snapshots.lookup(fn["id"])
            if found.manifest is not None:
                sid = found.manifest.snapshot_id
                try:
                    return await self._restore(fn, cfg, found.manifest, cid)
                except SnapshotIncompatible as e:    # fine elsewhere: keep it
                    note = f"snapshot {sid} not restorable here, cold start used: {e}"
                    log.info("%s", note)
                    self.stats["restore_fallbacks"] += 1
                except Exception as e:  # noqa: BLE001 - any failure: cold start instead
                    note = f"restore of {sid} failed, cold start used: {e}"
                    log.warning("%s", note)
                    self.stats["restore_fallbacks"] += 1
                    try:      # the store may already have quarantined it (corrupt chunk)
                        self.snapshots.store.remove(sid)
                    except Exception:  # noqa: BLE001
                        pass
                    self.snapshots.drop_hot(sid)
            elif found.reason and found.reason != "no snapshot yet":
                note = found.reason
            elif self._snapshot_peers.get(fn["id"]) and self.token:
                # Another node holds the snapshot: pull what we lack, then restore it.
                t = time.perf_counter()
                try:
                    m, stats, peer = await self.snapshots.pull_from_peers(
                        fn["id"], self._snapshot_peers[fn["id"]], self.token)
                    pull_ms = (time.perf_counter() - t) * 1000
                    c = await self._restore(fn, cfg, m, cid)
                    c.spans.items["snapshot_pull"] = round(pull_ms, 3)
                    c.tier = "restore_peer"
                    c.snapshot_note += (f"; pulled from {peer}: {stats.chunks_fetched} chunks "
                                        f"({stats.bytes_fetched / 2**20:.1f} MiB), "
                                        f"{stats.chunks_reused} already here")
                    return c
                except Exception as e:  # noqa: BLE001 - cold start instead
                    note = f"snapshot pull failed, cold start used: {e}"
                    log.warning("%s", note)

        async def take_snapshot(c: Container) -> None:
            nonlocal note
            try:
                m = await self.snapshots.take(c, fn["id"], fn["image"].get("id", ""), fn["id"],
                                              snapshot_meta(fn, cfg), gpu=self.gpus.target(c.id))
                self.stats["snapshots_taken"] += 1
                note = (note + "; " if note else "") + f"snapshot {m.snapshot_id} taken"
            except Exception as e:  # noqa: BLE001 - the function runs on without a snapshot
                self.stats["snapshot_failures"] += 1
                note = (note + "; " if note else "") + f"no snapshot: {e}"
                log.warning("snapshot of %s failed: %s", fn.get("name"), e)

        if storing:
            note = (note + "; " if note else "") + "its snapshot is still being stored"
        snap = bool(fn.get("snapshot")) and not storing     # one snapshot at a time per key
        c = Container(cid or new_id("ctr", 6), self.ctx, cfg, function_key=fn["id"])
        try:
            await c.start()
            await c.init(blob_path.read_bytes(), timeout=float(fn.get("startup_timeout") or 300),
                         snapshot=snap, fork=bool(fn.get("fork")),
                         on_snap_point=take_snapshot if snap else None)
        except BaseException:
            await c.destroy()
            raise
        c.snapshot_note = note
        return c

    async def _restore(self, fn: dict, cfg: ContainerConfig, manifest,
                       cid: str | None = None) -> Container:
        assert self.ctx is not None
        c = Container(cid or new_id("ctr", 6), self.ctx, cfg, function_key=fn["id"])
        sid = manifest.snapshot_id
        cuda_tool = await self._cuda_restore_check(manifest, c.id)
        mode = self.snapshots.choose_mode(sid, fn.get("restore_mode"))
        try:
            t = t0 = time.perf_counter()
            src = await self.snapshots.source(manifest, lazy=mode == "lazy")
            c.spans.add("materialize", t)
            await c.start(restore=src)
            if cuda_tool is not None:
                await self._cuda_resume_restored(c, manifest, cuda_tool)
            await c.resume()
        except BaseException:
            await c.destroy()
            raise
        c.restore_mode = (sid, mode, t0)
        c.snapshot_note = f"restored {sid} ({mode})"
        c.tier = "restore" if mode == "eager" else "restore_lazy"
        return c

    async def _cuda_restore_check(self, manifest, cid: str):
        """For a snapshot holding suspended CUDA state: the cuda-checkpoint to resume it
        with. Raises SnapshotIncompatible when it cannot be restored onto the GPUs `cid`
        was given here (another GPU model or driver, no tool). None: nothing to resume."""
        from cuda_restore.checkpoint import restore_incompatibility
        if manifest.meta.get("gpu_snapshot_path") != "cuda_checkpoint":
            return None
        target = self.gpus.target(cid)
        tool = await asyncio.get_running_loop().run_in_executor(None, self.gpus.find_tool)
        names, uuids = (list(target.gpu_names), list(target.gpu_uuids)) if target else ([], [])
        why = restore_incompatibility(manifest.meta, self.gpus.inventory.driver_version,
                                      names, uuids, tool)
        if why:
            raise SnapshotIncompatible(f"snapshot {manifest.snapshot_id}: {why}",
                                       snapshot_id=manifest.snapshot_id, reason=why)
        return tool

    async def _cuda_resume_restored(self, c: Container, manifest, tool) -> None:
        """After the CRIU restore: the GPUs' device nodes go in first, then CUDA is resumed
        in each process that was suspended for the snapshot (by its namespace pid)."""
        from cuda_restore.checkpoint import suspended_pids

        from .gpu_snapshot import host_pids_for, ns_pids, resume_pids
        t = time.perf_counter()
        await c.attach_gpus()
        loop = asyncio.get_running_loop()
        host_to_ns = await loop.run_in_executor(None, ns_pids, cgroups.pids_in(c.cgroup_path))
        pids = host_pids_for(suspended_pids(manifest.meta), host_to_ns)
        await resume_pids(tool, pids, f"in the restored {manifest.snapshot_id}")
        c.spans.add("cuda_resume", t)

    # -- lazy images ---------------------------------------------------------------------------
    async def evict_layer(self, key: str) -> dict:
        """Forget a layer (admin, benchmarks: 'a node that never saw this image'). Refused
        while a container of this node still uses it."""
        if key not in self.layers.lazy and not self.layers.has(key):
            return {"key": key[:16], "evicted": False}
        in_use = [c.id for p in self.pools.values() for c in p.containers
                  if any(str(layer).startswith(str(self.layers.path(key))) or
                         (key in self.layers.lazy and
                          str(layer) == self.layers.lazy[key].mountpoint)
                         for layer in c.cfg.layers)]
        if in_use:
            raise InvalidError(f"layer {key[:16]} is in use by {', '.join(in_use)}; drain first")
        await self.lazy.forget(key)
        shutil.rmtree(self.layers.path(key), ignore_errors=True)
        return {"key": key[:16], "evicted": True}

    async def _reserve(self, mb: int, for_fn: str) -> None:
        if mb > self.memory_budget_mb:
            raise InvalidError(f"memory={mb} MiB is more than this node offers "
                               f"({self.memory_budget_mb} MiB)")
        deadline = time.monotonic() + 120
        async with self._mem_cond:
            while self.reserved_mb + mb > self.memory_budget_mb:
                # Evict idle containers of other functions, least recently used first.
                victims = sorted((c for k, p in self.pools.items() if k != for_fn
                                  for c in p.containers if c.state.value == "idle"),
                                 key=lambda c: c.last_used)
                if victims:
                    v = victims[0]
                    await self.pools[v.function_key].evict_idle(1)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeUnavailableError(
                        f"node {self.name} has no memory for {mb} MiB "
                        f"({self.reserved_mb}/{self.memory_budget_mb} MiB reserved)")
                try:
                    await asyncio.wait_for(self._mem_cond.wait(), min(left, 1.0))
                except asyncio.TimeoutError:
                    pass
            self.reserved_mb += mb

    async def _release(self, mb: int) -> None:
        async with self._mem_cond:
            self.reserved_mb -= mb
            self._mem_cond.notify_all()

    # -- introspection -------------------------------------------------------------------------
    def _layer_states(self) -> list[dict]:
        """Each layer on this node: local (unpacked), or lazy (FUSE mount, bytes fetched so
        far); a lazily mounted layer that has since been pulled fully says so."""
        out = {li.key: {"key": li.key, "size": li.size, "source": li.source, "hits": li.hits,
                        "state": "local"} for li in self.layers.list()}
        self.lazy.states(out)
        return list(out.values())

    def holdings(self) -> dict:
        """What placement needs to know about this node (sent with every heartbeat)."""
        return {"snapshots": self.snapshots.keys(), "gpus": self.gpus.wire(),
                "gpu": self.gpus.inventory.to_wire(),
                "gpu_allocations": self._gpu_allocations(),
                "layers": [li.key for li in self.layers.list_keys()],
                "warm": {k: p.idle for k, p in self.pools.items()}}

    def status(self) -> dict:
        containers = [c.describe() for p in self.pools.values() for c in p.containers]
        return {
            "node_id": self.node_id, "name": self.name, "started_at": self.started_at,
            "memory_budget_mb": self.memory_budget_mb, "reserved_mb": self.reserved_mb,
            "cpu_count": os.cpu_count(), "containers": containers,
            "gpus": self.gpus.wire(), "gpu_allocations": self._gpu_allocations(),
            "pools": {k: {"live": p.live, "idle": p.idle, "queued": len(p.queue)}
                      for k, p in self.pools.items()},
            "active_calls": list(self.active.values()), "stats": dict(self.stats),
            "lazy_spares": len(self.ctx.lazy_spares) if self.ctx and self.ctx.lazy_spares else 0,
            "lazy_spare_snapshots": self.ctx.lazy_spares.snapshots()
            if self.ctx and self.ctx.lazy_spares else [],
            "layers": self._layer_states(), "chunk_cache": self.lazy.cache_usage,
            "lazy": self.lazy.config(),
        }




def _cfg_wire(cfg: ContainerConfig) -> dict:
    return {"layers": [str(p) for p in cfg.layers], "env": [list(kv) for kv in cfg.env],
            "workdir": cfg.workdir, "cpu": cfg.cpu, "cpu_limit": cfg.cpu_limit,
            "memory_mb": cfg.memory_mb, "network": cfg.network}


def _cfg_from_wire(d: dict) -> ContainerConfig:
    missing = [p for p in d["layers"] if not Path(p).exists()]
    if missing:
        raise SnapshotError(f"the snapshot's image layers are not on this node: {missing[:2]}")
    return ContainerConfig(layers=tuple(Path(p) for p in d["layers"]),
                           env=tuple(tuple(kv) for kv in d["env"]), workdir=d["workdir"],
                           cpu=d["cpu"], cpu_limit=d["cpu_limit"], memory_mb=d["memory_mb"],
                           network=d["network"])


def snapshot_meta(fn: dict, cfg: ContainerConfig) -> dict[str, str]:
    return {"function_name": str(fn.get("name", "")),
            "container_config": json.dumps(_cfg_wire(cfg))}


class NodeGpus:
    """This node's GPUs: NVML inventory, driver libraries staged for containers, and the
    ledger of which container holds which GPU (cuda_restore does the planning).

    RUNTIMED_FAKE_GPUS=<preset> (a `cuda_restore.fake_nvml.PRESETS` name, for tests and
    development on hosts without GPUs): the inventory is that fake machine's; GPUs are
    scheduled, reserved and preempted as usual, but nothing is bound into containers, so
    GPU functions run on the CPU.

    RUNTIMED_CUDA_CHECKPOINT=<path> (or `cuda_checkpoint` in the node's /v1/config): the
    cuda-checkpoint used for snapshots of processes holding a CUDA context; unset, it is
    searched on PATH, /usr/bin, /usr/local/bin."""

    def __init__(self, root: Path):
        from cuda_restore.inventory import GpuProbe, NodeGpuInventory
        from cuda_restore.scheduler import GpuLedger
        self.root = root
        self.fake = os.environ.get("RUNTIMED_FAKE_GPUS", "").strip() or None
        self.probe = GpuProbe(nvml=_fake_nvml(self.fake)) if self.fake else GpuProbe()
        self.inventory = NodeGpuInventory.empty("not read yet")
        self.ledger = GpuLedger()
        self.driver_dir: str | None = None
        self.cuda_checkpoint: str | None = os.environ.get(ENV_TOOL, "").strip() or None
        self._cond = asyncio.Condition()

    def start(self) -> None:
        from cuda_restore import assign
        from cuda_restore.errors import GpuAssignError
        self.inventory = self.probe.read()
        if self.inventory.gpus and self.fake:
            log.warning("GPUs are fake (RUNTIMED_FAKE_GPUS=%s): GPU functions run on the CPU",
                        self.fake)
        elif self.inventory.gpus:
            try:
                libs = assign.driver_libraries(assign.parse_ldconfig(assign.run_ldconfig()))
                self.driver_dir = str(assign.stage_driver_dir(assign.plan_driver_dir(libs),
                                                              self.root))
            except GpuAssignError as e:
                log.warning("GPU driver libraries unusable, serving CPU functions only: %s", e)
                self.inventory = type(self.inventory).empty(str(e))
        log.info("GPUs: %s", self.inventory.summary())

    def wire(self) -> list:
        return self.inventory.to_wire().get("gpus", []) if self.inventory.gpus else []

    def find_tool(self):
        """This node's cuda-checkpoint (features from its --help), or None."""
        from cuda_restore.checkpoint import find_tool
        return find_tool(self.cuda_checkpoint)

    def target(self, cid: str) -> GpuTarget | None:
        """The GPUs container `cid` holds, for a GPU snapshot (None: it holds none)."""
        alloc = self.ledger.get(cid)
        if alloc is None or not self.inventory.gpus:
            return None
        gpus = [self.inventory.gpu(i) for i in alloc.gpus]
        return GpuTarget(self.inventory.driver_version, tuple(g.name for g in gpus),
                         tuple(g.uuid for g in gpus), self.cuda_checkpoint)

    async def reserve(self, fn: dict, cid: str, idle: Callable[[], frozenset[str]],
                      timeout: float = 120.0):
        """GPUs for a new container `cid` of `fn`: (assignment, eviction), or (None, None)
        when it asks for none. `idle()` names the holders serving no call now. The
        eviction's holders are already out of the ledger: the caller MUST stop them (and
        requeue the calls of `eviction.preempted`) before the container uses the GPUs."""
        from cuda_restore.assign import plan_assignment
        from cuda_restore.errors import NoCapacityError
        from cuda_restore.preempt import plan_eviction
        from cuda_restore.request import function_gpu_request
        req = function_gpu_request(fn)
        if req is None:
            return None, None
        deadline = time.monotonic() + timeout
        async with self._cond:
            while True:
                try:   # GpuUnsatisfiableError (never fits here) propagates as InvalidError
                    ev = plan_eviction(req, {"local": self.inventory}, self.ledger, idle())
                    self.ledger.allocate(cid, ev.placement, owner=cid)
                    if self.fake:
                        return None, ev
                    return plan_assignment(self.inventory, ev.placement.gpus,
                                           driver_dir=self.driver_dir), ev
                except NoCapacityError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    try:
                        await asyncio.wait_for(self._cond.wait(), min(left, 1.0))
                    except asyncio.TimeoutError:
                        pass

    async def release(self, cid: str) -> None:
        async with self._cond:
            if self.ledger.release(cid) is not None:
                self._cond.notify_all()

    def allocations_wire(self, idle: frozenset[str], calls: dict[str, str]) -> list[dict]:
        """The ledger for placement: each holder marked idle or with the call it runs."""
        return [dict(a.to_wire(), idle=a.alloc_id in idle, call_id=calls.get(a.alloc_id))
                for a in self.ledger.allocations]


def _fake_nvml(preset: str):
    from cuda_restore.fake_nvml import PRESETS
    if preset not in PRESETS:
        raise InvalidError(f"RUNTIMED_FAKE_GPUS={preset!r}: not one of {', '.join(PRESETS)}")
    return PRESETS[preset]()


class SnapshotAdmin:
    """What `runtimectl snapshot ...` and `runtimectl restore` do on a node."""

    def __init__(self, node: Node):
        self.node = node
        self.mgr = node.snapshots

    def _container(self, cid: str) -> Container:
        for p in self.node.pools.values():
            for c in p.containers:
                if c.id == cid:
                    return c
        raise NotFoundError(f"no container {cid} on this node")

    async def create(self, target: str, fn: dict | None) -> dict:
        """Snapshot a container as it is now (idle), or a function at its snapshot point
        (a new container is started with the snapshot taken; it then serves calls)."""
        if target.startswith("ctr-"):
            c = self._container(target)
            if c.state.value != "idle":
                raise InvalidError(f"container {target} is {c.state.value}; snapshot it when idle")
            m = await (await self.mgr.take(c, f"{c.function_key}/{c.id}", "", c.function_key,
                                           {"container_config": json.dumps(_cfg_wire(c.cfg))})
                       ).stored()
            return {"snapshot_id": m.snapshot_id, "raw_size": m.raw_size,
                    "stored_size": m.stored_size, "meta": m.meta}
        if fn is None:
            raise NotFoundError(f"unknown function {target}")
        fn = dict(fn, snapshot=True)
        c = await self.node._new_container(fn)
        note = c.snapshot_note
        await c.destroy()
        await self.mgr.settle(fn["id"])
        found = self.mgr.lookup(fn["id"]).manifest
        if found is None:
            raise SnapshotError(f"no snapshot was taken: {note}")
        return {"snapshot_id": found.snapshot_id, "raw_size": found.raw_size,
                "stored_size": found.stored_size, "meta": found.meta, "note": note}

    async def restore(self, snapshot_id: str, mode: str = "eager") -> dict:
        """Restore a snapshot into a fresh sandbox (eager, or lazy pages), time it, and
        tear it down."""
        assert self.node.ctx is not None
        m = self.mgr.store.get(snapshot_id)
        reason = m.fingerprint.incompatibility(self.mgr.fingerprint)
        if reason:
            raise SnapshotError(f"snapshot {snapshot_id} cannot be restored here: {reason}")
        if "container_config" not in m.meta:
            raise SnapshotError(f"snapshot {snapshot_id} does not record its container config")
        if m.meta.get("gpu_snapshot_path") == "cuda_checkpoint":
            raise SnapshotError(f"snapshot {snapshot_id} holds suspended CUDA state: it is "
                                "restored by a call of its function, which is given GPUs")
        fn_cfg = _cfg_from_wire(json.loads(m.meta["container_config"]))
        c = Container(new_id("ctr", 6), self.node.ctx, fn_cfg, function_key=m.function_id)
        c.tier = "restore"
        t0 = time.perf_counter()
        try:
            src = await self.mgr.source(m, lazy=mode == "lazy")
            c.spans.add("materialize", t0)
            await c.start(restore=src)
            await c.resume()
            total = (time.perf_counter() - t0) * 1000
        finally:
            await c.destroy()
        return {"snapshot_id": snapshot_id, "mode": mode, "total_ms": round(total, 3),
                "spans": c.spans.items}
