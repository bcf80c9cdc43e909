"""The dispatcher (control plane): HTTP API for blobs, images, functions and calls;
stores call state in SQLite; picks a node for each call and drives it to a result.

    PUT  /v1/blobs/{sha256}           body = bytes (verified)      HEAD/GET as usual
    POST /v1/images                   image spec -> NDJSON build progress, last line done|error
    POST /v1/functions                {name, app, blob, image_id, config} -> {function_id}
    POST /v1/calls                    {function_id, args_b64, wait} -> call state (+result)
    POST /v1/calls/batch              {function_id, inputs: [args_b64]} -> {call_ids}
    GET  /v1/calls/{id}?wait=&logs_after=   long-poll: returns on completion or new logs
    POST /v1/calls/{id}/cancel        GET /v1/calls/{id}/logs     GET /v1/calls
    POST /v1/nodes/register|heartbeat GET /v1/nodes   GET /v1/containers   GET /v1/status
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from aiohttp import web

from sdk.exception import (Error, InvalidError, NodeUnavailableError, NotFoundError,
                           OverloadedError)

from .blobs import LocalBlobStore
from .builder import layer_keys
from .config import Paths
from .http_util import auth_middleware, error_middleware, read_json, require
from .ids import content_id, is_hex_digest, new_id
from .metadata import TERMINAL, Metadata
from .node_client import NodeClient, NodeLost
from .placement import NodeView, place

log = logging.getLogger("runtimed.dispatcher")

NODE_DEAD_AFTER = 6.0          # three missed 2 s heartbeats
QUEUE_TIMEOUT = 300.0          # a call waits this long for any node before failing
AFFINITY_WAIT = 2.0
MAX_UNSTARTED = 20             # requeues of a call whose node refused the connection            # ...and this long for a full node that holds its snapshot
MAX_PENDING = 10_000           # unfinished calls before we answer 429
RETRYABLE_CODES = {"oom", "function_timeout", "container_crashed", "node_unavailable",
                   "execution_failed"}


@dataclass
class NodeEntry:
    node_id: str
    url: str
    client: NodeClient
    info: dict
    last_seen: float = field(default_factory=time.monotonic)
    inflight: int = 0
    sent_mb: int = 0            # memory of calls sent since the node's last heartbeat

    def view(self) -> NodeView:
        i = self.info
        return NodeView(self.node_id, int(i.get("memory_mb") or 0),
                        int(i.get("reserved_mb") or 0) + self.sent_mb, self.inflight,
                        dict(i.get("warm") or {}), frozenset(i.get("snapshots") or ()),
                        frozenset(i.get("layers") or ()), len(i.get("gpus") or ()))

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.last_seen < NODE_DEAD_AFTER


def _b64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidError(f"{what} must be base64") from None


class Dispatcher:
    def __init__(self, paths: Paths, token: str):
        self.paths, self.token = paths, token
        d = paths.dispatcher_dir
        self.md = Metadata(d / "meta.db")
        self.blobs = LocalBlobStore(d / "blobs")
        self.nodes: dict[str, NodeEntry] = {}
        self._node_event = asyncio.Event()
        self._changed: dict[str, asyncio.Event] = {}
        self._log_seq: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._fn_cache: dict[str, dict] = {}
        self._pins: dict[str, str] = {}     # call id -> node id (admin/benchmark pinning)
        self.started_at = time.time()
        self.placement_policy = os.environ.get("RUNTIMED_PLACEMENT", "affinity")

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Calls that were queued or running when we stopped are driven again (at-least-once)."""
        for cid in self.md.unfinished_calls():
            call = self.md.get_call(cid)
            if call and call["status"] == "running":
                self.md.set_status(cid, "queued")
            self._drive_soon(cid)

    async def close(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        for n in self.nodes.values():
            await n.client.close()

    # -- notifications -------------------------------------------------------------------------
    def _event(self, cid: str) -> asyncio.Event:
        return self._changed.setdefault(cid, asyncio.Event())

    def _notify(self, cid: str) -> None:
        ev = self._changed.pop(cid, None)
        if ev is not None:
            ev.set()

    # -- nodes ---------------------------------------------------------------------------------
    def register_node(self, body: dict) -> None:
        nid, url = require(body, "node_id"), require(body, "url")
        entry = self.nodes.get(nid)
        if entry is None or entry.url != url:
            if entry:
                asyncio.create_task(entry.client.close())
            entry = NodeEntry(nid, url, NodeClient(nid, url, self.token), body)
            self.nodes[nid] = entry
            log.info("node %s registered at %s", nid, url)
        entry.info, entry.last_seen, entry.sent_mb = body, time.monotonic(), 0
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        self._node_event.set()
        self._node_event = asyncio.Event()

    def heartbeat(self, body: dict) -> bool:
        entry = self.nodes.get(body.get("node_id", ""))
        if entry is None:
            return False
        entry.info, entry.last_seen, entry.sent_mb = body, time.monotonic(), 0
        self._wake_waiters()
        return True

    def _pick(self, fn_id: str) -> NodeEntry | None:
        """Any live node, least loaded (image builds, prewarm)."""
        alive = [n for n in self.nodes.values() if n.alive]
        return min(alive, key=lambda n: n.view().load()) if alive else None

    async def _place(self, fn: dict, deadline: float, pin: str | None = None
                     ) -> tuple[NodeEntry, dict]:
        """Choose the node for a call (placement.py); queue briefly (bounded) for a better
        node that is full rather than going cold elsewhere. Returns the node and the
        placement record stored with the call."""
        mem = int(fn.get("memory") or 128)
        keys = layer_keys(fn["image"])
        t0 = time.monotonic()
        while True:
            alive = {n.node_id: n for n in self.nodes.values() if n.alive}
            if pin:
                if pin in alive:
                    return alive[pin], {"node_id": pin, "reason": "pinned"}
                if time.monotonic() > deadline:
                    raise NodeUnavailableError(f"node {pin} (pinned) is not available")
                await asyncio.sleep(0.05)
                continue
            p = place([n.view() for n in alive.values()], fn["id"], keys, mem,
                      self.placement_policy)
            if p.node_id is not None and (p.wait_for is None or
                                          time.monotonic() - t0 >= AFFINITY_WAIT):
                rec = p.to_wire()
                if p.wait_for:
                    rec["waited_ms"] = round((time.monotonic() - t0) * 1000, 1)
                return alive[p.node_id], rec
            left = deadline - time.monotonic()
            if left <= 0:
                if p.node_id is None and not alive:
                    raise NodeUnavailableError("no node is available to run the call "
                                               f"(waited {QUEUE_TIMEOUT:.0f} s); is a node "
                                               "running?")
                raise NodeUnavailableError(f"no node has room for the call ({mem} MiB) "
                                           f"after {QUEUE_TIMEOUT:.0f} s")
            try:
                await asyncio.wait_for(self._node_event.wait(), min(left, 0.05))
            except asyncio.TimeoutError:
                pass

    async def _wait_node(self, fn_id: str, deadline: float) -> NodeEntry:
        while True:
            node = self._pick(fn_id)
            if node is not None:
                return node
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeUnavailableError("no node is available to run the call "
                                           f"(waited {QUEUE_TIMEOUT:.0f} s); is a node running?")
            try:
                await asyncio.wait_for(self._node_event.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    # -- images & functions ----------------------------------------------------------------------
    async def build_image(self, spec: dict, emit) -> dict:
        steps = spec.get("steps")
        if not isinstance(steps, list) or not steps:
            raise InvalidError("image spec needs a non-empty 'steps' list")
        for s in steps:
            if s.get("kind") == "files" and not self.blobs.has(s.get("blob", "")):
                raise InvalidError(f"files for step {s.get('desc')!r} were not uploaded")
        iid = content_id("img", steps[-1]["key"].encode())
        spec = dict(spec, id=iid, archives=self.md.layer_archives(layer_keys(spec)))
        node = await self._wait_node("", time.monotonic() + 60)

        def on_event(ev: dict) -> None:
            if ev.get("type") == "layer":
                self.md.put_layer(ev["key"], ev["digest"], ev.get("size", 0), ev.get("raw_size", 0))
            emit(ev)

        report = await node.client.build(spec, on_event)
        spec["archives"] = self.md.layer_archives(layer_keys(spec))
        self.md.put_image(iid, spec, report)
        return {"image_id": iid, "report": report}

    def register_function(self, body: dict) -> str:
        name, blob = require(body, "name"), require(body, "blob")
        image_id = require(body, "image_id")
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise InvalidError("'config' must be an object")
        if not self.blobs.has(blob):
            raise InvalidError(f"function blob {blob[:16]}… was not uploaded")
        if self.md.get_image(image_id) is None:
            raise NotFoundError(f"image {image_id} is not built; build it first")
        fid = content_id("fn", json.dumps([blob, image_id, config, name],
                                          sort_keys=True).encode())
        self.md.put_function(fid, name, body.get("app", ""), blob, image_id, config)
        self._fn_cache.pop(fid, None)
        if int(config.get("min_containers") or 0) > 0:
            asyncio.create_task(self._prewarm(fid))
        return fid

    def _function_for_node(self, fid: str) -> dict:
        fn = self._fn_cache.get(fid)
        if fn is None:
            rec = self.md.get_function(fid)
            if rec is None:
                raise NotFoundError(f"unknown function {fid}")
            image = self.md.get_image(rec["image_id"])
            image["archives"] = self.md.layer_archives(layer_keys(image))
            fn = dict(rec["config"], id=fid, name=rec["name"], blob=rec["blob"], image=image)
            self._fn_cache[fid] = fn
        return fn

    async def _prewarm(self, fid: str) -> None:
        try:
            node = await self._wait_node(fid, time.monotonic() + 30)
            await node.client.post_json("/v1/prewarm", self._function_for_node(fid))
        except Exception as e:  # noqa: BLE001 - prewarm is best effort
            log.warning("prewarm of %s failed: %s", fid, e)

    # -- calls -----------------------------------------------------------------------------------
    def submit(self, fid: str, args: bytes, node_id: str | None = None) -> str:
        if len(self._tasks) >= MAX_PENDING:
            raise OverloadedError(f"{len(self._tasks)} calls pending; retry later")
        self._function_for_node(fid)        # 404 now rather than a failed call later
        cid = new_id("call", 10)
        self.md.add_call(cid, fid, args)
        if node_id:
            self._pins[cid] = node_id
        self._drive_soon(cid)
        return cid

    def _drive_soon(self, cid: str) -> None:
        t = asyncio.create_task(self._drive(cid))
        self._tasks[cid] = t
        t.add_done_callback(lambda _: self._tasks.pop(cid, None))

    def _finish(self, cid: str, status: str, result: dict, payload: bytes = b"") -> None:
        self.md.set_status(cid, status, result=json.dumps(result), result_payload=payload,
                           tier=result.get("tier"), node_id=result.get("node_id"))
        self._notify(cid)

    def _on_log(self, cid: str, stream: str, text: str) -> None:
        seq = self._log_seq.get(cid)
        if seq is None:
            seq = self.md.next_log_seq(cid)
        self.md.add_log(cid, seq, stream, text)
        self._log_seq[cid] = seq + 1
        self._notify(cid)

    async def _drive(self, cid: str) -> None:
        try:
            await self._drive_inner(cid)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - never lose a call silently
            log.exception("call %s: dispatcher error", cid)
            err = e.to_wire() if isinstance(e, Error) else {"code": "error", "message": str(e)}
            call = self.md.get_call(cid)
            if call and call["status"] not in TERMINAL:
                if call["status"] == "queued":
                    self.md.set_status(cid, "running")
                self._finish(cid, "failed", {"error": err})
        finally:
            self._log_seq.pop(cid, None)
            self._pins.pop(cid, None)

    async def _drive_inner(self, cid: str) -> None:
        call = self.md.get_call(cid)
        fn = self._function_for_node(call["function_id"])
        retries = int(fn.get("retries") or 0)
        deadline = time.monotonic() + QUEUE_TIMEOUT
        unstarted = 0
        while True:
            attempts = self.md.bump_attempts(cid)
            node, placement = await self._place(fn, deadline, self._pins.get(cid))
            self.md.set_status(cid, "running", node_id=node.node_id,
                               placement=json.dumps(placement))
            self._notify(cid)
            node.inflight += 1
            mem = int(fn.get("memory") or 128)
            node.sent_mb += mem
            peers = [n.url for n in self.nodes.values() if n.alive and n is not node
                     and fn["id"] in (n.info.get("snapshots") or ())]
            req = {"call_id": cid, "attempt": attempts, "function": fn,
                   "snapshot_peers": peers if fn.get("snapshot") else []}
            try:
                result = await node.client.run(req, call["args"],
                                               lambda s, t: self._on_log(cid, s, t))
            except NodeLost as e:
                node.last_seen = 0.0            # treat as dead until it heartbeats again
                if not e.started and unstarted < MAX_UNSTARTED:
                    # The call never reached the node: requeue without using a retry.
                    unstarted += 1
                    self.md.set_status(cid, "queued")
                    self.md.db.execute("UPDATE calls SET attempts=attempts-1 WHERE id=?", (cid,))
                    await asyncio.sleep(0.2)
                    continue
                outcome = {"error": NodeUnavailableError(
                    f"the node running the call was lost ({e})").to_wire()}
            except Error as e:
                outcome = {"error": e.to_wire(), "node_id": node.node_id}
            else:
                payload = result.pop("payload", b"")
                if result.get("ok"):
                    self._finish(cid, "succeeded", result, payload)
                    return
                outcome, retry_payload = result, payload
            finally:
                node.inflight -= 1
                self._wake_waiters()
            retryable = ("error" in outcome and outcome["error"].get("code") in RETRYABLE_CODES) \
                or ("exc_type" in outcome and not outcome.get("init_error"))
            if retryable and attempts <= retries:
                log.info("call %s attempt %d failed; retrying", cid, attempts)
                self.md.set_status(cid, "queued")
                await asyncio.sleep(min(0.1 * 2 ** (attempts - 1), 5.0))
                continue
            outcome["attempts"] = attempts
            self._finish(cid, "failed", outcome,
                         retry_payload if "exc_type" in outcome else b"")
            return

    def call_state(self, cid: str, logs_after: int = -1) -> dict:
        call = self.md.get_call(cid)
        if call is None:
            raise NotFoundError(f"unknown call {cid}")
        out = {"call_id": cid, "status": call["status"], "function_id": call["function_id"],
               "attempts": call["attempts"], "logs": self.md.logs(cid, logs_after),
               "placement": json.loads(call["placement"]) if call.get("placement") else None}
        if call["status"] in TERMINAL:
            res = json.loads(call["result"] or "{}")
            res["payload_b64"] = base64.b64encode(call["result_payload"] or b"").decode()
            out["result"] = res
        return out

    async def wait_call(self, cid: str, wait: float, logs_after: int = -1,
                        return_on_logs: bool = True) -> dict:
        deadline = time.monotonic() + max(0.0, min(wait, 60.0))
        while True:
            state = self.call_state(cid, logs_after)
            if state["status"] in TERMINAL or (return_on_logs and state["logs"]):
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                return state
            # Made only when we wait (no await since the read above, so no missed
            # notification): an event per poll of a finished or unknown call would leak.
            ev = self._event(cid)
            try:
                await asyncio.wait_for(ev.wait(), left)
            except asyncio.TimeoutError:
                return self.call_state(cid, logs_after)

    def cancel(self, cid: str) -> dict:
        call = self.md.get_call(cid)
        if call is None:
            raise NotFoundError(f"unknown call {cid}")
        if call["status"] not in TERMINAL:
            t = self._tasks.get(cid)
            if t:
                t.cancel()
            self.md.set_status(cid, "cancelled", result=json.dumps(
                {"error": {"code": "cancelled", "message": "the call was cancelled"}}))
            self._notify(cid)
        return self.call_state(cid)

    # -- status -----------------------------------------------------------------------------------
    async def containers(self) -> list[dict]:
        out = []
        for n in self.nodes.values():
            if not n.alive:
                continue
            try:
                st = await n.client.status()
            except NodeLost:
                continue
            for c in st.get("containers", []):
                out.append(dict(c, node_id=n.node_id))
        return out

    def nodes_view(self) -> list[dict]:
        return [{"node_id": n.node_id, "url": n.url, "alive": n.alive, "inflight": n.inflight,
                 "seen_s_ago": round(time.monotonic() - n.last_seen, 1),
                 "snapshots": len(n.info.get("snapshots") or ()),
                 "layers": len(n.info.get("layers") or ()),
                 "gpus": len(n.info.get("gpus") or ()), **{
                     k: n.info.get(k) for k in ("cpu", "memory_mb", "reserved_mb", "warm",
                                                "active")}}
                for n in self.nodes.values()]


def make_app(d: Dispatcher) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware(d.token)],
                          client_max_size=2 << 30)
    r = app.router

    async def put_blob(req: web.Request):
        digest = req.match_info["digest"]
        if not is_hex_digest(digest):
            raise InvalidError("blob name must be its sha256 hex digest")
        if d.blobs.has(digest):
            await req.read()
            return web.json_response({"digest": digest, "existed": True})
        h = hashlib.sha256()
        import os
        import tempfile
        fd, tmp = tempfile.mkstemp(dir=d.blobs.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in req.content.iter_chunked(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != digest:
                raise InvalidError(f"blob content has sha256 {h.hexdigest()}, not {digest}")
            d.blobs.adopt_file(__import__("pathlib").Path(tmp), digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return web.json_response({"digest": digest, "existed": False}, status=201)

    async def get_blob(req: web.Request):
        path = d.blobs.path(req.match_info["digest"])
        if not path.exists():
            raise NotFoundError(f"no blob {req.match_info['digest']}")
        if req.method == "HEAD":
            return web.Response(headers={"Content-Length": str(path.stat().st_size)})
        return web.FileResponse(path)

    async def post_image(req: web.Request):
        spec = await read_json(req)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(req)
        q: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(d.build_image(spec, q.put_nowait))
        task.add_done_callback(lambda _: q.put_nowait(None))
        while (ev := await q.get()) is not None:
            await resp.write(json.dumps(ev).encode() + b"\n")
        try:
            done = await task
            line = {"type": "done", **done}
        except Error as e:
            line = {"type": "error", "error": e.to_wire()}
        except Exception as e:  # noqa: BLE001
            log.exception("build failed")
            line = {"type": "error", "error": {"code": "error", "message": str(e)}}
        await resp.write(json.dumps(line).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def post_function(req: web.Request):
        return web.json_response({"function_id": d.register_function(await read_json(req))})

    async def get_function(req: web.Request):
        """By id, or by name (the most recently registered function of that name)."""
        key = req.match_info["fid"]
        rec = d.md.get_function(key) or d.md.function_by_name(key)
        if rec is None:
            raise NotFoundError(f"unknown function {key}")
        return web.json_response(d._function_for_node(rec["id"]))

    async def drain_function(req: web.Request):
        """Stop the function's idle containers on every node (benchmarks, redeploys)."""
        fid = req.match_info["fid"]
        stopped = 0
        for n in list(d.nodes.values()):
            if n.alive:
                try:
                    async with n.client._s().post(f"{n.url}/v1/pools/{fid}/drain") as r:
                        stopped += (await r.json()).get("stopped", 0)
                except Exception as e:  # noqa: BLE001
                    log.warning("drain on %s: %s", n.node_id, e)
        return web.json_response({"stopped": stopped})

    async def post_call(req: web.Request):
        body = await read_json(req)
        fid = require(body, "function_id")
        args = _b64(require(body, "args_b64"), "args_b64")
        try:
            wait = float(body.get("wait") or 0)
        except (TypeError, ValueError):
            raise InvalidError("'wait' must be a number of seconds") from None
        node_id = body.get("node_id")
        if node_id is not None and not isinstance(node_id, str):
            raise InvalidError("node_id must be a string")
        cid = d.submit(fid, args, node_id)
        return web.json_response(await d.wait_call(cid, wait) if wait else d.call_state(cid))

    async def post_batch(req: web.Request):
        body = await read_json(req)
        fid = require(body, "function_id")
        inputs = require(body, "inputs", list)
        blobs = [_b64(a, "inputs[]") for a in inputs]     # all valid before any runs
        if len(d._tasks) + len(blobs) > MAX_PENDING:      # all or nothing: clients retry 429
            raise OverloadedError(f"{len(d._tasks)} calls pending; retry later")
        return web.json_response({"call_ids": [d.submit(fid, b) for b in blobs]})

    async def get_call(req: web.Request):
        try:
            wait = float(req.query.get("wait", "0"))
            after = int(req.query.get("logs_after", "-1"))
        except ValueError:
            raise InvalidError("wait and logs_after must be numbers") from None
        return web.json_response(await d.wait_call(req.match_info["cid"], wait, after))

    async def cancel_call(req: web.Request):
        return web.json_response(d.cancel(req.match_info["cid"]))

    async def get_logs(req: web.Request):
        cid = req.match_info["cid"]
        if d.md.get_call(cid) is None:
            raise NotFoundError(f"unknown call {cid}")
        return web.json_response({"call_id": cid, "logs": d.md.logs(cid)})

    async def list_calls(req: web.Request):
        try:
            limit = int(req.query.get("limit", "50"))
        except ValueError:
            raise InvalidError("limit must be an integer") from None
        return web.json_response({"calls": d.md.list_calls(limit)})

    async def node_register(req: web.Request):
        d.register_node(await read_json(req))
        return web.json_response({"ok": True})

    async def node_heartbeat(req: web.Request):
        if not d.heartbeat(await read_json(req)):
            raise NotFoundError("unknown node: register first")
        return web.json_response({"ok": True})

    async def get_nodes(req: web.Request):
        return web.json_response({"nodes": d.nodes_view()})

    async def get_containers(req: web.Request):
        return web.json_response({"containers": await d.containers()})

    async def get_images(req: web.Request):
        return web.json_response({"images": d.md.list_images(), "layers": d.md.list_layers()})

    async def get_status(req: web.Request):
        return web.json_response({"started_at": d.started_at, "nodes": d.nodes_view(),
                                  "pending_calls": len(d._tasks),
                                  "blob_bytes": d.blobs.total_bytes()})

    async def healthz(req: web.Request):
        return web.json_response({"ok": True})

    r.add_put("/v1/blobs/{digest}", put_blob)
    r.add_get("/v1/blobs/{digest}", get_blob)      # aiohttp answers HEAD through GET
    r.add_post("/v1/images", post_image)
    r.add_get("/v1/images", get_images)
    r.add_post("/v1/functions", post_function)
    r.add_get("/v1/functions/{fid}", get_function)
    r.add_post("/v1/functions/{fid}/drain", drain_function)
    r.add_post("/v1/calls", post_call)
    r.add_post("/v1/calls/batch", post_batch)
    r.add_get("/v1/calls", list_calls)
    r.add_get("/v1/calls/{cid}", get_call)
    r.add_post("/v1/calls/{cid}/cancel", cancel_call)
    r.add_get("/v1/calls/{cid}/logs", get_logs)
    r.add_post("/v1/nodes/register", node_register)
    r.add_post("/v1/nodes/heartbeat", node_heartbeat)
    r.add_get("/v1/nodes", get_nodes)
    r.add_get("/v1/containers", get_containers)
    r.add_get("/v1/status", get_status)
    r.add_get("/healthz", healthz)

    async def on_startup(_):
        await d.start()

    async def on_cleanup(_):
        await d.close()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
