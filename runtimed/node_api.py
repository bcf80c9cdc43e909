"""The node daemon's HTTP API and process entry point (`runtimectl node`).

    POST /v1/run      frame(run, header=call request, payload=args)  -> frames: log*, result | error
    POST /v1/build    JSON image                                     -> frames: event*, done | error
    POST /v1/prewarm  JSON function                                  -> 204
    GET  /v1/status   containers, pools, layers
All but /healthz need the bearer token. The node registers with the dispatcher and
heartbeats; the dispatcher pushes calls to it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket

import aiohttp
from aiohttp import web

from sdk.exception import Error, InvalidError, NotFoundError
from snapshot import transfer

from . import criu_restore, protocol
from .blobs import HttpBlobSource
from .config import Paths, ensure_token
from .http_util import FrameStream, auth_middleware, error_middleware, read_json
from .node import Node, SnapshotAdmin

log = logging.getLogger("runtimed.node")
_END = object()


async def _stream_job(request: web.Request, job, result_op: str) -> web.StreamResponse:
    """Run `job(emit)` and stream its events, then its result, as frames."""
    q: asyncio.Queue = asyncio.Queue()

    async def runner():
        try:
            return await job(q.put_nowait)
        finally:
            q.put_nowait(_END)

    task = asyncio.create_task(runner())
    async with FrameStream(request) as fs:
        try:
            while (item := await q.get()) is not _END:
                if item.get("type") == "log":
                    await fs.send("log", item["text"].encode("utf-8", "replace"),
                                  stream=item.get("stream", "stdout"))
                else:
                    await fs.send("event", **item)
            try:
                result = await task
            except Error as e:
                await fs.send("error", error=e.to_wire())
                return fs.resp
            except Exception as e:  # noqa: BLE001
                log.exception("job failed")
                await fs.send("error", error={"code": "execution_failed", "message": str(e)})
                return fs.resp
            if result_op == "result":
                payload = result.pop("payload", b"") or b""
                await fs.send("result", payload, **result)
            else:
                await fs.send("done", report=result)
        except ConnectionError:
            log.info("client went away; the job continues and its result is dropped")
    return fs.resp


def make_app(node: Node, token: str) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware(token)],
                          client_max_size=1 << 30)

    async def run(request: web.Request):
        body = await request.read()
        hlen, plen = protocol.decode_header(body[:protocol.HEADER.size])
        start = protocol.HEADER.size
        frame = protocol.decode_body(body[start:start + hlen], body[start + hlen:])
        req = dict(frame.header)
        req["args"] = frame.payload
        return await _stream_job(request, lambda emit: node.run(req, emit), "result")

    async def build(request: web.Request):
        image = await read_json(request)
        return await _stream_job(request, lambda emit: node.build(image, emit), "done")

    async def prewarm(request: web.Request):
        await node.prewarm(await read_json(request))
        return web.Response(status=204)

    async def status(request: web.Request):
        return web.json_response(node.status())

    async def healthz(request: web.Request):
        return web.json_response({"ok": True, "node_id": node.node_id})

    admin = SnapshotAdmin(node)

    async def snap_list(request: web.Request):
        await node.snapshots.settle()      # a snapshot still being stored counts
        return web.json_response({"snapshots": node.snapshots.list(),
                                  "stats": node.snapshots.store.stats().__dict__})

    async def snap_get(request: web.Request):
        await node.snapshots.settle()      # a snapshot still being stored counts
        m = node.snapshots.store.get(request.match_info["sid"])
        return web.Response(text=m.to_json(), content_type="application/json")

    async def snap_rm(request: web.Request):
        await node.snapshots.settle()      # a snapshot still being stored counts
        sid = request.match_info["sid"]
        node.snapshots.store.get(sid)
        node.snapshots.store.remove(sid)
        node.snapshots.drop_hot(sid)
        return web.json_response({"removed": sid})

    async def snap_verify(request: web.Request):
        await node.snapshots.settle()      # a snapshot still being stored counts
        sid = request.match_info["sid"]
        problems = await asyncio.get_running_loop().run_in_executor(
            None, node.snapshots.store.verify, sid)
        return web.json_response({"snapshot_id": sid, "ok": not problems, "problems": problems})

    async def snap_gc(request: web.Request):
        await node.snapshots.settle()      # a snapshot still being stored counts
        body = await read_json(request)
        budget = body.get("budget_bytes")
        rep = await asyncio.get_running_loop().run_in_executor(
            None, node.snapshots.store.gc, budget)
        for sid in rep.removed_snapshots:
            node.snapshots.drop_hot(sid)
        return web.json_response({"removed_snapshots": list(rep.removed_snapshots),
                                  "removed_chunks": rep.removed_chunks,
                                  "freed_bytes": rep.freed_bytes})

    async def snap_create(request: web.Request):
        body = await read_json(request)
        return web.json_response(await admin.create(body.get("target", ""), body.get("function")))

    async def snap_restore(request: web.Request):
        await node.snapshots.settle()      # a snapshot still being stored counts
        mode = (await read_json(request)).get("mode", "eager")
        if mode not in ("eager", "lazy"):
            raise InvalidError("mode must be 'eager' or 'lazy'")
        return web.json_response(await admin.restore(request.match_info["sid"], mode))

    async def snap_export(request: web.Request):
        await node.snapshots.settle()      # a snapshot still being stored counts
        sid = request.match_info["sid"]
        out = node.snapshots.root / f"export-{sid}.tar"
        await asyncio.get_running_loop().run_in_executor(
            None, node.snapshots.store.export, sid, out)
        try:
            return web.Response(body=out.read_bytes(), content_type="application/x-tar")
        finally:
            out.unlink(missing_ok=True)

    async def snap_import(request: web.Request):
        tmp = node.snapshots.root / f"import-{os.getpid()}-{id(request)}.tar"
        with open(tmp, "wb") as f:
            async for chunk in request.content.iter_chunked(1 << 20):
                f.write(chunk)
        try:
            m = await asyncio.get_running_loop().run_in_executor(
                None, node.snapshots.store.import_, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return web.json_response({"snapshot_id": m.snapshot_id, "key": m.key})

    async def drain(request: web.Request):
        return web.json_response({"stopped": await node.drain(request.match_info["fid"])})

    async def evict_layer(request: web.Request):
        return web.json_response(await node.evict_layer(request.match_info["key"]))

    async def set_config(request: web.Request):
        body = await read_json(request)
        out = node.lazy.configure(body)
        if "registry" in body and node.builder is not None:      # where builds are pushed
            node.builder.registry = str(body["registry"] or "")
        if "cuda_checkpoint" in body:          # path of cuda-checkpoint; "" or null: search
            node.gpus.cuda_checkpoint = str(body["cuda_checkpoint"] or "").strip() or None
        if "restore_engine" in body and node.ctx is not None:
            if body["restore_engine"] not in criu_restore.ENGINES:
                raise InvalidError(f"restore_engine must be one of {', '.join(criu_restore.ENGINES)}")
            node.ctx.restore_engine = body["restore_engine"]
        return web.json_response({**out, "registry": node.builder and node.builder.registry,
                                  "cuda_checkpoint": node.gpus.cuda_checkpoint,
                                  "restore_engine": node.ctx and node.ctx.restore_engine})

    app.router.add_post("/v1/pools/{fid}/drain", drain)
    app.router.add_post("/v1/layers/{key}/evict", evict_layer)
    app.router.add_post("/v1/config", set_config)
    async def snap_by_key(request: web.Request):
        await node.snapshots.settle()      # a snapshot still being stored counts
        m = node.snapshots.store.lookup(request.match_info["key"])
        if m is None:
            raise NotFoundError(f"no snapshot for {request.match_info['key']} on {node.node_id}")
        return web.Response(text=m.to_json(), content_type="application/json")

    async def chunk(request: web.Request):
        try:
            data = transfer.chunk_blob(node.snapshots.store, request.match_info["sha"])
        except (ValueError, FileNotFoundError):
            raise NotFoundError(f"no chunk {request.match_info['sha'][:80]}") from None
        return web.Response(body=data, content_type="application/zstd")

    app.router.add_get("/v1/snapshots/by-key/{key}", snap_by_key)
    app.router.add_get("/v1/chunks/{sha}", chunk)
    app.router.add_get("/v1/snapshots", snap_list)
    app.router.add_post("/v1/snapshots/gc", snap_gc)
    app.router.add_post("/v1/snapshots/create", snap_create)
    app.router.add_post("/v1/snapshots/import", snap_import)
    app.router.add_get("/v1/snapshots/{sid}", snap_get)
    app.router.add_delete("/v1/snapshots/{sid}", snap_rm)
    app.router.add_post("/v1/snapshots/{sid}/verify", snap_verify)
    app.router.add_post("/v1/snapshots/{sid}/restore", snap_restore)
    app.router.add_get("/v1/snapshots/{sid}/export", snap_export)
    app.router.add_post("/v1/run", run)
    app.router.add_post("/v1/build", build)
    app.router.add_post("/v1/prewarm", prewarm)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/healthz", healthz)
    return app


async def register_loop(node: Node, dispatcher: str, token: str, url: str,
                        interval: float = 2.0) -> None:
    """Register with the dispatcher, then heartbeat; re-register if it forgets us."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=5)) as s:
        registered = False
        while True:
            body = {"node_id": node.node_id, "url": url, "cpu": os.cpu_count(),
                    "memory_mb": node.memory_budget_mb, "reserved_mb": node.reserved_mb,
                    "active": len(node.active), **node.holdings()}
            try:
                path = "heartbeat" if registered else "register"
                async with s.post(f"{dispatcher}/v1/nodes/{path}", json=body) as r:
                    if r.status == 404 and registered:
                        registered = False
                        continue
                    if r.status < 300 and not registered:
                        log.info("registered with %s as %s", dispatcher, node.node_id)
                    registered = r.status < 300
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                if registered:
                    log.warning("dispatcher unreachable: %s", e)
                registered = False
            await asyncio.sleep(interval)


