"""The dispatcher (control plane): HTTP API for blobs, images, functions and calls;
keeps their state in the store (store.py: SQLite embedded, or Redis shared by several
replicas); takes calls from the queue, picks a node for each (registry.py,
placement.py) and drives it to a result.

    PUT  /v1/blobs/{sha256}           body = bytes (verified)      HEAD/GET as usual
    POST /v1/images                   image spec -> NDJSON build progress, last line done|error
    POST /v1/layers/{key}/estargz     a node's rewrite of the layer's eStargz (recorded prefetch)
    POST /v1/functions                {name, app, blob, image_id, config} -> {function_id}
    POST /v1/functions/{id}/drain     stop the function's idle containers on every node
    POST /v1/calls                    {function_id, args_b64, wait, node_id?} -> call state
    POST /v1/calls/batch              {function_id, inputs: [args_b64]} -> {call_ids}
    GET  /v1/calls/{id}?wait=&logs_after=   long-poll: returns on completion or new logs
    POST /v1/calls/{id}/cancel        GET /v1/calls/{id}/logs     GET /v1/calls
    POST /v1/nodes/register|heartbeat GET /v1/nodes   GET /v1/containers   GET /v1/status

Backpressure: when RUNTIMED_MAX_PENDING calls are unfinished (queued or running, all
replicas together), POST /v1/calls and /v1/calls/batch answer 429 with Retry-After
(estimated from the recent completion rate); the SDK waits and retries.

GPU priorities: a GPU call that fits nowhere may preempt GPU calls of lower priority
(placement.py); the node stops them and each preempted call is queued again without
using a retry, its `events` saying by which call (preemption.py).

Faults: a call whose node dies (connection broken, or heartbeats missed while the
call runs) is retried on another node, counted against the function's `retries`;
when none are left the caller gets NodeUnavailableError saying so. Calls are
delivered at least once (store.py says when a call can run twice).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections import OrderedDict, deque
from pathlib import Path

from sdk.exception import Error, InvalidError, NodeUnavailableError, NotFoundError, OverloadedError

from . import preemption
from .blobs import LocalBlobStore
from .builder import layer_keys
from .config import DEFAULT_PORT, Paths
from .http_util import require
from .ids import content_id
from .node_client import NodeLost
from .registry import NodeEntry, NodeRegistry
from .store import (
    TERMINAL,
    BackendConfig,
    Claim,
    InvalidCallTransition,
    NewCall,
    Overloaded,
    Store,
    open_store,
)

log = logging.getLogger("runtimed.dispatcher")

QUEUE_TIMEOUT = 300.0          # a call waits this long for any node before failing
MAX_UNSTARTED = 20             # requeues of a call whose node refused the connection
MAX_DRIVING = 1000             # calls one replica drives at once (the rest wait in the queue)
WATCH_S = 1.0                  # how often a running call checks its node is still alive
FINAL_CACHE = 4096             # finished call states kept in memory for long-pollers
RATE_WINDOW_S = 10.0
REMOTE_POLL_S = 5.0            # long-pollers re-read calls driven elsewhere this often
RETRYABLE_CODES = {"oom", "function_timeout", "container_crashed", "node_unavailable",
                   "execution_failed"}


class Busy(OverloadedError):
    """429 with a Retry-After hint."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def _b64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidError(f"{what} must be base64") from None


