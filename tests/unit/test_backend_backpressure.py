"""Backpressure through the real dispatcher HTTP API (no node: calls stay queued): past
the bound, POST /v1/calls and /v1/calls/batch answer 429 with Retry-After, and the SDK
client waits Retry-After and retries, then raises OverloadedError."""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import threading

import pytest
from aiohttp import web

from runtimed.config import Paths
from runtimed.dispatcher import Dispatcher, make_app
from runtimed.redis_local import free_port
from runtimed.store import BackendConfig
from sdk.client import Client
from sdk.exception import OverloadedError

TOKEN = "t0ken"


@pytest.fixture
def dispatcher(tmp_path):
    """A dispatcher (SQLite backend, bound 3) on a free port, in a thread of its own."""
    paths = Paths(state=tmp_path, cache=tmp_path / "cache", criu=tmp_path / "criu")
    d = Dispatcher(paths, TOKEN, BackendConfig(kind="sqlite", max_pending=3), port=0)
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner: list[web.AppRunner] = []

    async def serve():
        r = web.AppRunner(make_app(d), access_log=None)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", port).start()
        runner.append(r)
        await d.store.put_image("img-1", {"steps": [{"key": "base", "kind": "base"}]}, [])
        await d.store.put_function("fn-1", "f", "app", "b" * 64, "img-1", {})
        ready.set()

    th = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()),
                          daemon=True)
    th.start()
    assert ready.wait(20)
    yield d, port
    asyncio.run_coroutine_threadsafe(runner[0].cleanup(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    th.join(10)


def _post(port: int, path: str, body: dict):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {TOKEN}",
                                               "Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, dict(r.getheaders()), json.loads(r.read())


ARGS = base64.b64encode(b"x").decode()


def test_429_with_retry_after_past_the_bound(dispatcher):
    _, port = dispatcher
    for _ in range(3):
        status, _, body = _post(port, "/v1/calls", {"function_id": "fn-1", "args_b64": ARGS})
        assert status == 200 and body["status"] == "queued"
    status, headers, body = _post(port, "/v1/calls", {"function_id": "fn-1", "args_b64": ARGS})
    assert status == 429 and body["error"]["code"] == "overloaded"
    assert int(headers["Retry-After"]) >= 1
    assert "3 calls are unfinished" in body["error"]["message"]
    status, headers, _ = _post(port, "/v1/calls/batch", {"function_id": "fn-1",
                                                         "inputs": [ARGS, ARGS]})
    assert status == 429 and "Retry-After" in headers
    c = Client(f"http://127.0.0.1:{port}", TOKEN)
    st = c.json("GET", "/v1/status")
    assert st["pending_calls"] == 3 and st["max_pending"] == 3
    assert st["stats"]["overloaded"] == 2


def test_sdk_client_honours_retry_after_then_gives_up(dispatcher, monkeypatch):
    _, port = dispatcher
    c = Client(f"http://127.0.0.1:{port}", TOKEN)
    c.json("POST", "/v1/calls/batch", {"function_id": "fn-1", "inputs": [ARGS] * 3})
    slept: list[float] = []
    import sdk.client
    monkeypatch.setattr(sdk.client.time, "sleep", slept.append)
    with pytest.raises(OverloadedError):
        c.json("POST", "/v1/calls", {"function_id": "fn-1", "args_b64": ARGS}, retries=2)
    assert len(slept) == 2 and all(s >= 1 for s in slept)


def test_a_cancelled_call_frees_room(dispatcher):
    _, port = dispatcher
    c = Client(f"http://127.0.0.1:{port}", TOKEN)
    ids = c.json("POST", "/v1/calls/batch", {"function_id": "fn-1", "inputs": [ARGS] * 3})
    with pytest.raises(OverloadedError):
        c.json("POST", "/v1/calls", {"function_id": "fn-1", "args_b64": ARGS}, retries=0)
    assert c.json("POST", f"/v1/calls/{ids['call_ids'][0]}/cancel", {})["status"] == "cancelled"
    assert c.json("POST", "/v1/calls", {"function_id": "fn-1", "args_b64": ARGS},
                  retries=0)["status"] == "queued"
