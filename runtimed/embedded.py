"""`runtimectl up`: the embedded default — the dispatcher in this process and one node
daemon as a supervised child process (restarted if it dies), SQLite + local blobs."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

from aiohttp import web

from .config import DEFAULT_PORT, Paths, ensure_token
from .dispatcher import Dispatcher, make_app

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
                with_node: bool = True, node_name: str = "node0") -> None:
    paths = Paths.from_env()
    token = ensure_token(paths)
    d = Dispatcher(paths, token)
    runner = web.AppRunner(make_app(d), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    url = f"http://{host}:{port}"
    log.info("dispatcher on %s (token in %s)", url, paths.token_file)
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


def main(host: str, port: int, node_port: int, with_node: bool) -> None:
    logging.basicConfig(level=os.environ.get("RUNTIMED_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(host, port, node_port, with_node))