class Dispatcher:
    def __init__(self, paths: Paths, token: str, cfg: BackendConfig | None = None,
                 port: int = DEFAULT_PORT, store: Store | None = None):
        self.paths, self.token = paths, token
        self.cfg = cfg or BackendConfig.from_env()
        self.store: Store = store or open_store(self.cfg, paths.dispatcher_dir,
                                                self.cfg.replica_name(port))
        self.blobs = LocalBlobStore(self.cfg.blob_dir or paths.dispatcher_dir / "blobs")
        self.bound = self.cfg.max_pending
        self.placement_policy = os.environ.get("RUNTIMED_PLACEMENT", "affinity")
        # RUNTIMED_SNAPSHOT_PEERS=0: nodes never pull a snapshot from a peer (benchmarks)
        self.peer_transfer = os.environ.get("RUNTIMED_SNAPSHOT_PEERS", "1") != "0"
        self.registry = NodeRegistry(self.store, token, self.placement_policy)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._driving: dict[str, tuple[asyncio.Task, Claim]] = {}
        self._room = asyncio.Event()
        self._final: OrderedDict[str, tuple[dict, bool]] = OrderedDict()
        self._logbuf: dict[str, list[tuple[str, str]]] = {}
        self._logflush: dict[str, asyncio.Task] = {}
        self._logged: set[str] = set()          # calls that wrote logs while we drove them
        self._done: deque[float] = deque(maxlen=100_000)
        self._fn_cache: dict[str, dict] = {}
        self._bg: list[asyncio.Task] = []
        self._closing = False
        self.started_at = time.time()

    @property
    def replica(self) -> str:
        return self.store.replica

    @property
    def nodes(self) -> dict[str, NodeEntry]:
        return self.registry.nodes

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store; calls left unfinished (this replica's, or a dead replica's once
        they are idle long enough) come back from the queue first: at-least-once."""
        await self.store.open()
        self.store.set_callbacks(self._remote_change, self._claim_lost)
        await self.registry.sync()
        loop = asyncio.get_running_loop()
        self._bg = [loop.create_task(self._consume()), loop.create_task(self.registry.sync_loop())]
        log.info("dispatcher replica %s: backend %s, bound %d unfinished calls, placement %s",
                 self.replica, self.store.kind, self.bound, self.placement_policy)

    async def close(self) -> None:
        """Stop driving; unfinished calls stay unacknowledged and are driven again."""
        self._closing = True       # a cancellation can be swallowed (3.11 wait_for race)
        self.registry.stopping = True
        tasks = self._bg + [t for t, _ in self._driving.values()] + list(self._logflush.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self.registry.close()
        await self.store.close()

    # -- notifications -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _watching(self, cid: str):
        ev = asyncio.Event()
        self._waiters.setdefault(cid, set()).add(ev)
        try:
            yield ev
        finally:
            s = self._waiters.get(cid)
            if s is not None:
                s.discard(ev)
                if not s:
                    del self._waiters[cid]

    def _notify(self, cid: str) -> None:
        for ev in self._waiters.get(cid, ()):
            ev.set()

    def _remote_change(self, cid: str) -> None:
        """Another replica ended the call or wrote its logs (store pub/sub)."""
        self._notify(cid)
        if cid in self._driving:               # cancelled elsewhere, or a duplicate ended it
            asyncio.get_running_loop().create_task(self._stop_if_terminal(cid))

    async def _stop_if_terminal(self, cid: str) -> None:
        call = await self.store.get_call(cid)
        entry = self._driving.get(cid)
        if entry and (call is None or call["status"] in TERMINAL):
            entry[0].cancel()
            await self.store.ack(entry[1])

    def _claim_lost(self, cid: str) -> None:
        entry = self._driving.get(cid)
        if entry:
            entry[0].cancel()

    # -- nodes -----------------------------------------------------------------------------------
    async def register_node(self, body: dict) -> None:
        await self.registry.register(body)

    async def heartbeat(self, body: dict) -> bool:
        return await self.registry.heartbeat(body)

    # -- images & functions ----------------------------------------------------------------------
    async def build_image(self, spec: dict, emit) -> dict:
        steps = spec.get("steps")
        if not isinstance(steps, list) or not steps:
            raise InvalidError("image spec needs a non-empty 'steps' list")
        for s in steps:
            if s.get("kind") == "files" and not self.blobs.has(s.get("blob", "")):
                raise InvalidError(f"files for step {s.get('desc')!r} were not uploaded")
        iid = content_id("img", steps[-1]["key"].encode())
        keys = layer_keys(spec)
        spec = dict(spec, id=iid, **await self._layer_fields(keys))
        node = await self.registry.wait_any(time.monotonic() + 60)
        built: list[dict] = []

        def on_event(ev: dict) -> None:
            if ev.get("type") == "layer":
                built.append(ev)
            emit(ev)

        try:
            report = await node.client.build(spec, on_event)
        finally:                   # layers built before a failing step are kept
            for ev in built:
                extra = {k: v for k, v in ev.items()
                         if k not in ("type", "key", "digest", "size", "raw_size")}
                await self.store.put_layer(ev["key"], ev["digest"], ev.get("size", 0),
                                           ev.get("raw_size", 0), extra)
        spec.update(await self._layer_fields(keys))
        await self.store.put_image(iid, spec, report)
        return {"image_id": iid, "report": report}

    async def register_function(self, body: dict) -> str:
        name, blob = require(body, "name"), require(body, "blob")
        image_id = require(body, "image_id")
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise InvalidError("'config' must be an object")
        prio = config.get("priority", 0)
        if not isinstance(prio, int) or isinstance(prio, bool):
            raise InvalidError(f"config 'priority' must be an integer, not {prio!r}")
        if not self.blobs.has(blob):
            raise InvalidError(f"function blob {blob[:16]}… was not uploaded")
        if await self.store.get_image(image_id) is None:
            raise NotFoundError(f"image {image_id} is not built; build it first")
        fid = content_id("fn", json.dumps([blob, image_id, config, name],
                                          sort_keys=True).encode())
        await self.store.put_function(fid, name, body.get("app", ""), blob, image_id, config)
        self._fn_cache.pop(fid, None)
        if int(config.get("min_containers") or 0) > 0:
            asyncio.get_running_loop().create_task(self._prewarm(fid))
        return fid

    async def function_for_node(self, fid: str) -> dict:
        fn = self._fn_cache.get(fid)
        if fn is None:
            rec = await self.store.get_function(fid)
            if rec is None:
                raise NotFoundError(f"unknown function {fid}")
            image = await self.store.get_image(rec["image_id"])
            if image is None:
                raise NotFoundError(f"image {rec['image_id']} of function {fid} is gone")
            image.update(await self._layer_fields(layer_keys(image)))
            fn = dict(rec["config"], id=fid, name=rec["name"], blob=rec["blob"], image=image)
            self._fn_cache[fid] = fn
        return fn

    async def _layer_fields(self, keys: list[str]) -> dict:
        """What a node needs to get an image's layers it lacks: `archives` (key -> tar.zst
        blob, pulled in full) and `lazy_layers` (key -> eStargz blob info + archive, for a
        lazy FUSE mount while the archive is pulled behind it)."""
        infos = await self.store.layer_infos(keys)
        lazy = {k: {**{f: v for f, v in i.items() if f not in ("digest", "size", "raw_size")},
                    "archive": i["digest"]}
                for k, i in infos.items() if i.get("estargz_digest")}
        return {"archives": {k: i["digest"] for k, i in infos.items()}, "lazy_layers": lazy}

    async def _meta_image(self, tree) -> dict:
        """{meta_digest, meta_size} of the meta image of a layer's checked tree, stored as
        a blob; {} (logged) when it cannot be made: lazy mounts then build their own."""
        from lazyfs.metaimage import build_image, image_digest
        fd, tmp = tempfile.mkstemp(dir=self.blobs.root / "tmp")
        os.close(fd)
        try:
            data, _ = await asyncio.get_running_loop().run_in_executor(None, build_image, tree)
            Path(tmp).write_bytes(data)
            digest = image_digest(data)
            self.blobs.adopt_file(Path(tmp), digest.split(":")[-1])
            return {"meta_digest": digest, "meta_size": len(data)}
        except Exception as e:  # noqa: BLE001 - an optimization
            log.warning("no meta image for the republished layer: %s", e)
            return {}
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    async def replace_estargz(self, key: str, body: dict) -> dict:
        """A node rewrote layer `key`'s eStargz with the files a lazy start opened first
        (the prefetch area): serve that blob for the layer from now on. Refused unless the
        blob is stored, its TOC matches `toc_digest`, and it holds exactly the files (same
        content digests, same chunks with the same chunk digests, which are what nodes
        verify) of the blob it replaces: the layer stays the same layer."""
        info = (await self.store.layer_infos([key])).get(key)
        if info is None or not info.get("estargz_digest"):
            raise NotFoundError(f"layer {key[:16]} has no eStargz to replace")
        new = require(body, "estargz_digest")
        if body.get("replaces") and body["replaces"] != info["estargz_digest"]:
            raise InvalidError(f"layer {key[:16]} is served from {info['estargz_digest'][:19]} "
                               f"now, not {body['replaces'][:19]}")
        old_path = self.blobs.path(info["estargz_digest"].split(":")[-1])
        new_path = self.blobs.path(new.split(":")[-1])
        if not new_path.exists():
            raise InvalidError(f"eStargz blob {new[:19]} was not uploaded")
        tree = await asyncio.get_running_loop().run_in_executor(
            None, _republished_tree, old_path, new_path, require(body, "toc_digest"))
        prefetch_files = len(tree.prioritized)
        extra = {k: v for k, v in info.items() if k not in ("digest", "size", "raw_size",
                                                            "meta_digest", "meta_size")}
        extra.update(estargz_digest=new, toc_digest=body["toc_digest"],
                     estargz_size=new_path.stat().st_size, prefetch_files=prefetch_files,
                     estargz_replaced=info["estargz_digest"])
        # the layer's meta image (lazyfs.metaimage), made here from the checked blob
        extra.update(await self._meta_image(tree))
        for k in ("diff_id", "uncompressed_size"):
            if k in body:
                extra[k] = body[k]
        await self.store.put_layer(key, info["digest"], info["size"], info["raw_size"], extra)
        self._fn_cache.clear()        # cached functions carry their image's layer fields
        log.info("layer %s: eStargz %s -> %s (%d prefetch files)", key[:16],
                 info["estargz_digest"][:19], new[:19], prefetch_files)
        return {"key": key, "estargz_digest": new, "prefetch_files": prefetch_files}

    async def _prewarm(self, fid: str) -> None:
        try:
            node = await self.registry.wait_any(time.monotonic() + 30)
            await node.client.post_json("/v1/prewarm", await self.function_for_node(fid))
        except Exception as e:  # noqa: BLE001 - prewarm is best effort
            log.warning("prewarm of %s failed: %s", fid, e)

    async def drain(self, fid: str) -> int:
        """Stop the function's idle containers on every live node (concurrently)."""
        async def one(n: NodeEntry) -> int:
            try:
                async with n.client._s().post(f"{n.url}/v1/pools/{fid}/drain") as r:
                    return int((await r.json()).get("stopped", 0))
            except Exception as e:  # noqa: BLE001
                log.warning("drain on %s: %s", n.node_id, e)
                return 0
        stopped = sum(await asyncio.gather(*(one(n) for n in self.registry.alive())))
        self.registry.forget_warm(fid)
        return stopped

    # -- submitting ------------------------------------------------------------------------------
    async def submit(self, calls: list[NewCall]) -> None:
        if not calls:
            return
        await self.function_for_node(calls[0].function_id)    # 404 now, not a failed call later
        # With room, drive them here at once (no round trip through the queue consumer).
        room = MAX_DRIVING - len(self._driving) - len(calls)
        try:
            claims = await self.store.submit(calls, self.bound,
                                             take=len(calls) if room > 0 else 0)
        except Overloaded as e:
            await self.store.incr_stat("overloaded")
            raise Busy(f"{e.unfinished} calls are unfinished (bound {e.bound}); retry later",
                       self._retry_after(e.unfinished + len(calls) - e.bound)) from None
        for c in claims:
            self._drive_soon(c)

    def _retry_after(self, excess: int) -> int:
        """Seconds until about `excess` calls have finished at the recent completion rate."""
        now = time.monotonic()
        while self._done and now - self._done[0] > RATE_WINDOW_S:
            self._done.popleft()
        rate = len(self._done) / RATE_WINDOW_S
        secs = excess / rate if rate > 0 else 1.0
        return int(min(30, max(1, math.ceil(secs * random.uniform(1.0, 1.5)))))

    # -- driving ---------------------------------------------------------------------------------
    async def _consume(self) -> None:
        """Take calls from the queue (ours: all of them; Redis: this replica's share)."""
        while not self._closing:
            room = MAX_DRIVING - len(self._driving)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                claims = await self.store.take(min(room, 128), 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the store may come back
                log.warning("taking calls from the queue: %s", e)
                await asyncio.sleep(1.0)
                continue
            for c in claims:
                self._drive_soon(c)

    def _drive_soon(self, claim: Claim) -> None:
        cid = claim.call_id
        if cid in self._driving:
            return
        t = asyncio.get_running_loop().create_task(self._drive(claim))
        self._driving[cid] = (t, claim)

        def done(_):
            if self._driving.get(cid, (None,))[0] is t:
                del self._driving[cid]
            self._room.set()
        t.add_done_callback(done)

    async def _drive(self, claim: Claim) -> None:
        cid, store = claim.call_id, self.store
        try:
            await self._drive_inner(claim)
        except asyncio.CancelledError:
            raise
        except KeyError:                         # the call record is gone: nothing to do
            log.warning("call %s: no record; dropping its queue entry", cid)
            await store.ack(claim)
        except InvalidCallTransition:            # ended (cancelled, elsewhere) meanwhile
            call = await store.get_call(cid)
            if call is None or call["status"] in TERMINAL:
                await store.ack(claim)
            else:
                log.warning("call %s: unexpected state %s; driving it again later", cid,
                            call["status"])
                await store.release(claim)
        except store.unavailable_errors as e:
            log.warning("call %s: store unavailable (%s); it will be driven again", cid, e)
            await store.release(claim)
        except Exception as e:
            log.exception("call %s: dispatcher error", cid)
            err = e.to_wire() if isinstance(e, Error) else {"code": "error", "message": str(e)}
            try:
                await self._finish(claim, "failed", {"error": err})
            except Exception:
                log.exception("call %s: could not store its failure", cid)
                await store.release(claim)
        finally:
            self._logged.discard(cid)

    async def _drive_inner(self, claim: Claim) -> None:
        cid, store = claim.call_id, self.store
        fn = await self.function_for_node(claim.function_id)
        retries = int(fn.get("retries") or 0)
        mem = int(fn.get("memory") or 128)
        deadline = time.monotonic() + QUEUE_TIMEOUT
        unstarted = 0
        fresh: bool | None = None        # first attempt ever: nobody wrote logs before us
        events: list[dict] = []          # preemptions while we drove it
        while True:
            node, placement = await self.registry.place(fn, deadline, QUEUE_TIMEOUT, claim.pin)
            # terminal (cancelled meanwhile): InvalidCallTransition, handled by _drive
            attempts = await store.start_attempt(cid, node.node_id, json.dumps(placement))
            if fresh is None:
                fresh = attempts == 1
            node.inflight += 1
            node.sent_mb += mem
            peers = self.registry.snapshot_peers(fn["id"], node) \
                if fn.get("snapshot") and self.peer_transfer else []
            req = {"call_id": cid, "attempt": attempts, "function": fn, "snapshot_peers": peers}
            payload = b""
            outcome: dict
            try:
                result = await self._run_on(node, req, claim.args, cid)
            except NodeLost as e:
                await self.registry.lost(node)
                if not e.started and unstarted < MAX_UNSTARTED:
                    # The call never reached the node: queue it again without using a retry.
                    unstarted += 1
                    await store.set_status(cid, "queued")
                    await store.bump_attempts(cid, -1)
                    await asyncio.sleep(0.2)
                    continue
                outcome = {"error": NodeUnavailableError(
                    f"the node running the call ({node.node_id}) was lost: {e}").to_wire(),
                    "node_id": node.node_id}
            except Error as e:
                outcome = {"error": e.to_wire(), "node_id": node.node_id}
            else:
                payload = result.pop("payload", b"")
                if result.get("ok"):
                    await self._finish(claim, "succeeded", result, payload, attempts, placement,
                                       fresh, events)
                    return
                outcome = result
            finally:
                node.inflight -= 1
                self.registry.wake()
            if preemption.is_preempted(outcome):
                # A higher-priority call took the GPUs: queue it again, without using a
                # retry, and give it a full queue wait from now.
                events = await self._requeue_preempted(cid, attempts, node.node_id,
                                                       outcome["error"])
                deadline = time.monotonic() + QUEUE_TIMEOUT
                continue
            retryable = ("error" in outcome and outcome["error"].get("code") in RETRYABLE_CODES) \
                or ("exc_type" in outcome and not outcome.get("init_error"))
            if retryable and attempts > retries:     # preempted attempts do not count
                attempts_used = preemption.counted_attempts(
                    attempts, preemption.parse_events(((await store.get_call(cid)) or {})
                                                      .get("events")))
            else:
                attempts_used = attempts
            if retryable and attempts_used <= retries:
                log.info("call %s attempt %d on %s failed; retrying", cid, attempts, node.node_id)
                await store.set_status(cid, "queued")
                await asyncio.sleep(min(0.1 * 2 ** (attempts - 1), 5.0))
                continue
            if retryable and "error" in outcome:
                outcome["error"]["message"] += (
                    f" (attempt {attempts}; no retries left: retries={retries})")
            outcome["attempts"] = attempts
            await self._finish(claim, "failed", outcome,
                               payload if "exc_type" in outcome else b"", attempts, placement,
                               fresh, events)
            return

    async def _requeue_preempted(self, cid: str, attempt: int, node_id: str,
                                 error: dict) -> list[dict]:
        """Record the preemption on the call and queue it again; returns its events."""
        event = preemption.preempted_event(error, node_id, attempt, time.time())
        call = await self.store.get_call(cid)
        events = preemption.parse_events((call or {}).get("events")) + [event]
        await self.store.set_status(cid, "queued", events=json.dumps(events))
        await self.store.incr_stat("preempted")
        log.info("call %s attempt %d on %s preempted by %s; queued again", cid, attempt,
                 node_id, event["by_call"] or event["by_function"])
        return events

    async def _run_on(self, node: NodeEntry, req: dict, args: bytes, cid: str) -> dict:
        """Run on `node`; a node that stops heartbeating meanwhile counts as lost (a frozen
        or partitioned node does not hold the call forever)."""
        task = asyncio.ensure_future(node.client.run(req, args,
                                                     lambda s, t: self._on_log(cid, s, t)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCH_S)
                if done:
                    return task.result()
                if not node.alive:
                    raise NodeLost(f"node {node.node_id} missed its heartbeats", started=True)
        finally:
            if not task.done():
                task.cancel()

    async def _finish(self, claim: Claim, status: str, result: dict, payload: bytes = b"",
                      attempts: int | None = None, placement: dict | None = None,
                      fresh: bool = False, events: list[dict] | None = None) -> None:
        cid = claim.call_id
        await self._flush_logs_now(cid)
        try:
            applied = await self.store.finish(
                claim, status, result=json.dumps(result), result_payload=payload,
                tier=result.get("tier"), node_id=result.get("node_id"))
        finally:
            self._notify(cid)               # waiters re-read, whatever happened
        if applied:
            self._done.append(time.monotonic())
            if attempts is not None:
                res = dict(result, payload_b64=base64.b64encode(payload).decode())
                state = {"call_id": cid, "status": status, "function_id": claim.function_id,
                         "attempts": attempts, "placement": placement, "result": res,
                         "events": events or []}
                # logs are known to be empty only for a call we drove from the start
                self._remember(cid, state, fresh and cid not in self._logged)
                self._notify(cid)

    def _remember(self, cid: str, state: dict, no_logs: bool) -> None:
        self._final[cid] = (state, no_logs)
        if len(self._final) > FINAL_CACHE:
            self._final.popitem(last=False)

    # -- logs ------------------------------------------------------------------------------------
    def _on_log(self, cid: str, stream: str, text: str) -> None:
        self._logged.add(cid)
        self._logbuf.setdefault(cid, []).append((stream, text))
        if cid not in self._logflush:
            self._logflush[cid] = asyncio.get_running_loop().create_task(self._flush_logs(cid))

    async def _flush_logs(self, cid: str) -> None:
        """One writer per call keeps the order; lines that arrive meanwhile go in a batch."""
        try:
            while self._logbuf.get(cid):
                items = self._logbuf.pop(cid)
                try:
                    await self.store.append_logs(cid, items)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001
                    log.warning("call %s: %d log lines lost: %s", cid, len(items), e)
                self._notify(cid)
        finally:
            self._logflush.pop(cid, None)

    async def _flush_logs_now(self, cid: str) -> None:
        while (t := self._logflush.get(cid)) is not None:
            await asyncio.shield(t)
        self._logbuf.pop(cid, None)

    # -- reading calls ---------------------------------------------------------------------------
    async def call_state(self, cid: str, logs_after: int = -1) -> dict:
        hit = self._final.get(cid)
        if hit is not None:
            state, no_logs = hit
            return dict(state, logs=[] if no_logs else await self.store.logs(cid, logs_after))
        call = await self.store.get_call(cid)
        if call is None:
            raise NotFoundError(f"unknown call {cid}")
        out = {"call_id": cid, "status": call["status"], "function_id": call["function_id"],
               "attempts": call["attempts"],
               "placement": json.loads(call["placement"]) if call.get("placement") else None,
               "events": preemption.parse_events(call.get("events"))}
        if call["status"] in TERMINAL:
            res = json.loads(call["result"] or "{}")
            res["payload_b64"] = base64.b64encode(call["result_payload"] or b"").decode()
            out["result"] = res
            self._remember(cid, out, False)
        return dict(out, logs=await self.store.logs(cid, logs_after))

    async def wait_call(self, cid: str, wait: float, logs_after: int = -1,
                        return_on_logs: bool = True, ev: asyncio.Event | None = None) -> dict:
        """Long-poll: the state once the call ends, has logs after `logs_after`, or `wait`
        (at most 60 s) passes. With `ev` (registered before the call was submitted) the
        first read is skipped: a call just submitted has neither."""
        deadline = time.monotonic() + max(0.0, min(wait, 60.0))
        skip_read = ev is not None and wait > 0 and cid not in self._final
        watch = contextlib.nullcontext(ev) if ev is not None else self._watching(cid)
        with watch as changed:
            while True:
                state = None
                if skip_read:
                    skip_read = False
                else:
                    changed.clear()     # before the read: a change after it sets it again
                    state = await self.call_state(cid, logs_after)
                    if state["status"] in TERMINAL or (return_on_logs and state["logs"]):
                        return state
                left = deadline - time.monotonic()
                if left <= 0:
                    return state or await self.call_state(cid, logs_after)
                # A call driven by another replica is announced by pub/sub; a re-read every
                # few seconds covers a message lost while the subscription reconnected.
                step = left if cid in self._driving else min(left, REMOTE_POLL_S)
                try:
                    await asyncio.wait_for(changed.wait(), step)
                except TimeoutError:
                    if step >= left:
                        return await self.call_state(cid, logs_after)

    async def cancel(self, cid: str) -> dict:
        call = await self.store.get_call(cid)
        if call is None:
            raise NotFoundError(f"unknown call {cid}")
        if call["status"] not in TERMINAL:
            try:
                await self.store.set_status(cid, "cancelled", result=json.dumps(
                    {"error": {"code": "cancelled", "message": "the call was cancelled"}}))
            except InvalidCallTransition:
                pass                                    # it ended meanwhile
            entry = self._driving.get(cid)
            if entry is not None:
                entry[0].cancel()
                await self.store.ack(entry[1])
            self._notify(cid)
        return await self.call_state(cid)

    # -- status -----------------------------------------------------------------------------------
    async def containers(self) -> list[dict]:
        async def one(n: NodeEntry) -> list[dict]:
            try:
                st = await n.client.status()
            except NodeLost:
                return []
            return [dict(c, node_id=n.node_id) for c in st.get("containers", [])]
        return [c for cs in await asyncio.gather(*(one(n) for n in self.registry.alive()))
                for c in cs]

    async def status(self) -> dict:
        return {"started_at": self.started_at, "replica": self.replica,
                "backend": self.store.kind, "nodes": self.registry.describe(),
                "pending_calls": await self.store.unfinished(), "max_pending": self.bound,
                "driving": len(self._driving), "stats": await self.store.stats(),
                "replicas": await self.store.replicas(),
                "placement_policy": self.placement_policy,
                "blob_bytes": self.blobs.total_bytes()}


def make_app(d: Dispatcher):
    from .dispatcher_http import make_app as _make_app
    return _make_app(d)


def _same_layer_files(old: os.PathLike, new: os.PathLike, toc_digest: str) -> int:
    """Check that eStargz `new` (TOC digest `toc_digest`) holds the same entries with the
    same content as `old`; returns how many files its prefetch area has."""
    return len(_republished_tree(old, new, toc_digest).prioritized)


def _republished_tree(old: os.PathLike, new: os.PathLike, toc_digest: str):
    """_same_layer_files' check; returns the new blob's tree."""
    import lazyfs

    def entries(blob) -> set:
        return {(e.name.rstrip("/"), e.type, e.digest, e.link_name, e.mode)
                for e in blob.toc.entries if e.type != "chunk"
                and e.name not in (".prefetch.landmark", ".no.prefetch.landmark")}
    srcs = [lazyfs.FileBlobSource(old), lazyfs.FileBlobSource(new)]
    try:
        try:
            a = lazyfs.open_estargz(srcs[0])
            b = lazyfs.open_estargz(srcs[1], toc_digest)
        except lazyfs.LazyFSError as e:
            raise InvalidError(f"not a usable eStargz blob: {e}") from None
        if entries(a) != entries(b):
            diff = sorted(entries(a) ^ entries(b))[:3]
            raise InvalidError(f"the new eStargz holds other files than the layer's: {diff}")
        # nodes verify what they read chunk by chunk, against the chunk digests: those must
        # be the layer's own, not just the files' digests (which no lazy read checks), or a
        # node could republish other bytes under the same file digests
        ca, cb = _chunk_digests(a.tree), _chunk_digests(b.tree)
        if ca != cb:
            diff = sorted(set(ca.items()) ^ set(cb.items()))
            raise InvalidError("the new eStargz's chunks differ from the layer's (same chunk "
                               f"size needed): {[n for n, _ in diff][:3]}")
        _check_members(b)
    finally:
        for src in srcs:
            src.close()
    return b.tree


def _check_members(blob) -> None:
    """Every member digest of `blob` vouches for its chunk's bytes: nodes check the
    compressed member instead of the inflated chunk when the TOC has one, so a published
    blob's member digests must be checked against the content once, here (the chunk
    digests are the layer's own, _same_layer_files). ~1 s for a 340 MB layer."""
    import lazyfs
    try:
        for c in blob.tree.chunks_in_order:
            if c.member_digest:
                blob.read_chunk(c, full=True)
    except lazyfs.LazyFSError as e:
        raise InvalidError(f"the new eStargz's content does not match its TOC: {e}") from None


def _chunk_digests(tree) -> dict[str, tuple]:
    """Path -> its chunks as (file offset, size, digest), for every regular file."""
    return {path: tuple((c.file_offset, c.size, c.digest) for c in tree.nodes[ino].chunks)
            for path, ino in tree.paths.items() if tree.nodes[ino].chunks}
