"""Blob sources over real sockets: Range reads, keep-alive, bounded retries, typed errors;
the dispatcher source against an aiohttp FileResponse like the dispatcher's own."""
from __future__ import annotations

import asyncio
import http.server
import re
import threading
import time
from pathlib import Path

import pytest

from lazyfs import (
    BlobNotFoundError,
    DispatcherBlobSource,
    FileBlobSource,
    RegistryBlobSource,
    RetryPolicy,
    SourceError,
    SourceUnavailableError,
    open_estargz,
    write_layer,
)
from lazyfs.testing import make_layer

DIGEST = "sha256:" + "ab" * 32
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, timeout=1.0)


class FakeRegistry(http.server.ThreadingHTTPServer):
    """Serves one blob at /v2/NAME/blobs/DIGEST with Range; faults on demand."""

    daemon_threads = True

    def __init__(self, blob: bytes, port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.blob, self.fail_next, self.delay, self.connections = blob, 0, 0.0, 0
        self.requests: list[str] = []
        self.socks: list = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        """Stop listening and cut every open keep-alive connection, like a crash."""
        self.shutdown()
        self.server_close()
        for sock in self.socks:
            try:
                sock.shutdown(2)
            except OSError:
                pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeRegistry

    def setup(self):
        super().setup()
        self.server.connections += 1
        self.server.socks.append(self.connection)

    def log_message(self, *a):
        pass

    def _answer(self, body: bool):
        srv = self.server
        srv.requests.append(f"{self.command} {self.headers.get('Range', '')}")
        if srv.delay:
            time.sleep(srv.delay)
        if srv.fail_next > 0:
            srv.fail_next -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not self.path.endswith("/blobs/" + DIGEST):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, status, extra = srv.blob, 200, {}
        m = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            data, status = srv.blob[a:b + 1], 206
            extra["Content-Range"] = f"bytes {a}-{b}/{len(srv.blob)}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self):
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)


@pytest.fixture
def blob_bytes() -> bytes:
    return bytes(range(256)) * 4096            # 1 MiB


@pytest.fixture
def server(blob_bytes: bytes):
    srv = FakeRegistry(blob_bytes)
    yield srv
    srv.stop()


def test_file_source(tmp_path: Path, blob_bytes: bytes):
    p = tmp_path / "b"
    p.write_bytes(blob_bytes)
    s = FileBlobSource(p)
    assert s.size() == len(blob_bytes) and s.read(1000, 10) == blob_bytes[1000:1010]
    with pytest.raises(ValueError):
        s.read(len(blob_bytes) - 1, 2)
    with pytest.raises(BlobNotFoundError):
        FileBlobSource(tmp_path / "missing")


def test_registry_source_reads_ranges_over_one_connection(server, blob_bytes: bytes):
    s = RegistryBlobSource(server.url, "lazy/test", DIGEST, retry=FAST)
    assert s.size() == len(blob_bytes)
    for off in range(0, 100_000, 10_000):
        assert s.read(off, 777) == blob_bytes[off:off + 777]
    assert server.connections == 1                       # keep-alive
    assert s.stats()["bytes_received"] == 10 * 777
    s.close()


def test_registry_source_retries_5xx_then_succeeds(server, blob_bytes: bytes):
    s = RegistryBlobSource(server.url, "lazy/test", DIGEST, size=len(blob_bytes), retry=FAST)
    server.fail_next = 2
    assert s.read(5, 5) == blob_bytes[5:10]
    assert s.stats()["retries"] == 2


def test_registry_source_gives_up_in_bounded_time(server, blob_bytes: bytes):
    s = RegistryBlobSource(server.url, "lazy/test", DIGEST, size=len(blob_bytes), retry=FAST)
    server.fail_next = 100
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="503"):
        s.read(0, 10)
    assert time.monotonic() - t0 < FAST.worst_case_s
    assert len(server.requests) == FAST.attempts


def test_registry_source_timeout_is_bounded(server, blob_bytes: bytes):
    policy = RetryPolicy(attempts=2, base_delay=0.01, timeout=0.3)
    s = RegistryBlobSource(server.url, "lazy/test", DIGEST, size=len(blob_bytes), retry=policy)
    server.delay = 2.0
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="timed out"):
        s.read(0, 10)
    assert time.monotonic() - t0 < 2.0