async def serve(paths: Paths, name: str, dispatcher: str, host: str, port: int,
                ready: asyncio.Event | None = None) -> None:
    token = ensure_token(paths)
    blobs = HttpBlobSource(dispatcher, token, paths.node_dir(name) / "blobs")
    node = Node(paths, name, blobs)
    node.token = token
    await node.start()
    runner = web.AppRunner(make_app(node, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    actual = port or site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://{host}:{actual}"
    log.info("node %s serving on %s", node.node_id, url)
    hb = asyncio.create_task(register_loop(node, dispatcher, token, url))
    if ready:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_pid = os.getpid()

    # Not loop.add_signal_handler: it routes signals through a wakeup fd that forked
    # helpers (pyroute2's netns workers) inherit, so a SIGTERM *they* receive would
    # stop this daemon. A plain handler that exits when it runs in such a child is safe.
    def on_signal(signum, _frame) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        log.info("got signal %d", signum)
        loop.call_soon_threadsafe(stop.set)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        await stop.wait()
        log.info("shutting down: stopping containers")
    finally:
        hb.cancel()
        await node.shutdown()
        await blobs.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="runtimectl node", description="run a node daemon")
    p.add_argument("--dispatcher", default=os.environ.get("RUNTIMED_URL", "http://127.0.0.1:8470"))
    p.add_argument("--name", default=socket.gethostname().split(".")[0][:20] or "node0")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8471)
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RUNTIMED_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(Paths.from_env(), a.name, a.dispatcher.rstrip("/"), a.host, a.port))


if __name__ == "__main__":
    main()
