"""The dispatcher's HTTP routes (the API table is in dispatcher.py's docstring)."""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from sdk.exception import Error, InvalidError, NotFoundError

from .dispatcher import Busy, Dispatcher, _b64
from .http_util import auth_middleware, error_middleware, read_json, require
from .ids import is_hex_digest, new_id
from .preemption import parse_events
from .store import NewCall, StoreUnavailableError

log = logging.getLogger("runtimed.dispatcher")
MAX_BATCH = 5000


def _overload_middleware(d: Dispatcher):
    """429 with Retry-After; the store being down is a 503 the client may retry."""
    @web.middleware
    async def mw(request: web.Request, handler):
        try:
            return await handler(request)
        except Busy as e:
            return web.json_response({"error": e.to_wire()}, status=e.http_status,
                                     headers={"Retry-After": str(e.retry_after)})
        except d.store.unavailable_errors as e:
            err = StoreUnavailableError(f"the dispatcher's store ({d.store.kind}) is "
                                        f"unavailable: {e}")
            return web.json_response({"error": err.to_wire()}, status=err.http_status,
                                     headers={"Retry-After": "1"})
    return mw


def make_app(d: Dispatcher) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware(d.token),
                                       _overload_middleware(d)],
                          client_max_size=2 << 30)
    r = app.router

    async def put_blob(req: web.Request):
        digest = req.match_info["digest"]
        if not is_hex_digest(digest):
            raise InvalidError("blob name must be its sha256 hex digest")
        if d.blobs.has(digest):
            await req.read()
            return web.json_response({"digest": digest, "existed": True})
        await d.blobs.ingest(
            req.content.iter_chunked(1 << 20), digest,
            lambda got: InvalidError(f"blob content has sha256 {got}, not {digest}"))
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
        except Exception as e:
            log.exception("build failed")
            line = {"type": "error", "error": {"code": "error", "message": str(e)}}
        await resp.write(json.dumps(line).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def post_layer_estargz(req: web.Request):
        return web.json_response(await d.replace_estargz(req.match_info["key"],
                                                         await read_json(req)))

    async def post_function(req: web.Request):
        return web.json_response({"function_id": await d.register_function(await read_json(req))})

    async def get_function(req: web.Request):
        """By id, or by name (the most recently registered function of that name)."""
        key = req.match_info["fid"]
        rec = await d.store.get_function(key) or await d.store.function_by_name(key)
        if rec is None:
            raise NotFoundError(f"unknown function {key}")
        return web.json_response(await d.function_for_node(rec["id"]))

    async def drain_function(req: web.Request):
        """Stop the function's idle containers on every node (benchmarks, redeploys)."""
        return web.json_response({"stopped": await d.drain(req.match_info["fid"])})

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
        cid = new_id("call", 10)
        call = NewCall(cid, fid, args, node_id or None)
        if wait > 0:
            with d._watching(cid) as ev:           # before submit: no missed wake-up
                await d.submit([call])
                return web.json_response(await d.wait_call(cid, wait, ev=ev))
        await d.submit([call])
        return web.json_response({"call_id": cid, "status": "queued", "function_id": fid,
                                  "attempts": 0, "logs": [], "placement": None})

    async def post_batch(req: web.Request):
        body = await read_json(req)
        fid = require(body, "function_id")
        inputs = require(body, "inputs", list)
        if len(inputs) > MAX_BATCH:
            raise InvalidError(f"at most {MAX_BATCH} inputs per batch")
        calls = [NewCall(new_id("call", 10), fid, _b64(a, "inputs[]")) for a in inputs]
        await d.submit(calls)                       # all or nothing: clients retry a 429
        return web.json_response({"call_ids": [c.call_id for c in calls]})

    async def get_call(req: web.Request):
        try:
            wait = float(req.query.get("wait", "0"))
            after = int(req.query.get("logs_after", "-1"))
        except ValueError:
            raise InvalidError("wait and logs_after must be numbers") from None
        return web.json_response(await d.wait_call(req.match_info["cid"], wait, after))

    async def cancel_call(req: web.Request):
        return web.json_response(await d.cancel(req.match_info["cid"]))

    async def get_logs(req: web.Request):
        cid = req.match_info["cid"]
        if await d.store.get_call(cid) is None:
            raise NotFoundError(f"unknown call {cid}")
        return web.json_response({"call_id": cid, "logs": await d.store.logs(cid)})

    async def list_calls(req: web.Request):
        try:
            limit = int(req.query.get("limit", "50"))
        except ValueError:
            raise InvalidError("limit must be an integer") from None
        rows = await d.store.list_calls(max(1, min(limit, 10_000)))
        for row in rows:
            row["placement"] = json.loads(row["placement"]) if row.get("placement") else None
            row["events"] = parse_events(row.get("events"))
        return web.json_response({"calls": rows})

    async def node_register(req: web.Request):
        await d.register_node(await read_json(req))
        return web.json_response({"ok": True})

    async def node_heartbeat(req: web.Request):
        body = await read_json(req)
        require(body, "node_id")
        require(body, "url")
        if not await d.heartbeat(body):
            raise NotFoundError("unknown node: register first")
        return web.json_response({"ok": True})

    async def get_nodes(req: web.Request):
        return web.json_response({"nodes": d.registry.describe()})

    async def get_containers(req: web.Request):
        return web.json_response({"containers": await d.containers()})

    async def get_images(req: web.Request):
        return web.json_response({"images": await d.store.list_images(),
                                  "layers": await d.store.list_layers()})

    async def get_status(req: web.Request):
        return web.json_response(await d.status())

    async def healthz(req: web.Request):
        return web.json_response({"ok": True, "replica": d.replica})

    r.add_put("/v1/blobs/{digest}", put_blob)
    r.add_get("/v1/blobs/{digest}", get_blob)      # aiohttp answers HEAD through GET
    r.add_post("/v1/images", post_image)
    r.add_get("/v1/images", get_images)
    r.add_post("/v1/layers/{key}/estargz", post_layer_estargz)
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