def test_registry_source_down_then_back(blob_bytes: bytes):
    srv = FakeRegistry(blob_bytes)
    port = srv.server_address[1]
    s = RegistryBlobSource(srv.url, "lazy/test", DIGEST, size=len(blob_bytes), retry=FAST)
    assert s.read(0, 4) == blob_bytes[:4]
    srv.stop()
    with pytest.raises(SourceUnavailableError, match="failed 3 times"):
        s.read(0, 4)
    srv2 = FakeRegistry(blob_bytes, port)
    try:
        assert s.read(100, 4) == blob_bytes[100:104]
    finally:
        srv2.stop()


def test_registry_source_404_is_not_retried(server):
    s = RegistryBlobSource(server.url, "lazy/test", "sha256:" + "cd" * 32, retry=FAST)
    with pytest.raises(BlobNotFoundError):
        s.size()
    assert len(server.requests) == 1


def test_lazy_open_over_http_fetches_little(tmp_path: Path):
    layer = make_layer(tmp_path / "layer", big=3_000_000)
    b = write_layer(layer, tmp_path / "l.esgz", chunk_size=256 * 1024)
    srv = FakeRegistry(b.path.read_bytes())
    try:
        s = RegistryBlobSource(srv.url, "lazy/test", DIGEST, retry=FAST)
        e = open_estargz(s, b.toc_digest)
        assert e.read_file("etc/hello.txt") == b"hello, lazy world\n"
        assert s.stats()["bytes_received"] < b.size / 4
    finally:
        srv.stop()


# -- the dispatcher's blob endpoint: aiohttp FileResponse behind a bearer token ----------------
@pytest.fixture
def dispatcher(tmp_path: Path, blob_bytes: bytes):
    from aiohttp import web
    hexd = "ef" * 32
    (tmp_path / hexd).write_bytes(blob_bytes)

    async def get_blob(req: web.Request):
        if req.headers.get("Authorization") != "Bearer tok":
            return web.json_response({"error": "unauthorized"}, status=401)
        path = tmp_path / req.match_info["digest"]
        if not path.exists():
            return web.json_response({"error": "no blob"}, status=404)
        if req.method == "HEAD":
            return web.Response(headers={"Content-Length": str(path.stat().st_size)})
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/v1/blobs/{digest}", get_blob)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{port}", hexd
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def test_dispatcher_source_range_reads(dispatcher, blob_bytes: bytes):
    url, hexd = dispatcher
    s = DispatcherBlobSource(url, "sha256:" + hexd, "tok", retry=FAST)
    assert s.size() == len(blob_bytes)
    assert s.read(123_456, 1000) == blob_bytes[123_456:124_456]
    assert s.read(0, len(blob_bytes)) == blob_bytes


def test_dispatcher_source_wrong_token_and_missing_blob(dispatcher):
    url, hexd = dispatcher
    with pytest.raises(SourceError, match="401"):
        DispatcherBlobSource(url, hexd, "wrong", retry=FAST).size()
    with pytest.raises(BlobNotFoundError):
        DispatcherBlobSource(url, "00" * 32, "tok", retry=FAST).size()


# -- one conformance suite for every BlobSource ------------------------------------------------
@pytest.fixture(params=["file", "registry", "dispatcher"])
def any_source(request, tmp_path: Path, blob_bytes: bytes):
    if request.param == "file":
        p = tmp_path / "blob"
        p.write_bytes(blob_bytes)
        s = FileBlobSource(p)
    elif request.param == "registry":
        srv = request.getfixturevalue("server")
        s = RegistryBlobSource(srv.url, "lazy/test", DIGEST, retry=FAST)
    else:
        url, hexd = request.getfixturevalue("dispatcher")
        s = DispatcherBlobSource(url, hexd, "tok", retry=FAST)
    yield s
    s.close()


def test_blob_source_conformance(any_source, blob_bytes: bytes):
    from lazyfs.blobsource import BlobSource
    s = any_source
    assert isinstance(s, BlobSource)
    assert s.size() == len(blob_bytes)
    assert s.read(0, 0) == b""
    assert s.read(len(blob_bytes) - 3, 3) == blob_bytes[-3:]
    pieces = [(7, 1), (4096, 65536), (len(blob_bytes) // 2, 12345)]
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda o=o, n=n: results.append(s.read(o, n)))
               for o, n in pieces * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(blob_bytes[o:o + n] for o, n in pieces * 3)
    for bad in [(-1, 2), (len(blob_bytes), 1), (10, len(blob_bytes))]:
        with pytest.raises(ValueError):
            s.read(*bad)
    stats = s.stats()
    assert stats["requests"] >= 10 and stats["bytes_received"] >= sum(n for _, n in pieces) * 3
    assert s.describe()
