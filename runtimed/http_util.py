"""Shared aiohttp plumbing: bearer-token auth, typed errors as JSON, framed streams."""
from __future__ import annotations

import hmac
import json
import logging

from aiohttp import web

from sdk.exception import AuthError, Error, InvalidError, NotFoundError, SnapshotError
from snapshot.manifest import SnapshotError as StoreSnapshotError
from snapshot.store import SnapshotNotFound

from . import protocol

log = logging.getLogger(__name__)


def auth_middleware(token: str, open_paths: tuple[str, ...] = ("/healthz",)):
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def mw(request: web.Request, handler):
        if request.path not in open_paths:
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                raise AuthError("missing or wrong API token: send 'Authorization: Bearer <token>' "
                                "(the token is in /var/lib/runtimed/token or $RUNTIMED_TOKEN)")
        return await handler(request)
    return mw


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            code = {404: "not_found", 405: "invalid", 413: "invalid"}.get(e.status, "error")
            return web.json_response({"error": {"code": code, "message": e.reason}},
                                     status=e.status)
        raise
    except Error as e:
        return web.json_response({"error": e.to_wire()}, status=e.http_status)
    except StoreSnapshotError as e:
        err = NotFoundError(str(e)) if isinstance(e, SnapshotNotFound) else SnapshotError(str(e))
        return web.json_response({"error": err.to_wire()}, status=err.http_status)
    except Exception as e:  # noqa: BLE001 - never leak a 500 without a body
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": {"code": "error", "message": f"internal error: {e}"}},
                                 status=500)


async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidError("request body must be a JSON object")
    return body


def require(body: dict, key: str, typ: type | tuple = str):
    if key not in body:
        raise InvalidError(f"missing field {key!r}")
    if not isinstance(body[key], typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise InvalidError(f"field {key!r} must be {name}")
    return body[key]


class FrameStream:
    """A streamed HTTP response made of protocol frames (binary-safe, no line limits)."""

    def __init__(self, request: web.Request):
        self.request = request
        self.resp = web.StreamResponse(headers={"Content-Type": "application/x-runtimed-frames"})

    async def __aenter__(self) -> "FrameStream":
        await self.resp.prepare(self.request)
        return self

    async def send(self, op: str, payload: bytes = b"", **header) -> None:
        await self.resp.write(protocol.encode(op, payload, **header))

    async def __aexit__(self, *exc) -> None:
        try:
            await self.resp.write_eof()
        except ConnectionError:
            pass
