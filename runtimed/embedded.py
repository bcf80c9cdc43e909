"""`runtimectl up`: the dispatcher in this process and, by default, one node daemon as a
supervised child process (restarted if it dies).

The embedded default is zero-setup: SQLite + local blobs, one process. With
`--backend redis` (RUNTIMED_BACKEND=redis) several `up --no-node` processes are
replicas of one dispatcher: they share the Redis store and the blob dir
(RUNTIMED_BLOB_DIR), and with `--reuse-port` they listen on the same port, each with
its own SO_REUSEPORT socket, so the kernel spreads incoming connections over the live
ones (a replica that dies stops getting connections; no proxy to run). Give each
replica its own `--replica` name; a restarted replica with the same name takes over
its unfinished calls at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

from aiohttp import web

from sdk.exception import InvalidError

from .config import DEFAULT_PORT, Paths, ensure_token
from .dispatcher import Dispatcher, make_app
from .store import BackendConfig

log = logging.getLogger("runtimed.up")


async def _supervise_node(url: str, node_port: int, name: str, stop: asyncio.Event) -> None:
    backoff = 0.5
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runtimed.node_api", "--dispatcher", url, "--name", name,
            "--port", str(node_port))
        started = time.monotonic()
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except asyncio.TimeoutError:
                    proc.kill()
            return
        stopper.cancel()
        log.warning("node daemon exited with %s; restarting", proc.returncode)
        backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10)
        await asyncio.sleep(backoff)


async def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, node_port: int = DEFAULT_PORT + 1,
                with_node: bool = True, node_name: str = "node0",
                cfg: BackendConfig | None = None, reuse_port: bool = False) -> None:
    paths = Paths.from_env()
    cfg = cfg or BackendConfig.from_env()
    if reuse_port and cfg.kind != "redis":
        raise InvalidError("dispatcher replicas (--reuse-port) need the shared store: "
                           "--backend redis")
    token = ensure_token(paths)
    d = Dispatcher(paths, token, cfg, port=port)
    runner = web.AppRunner(make_app(d), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port).start()
    url = f"http://{host}:{port}"
    log.info("dispatcher %s on %s (token in %s)", d.replica, url, paths.token_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sup = asyncio.create_task(_supervise_node(url, node_port, node_name, stop)) if with_node else None
    await stop.wait()
    log.info("shutting down")
    if sup:
        await sup
    await runner.cleanup()


def main(host: str, port: int, node_port: int, with_node: bool,
         cfg: BackendConfig | None = None, reuse_port: bool = False) -> None:
    logging.basicConfig(level=os.environ.get("RUNTIMED_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(host, port, node_port, with_node, cfg=cfg, reuse_port=reuse_port))
