"""The dispatcher's client for one node's API (frames over a streamed HTTP body)."""
from __future__ import annotations

import asyncio
from typing import Callable

import aiohttp

from sdk.exception import Error, from_wire

from . import protocol


class NodeLost(Exception):
    """The connection to the node broke before a result arrived (node died or restarted).
    `started` is False when the request never reached the node (connection refused)."""

    def __init__(self, message: str, started: bool = True):
        super().__init__(message)
        self.started = started


class NodeClient:
    def __init__(self, node_id: str, url: str, token: str):
        self.node_id, self.url = node_id, url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=None, connect=5),
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))
        return self._session

    async def _frames(self, path: str, on_frame: Callable[[protocol.Frame], None], **kw):
        try:
            async with self._s().post(self.url + path, **kw) as r:
                if r.status >= 400:
                    try:
                        err = (await r.json())["error"]
                    except Exception:
                        err = {"code": "error", "message": f"node answered {r.status}"}
                    raise from_wire(err)
                while (frame := await protocol.read_frame(r.content)) is not None:
                    if frame.op in ("result", "done"):
                        return frame
                    if frame.op == "error":
                        raise from_wire(frame.get("error") or {})
                    on_frame(frame)
        except Error:
            raise               # typed errors from the node (FunctionTimeoutError is a TimeoutError)
        except aiohttp.ClientConnectorError as e:
            raise NodeLost(f"cannot reach node {self.node_id}: {e}", started=False) from e
        except (aiohttp.ClientError, asyncio.TimeoutError, protocol.ProtocolError,
                ConnectionError) as e:
            raise NodeLost(f"lost node {self.node_id}: {e}") from e
        raise NodeLost(f"node {self.node_id} closed the stream without a result")

    async def run(self, req: dict, args: bytes, on_log: Callable[[str, str], None]) -> dict:
        def on_frame(f: protocol.Frame) -> None:
            if f.op == "log":
                on_log(f.get("stream", "stdout"), f.payload.decode("utf-8", "replace"))

        frame = await self._frames("/v1/run", on_frame, data=protocol.encode("run", args, **req))
        result = dict(frame.header)
        result["payload"] = frame.payload
        return result

    async def build(self, image: dict, on_event: Callable[[dict], None]) -> list:
        def on_frame(f: protocol.Frame) -> None:
            if f.op == "log":
                on_event({"type": "log", "text": f.payload.decode("utf-8", "replace")})
            else:
                on_event(dict(f.header))

        frame = await self._frames("/v1/build", on_frame, json=image)
        return frame.get("report") or []

    async def post_json(self, path: str, body: dict) -> None:
        try:
            async with self._s().post(self.url + path, json=body) as r:
                r.raise_for_status()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise NodeLost(str(e)) from e

    async def status(self) -> dict:
        try:
            async with self._s().get(self.url + "/v1/status",
                                     timeout=aiohttp.ClientTimeout(total=5)) as r:
                return await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise NodeLost(str(e)) from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
