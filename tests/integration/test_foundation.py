"""The foundation issue, end to end: the SDK as a user drives it (App, Image,
@app.function, `with app.run()`) against a runtime of the test session's own.

Functions that run remotely must not use this module's imports (pytest, sdk):
the module is pickled by value and the containers have neither.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import threading
import time
import uuid

import pytest

import sdk
from sdk import App, Image
from sdk.exception import (ExecutionError, FunctionTimeoutError, ImageBuildError, InvalidError,
                           NodeUnavailableError, OOMError)

pytestmark = pytest.mark.integration

OFFSET = 1000                      # a module-level constant functions close over
RUN = uuid.uuid4().hex[:10]        # unique per test run: image layers are never stale hits

image = Image.debian_slim().pip_install("numpy==1.26.4").env({"K": "v"})
base = Image.debian_slim()
app = App("foundation-tests", image=image)


@app.function(image=image, cpu=1, memory=512, timeout=60, retries=1)
def square(x):
    import numpy as np
    return int(np.square(x))


@app.function()
def read_env(name):
    import os
    return os.environ.get(name)


@app.function()
def add(a, b, scale=1):
    return (a + b) * scale


@app.function()
def add_offset(x):
    return x + OFFSET


@app.function()
def fail_boom(x):
    raise ValueError(f"boom {x}")


class CustomError(Exception):
    """A user exception type that only exists in this module."""


@app.function()
def fail_custom(x):
    raise CustomError(f"custom {x}")


@app.function(image=base)
def warm_probe(x):
    return x


@app.function(image=base, memory=64, timeout=60)
def allocate(mb):
    data = b"x" * (mb * 2**20)         # written, so the pages are really charged
    return len(data)


@app.function(image=base, timeout=2)
def sleeper(seconds):
    import time as _t
    _t.sleep(seconds)
    return seconds


@app.function(image=base)
def shout(tag):
    import sys
    print(f"out-{tag}")
    print(f"err-{tag}", file=sys.stderr)
    return tag


@pytest.fixture(scope="module")
def deployed(runtime):
    with app.run():
        yield app


def build(img: Image, name: str) -> list[dict]:
    """Build `img` the way a user does: a function on it, then `with app.run()`."""
    a = App(name)

    @a.function(image=img)
    def noop():
        return None

    with a.run():
        pass
    return img.last_build


def statuses(report: list[dict]) -> list[str]:
    return [s["status"] for s in report]


# -- the issue snippet -------------------------------------------------------------------------
def test_issue_snippet(deployed):
    assert square.local(3) == 9
    assert square.remote(3) == 9
    assert list(square.map(range(10))) == [i * i for i in range(10)]
    call = square.spawn(4)
    assert isinstance(call, sdk.FunctionCall)
    assert call.get(timeout=30) == 16
    assert call.info.get("tier") in ("cold", "warm")
    # the image's env reaches the container; starmap spreads tuples (+ shared kwargs)
    assert read_env.remote("K") == "v"
    assert list(add.starmap([(1, 2), (3, 4), (5, 6)])) == [3, 7, 11]
    assert list(add.starmap([(1, 2), (3, 4)], kwargs={"scale": 10})) == [30, 70]
    # numpy came from the image, and steps are reported
    assert [s["status"] for s in image.last_build][0] == "cached"
    assert image.image_id and image.image_id.startswith("img-")


def test_second_call_is_warm(deployed):
    assert warm_probe.remote(1) == 1
    first = warm_probe.last_call.info
    assert first.get("tier") == "cold"
    assert warm_probe.remote(2) == 2
    second = warm_probe.last_call.info
    assert second.get("tier") == "warm"
    assert second["container_id"] == first["container_id"]


# -- closures ----------------------------------------------------------------------------------
def test_closure_over_module_constant(deployed):
    assert add_offset.remote(5) == 1005


def test_closure_over_nested_function_and_local_constant(runtime):
    factor = 7

    def helper(x):
        return x * factor

    a = App("closures")

    @a.function(image=base)
    def compute(x):
        return helper(x) + OFFSET

    with a.run():
        assert compute.remote(3) == 21 + OFFSET
        assert compute.local(3) == 21 + OFFSET


def test_unpicklable_closure_variable_fails_at_decoration(runtime):
    my_lock = threading.Lock()
    a = App("bad-closure")
    with pytest.raises(InvalidError) as ei:
        @a.function(image=base)
        def uses_lock():
            return my_lock.locked()
    msg = str(ei.value)
    assert "'my_lock'" in msg, msg
    assert "lock" in msg.replace("'my_lock'", ""), msg          # its type: _thread.lock
    assert "uses_lock" in msg
    assert not a.registered_functions


def test_unpicklable_argument(deployed):
    with pytest.raises(InvalidError, match=r"argument 0 of type lock"):
        add_offset.remote(threading.Lock())
    with pytest.raises(InvalidError, match=r"keyword argument 'b' of type lock"):
        add.remote(1, b=threading.Lock())


# -- remote exceptions ---------------------------------------------------------------------------
def test_remote_exception_keeps_type_message_and_traceback(deployed):
    with pytest.raises(ValueError, match="boom 42") as ei:
        fail_boom.remote(42)
    cause = ei.value.__cause__
    assert cause is not None
    text = str(cause)
    assert "fail_boom" in text and "ValueError: boom 42" in text, text
    # spawn().get() raises the same way; map can hand exceptions back as values
    with pytest.raises(ValueError, match="boom 7"):
        fail_boom.spawn(7).get(timeout=30)
    out = list(fail_boom.map([1, 2], return_exceptions=True))
    assert [type(e) for e in out] == [ValueError, ValueError]
    assert [str(e) for e in out] == ["boom 1", "boom 2"]


def test_custom_exception_type_comes_back(deployed):
    with pytest.raises(CustomError, match="custom 5") as ei:
        fail_custom.remote(5)
    assert type(ei.value) is CustomError
    assert "fail_custom" in str(ei.value.__cause__)


# -- images --------------------------------------------------------------------------------------
def test_image_change_rebuilds_one_layer(runtime):
    u = uuid.uuid4().hex[:12]
    a_img = base.run_commands(f"echo one-{u} > /one").run_commands(f"echo two-{u} > /two")
    b_img = base.run_commands(f"echo one-{u} > /one").run_commands(f"echo TWO-{u} > /two")
    assert statuses(build(a_img, "img-a")) == ["cached", "built", "built"]

    b_app = App("img-b")

    @b_app.function(image=b_img)
    def read_both():
        return open("/one").read().strip(), open("/two").read().strip()

    with b_app.run():
        assert statuses(b_img.last_build) == ["cached", "cached", "built"]
        assert read_both.remote() == (f"one-{u}", f"TWO-{u}")
    # building A again is all cache hits
    again = base.run_commands(f"echo one-{u} > /one").run_commands(f"echo two-{u} > /two")
    assert statuses(build(again, "img-a2")) == ["cached", "cached", "cached"]


def test_force_build_rebuilds_the_step_and_below(runtime):
    u = uuid.uuid4().hex[:12]
    first = base.run_commands(f"echo f-{u} > /f").run_commands(f"echo g-{u} > /g")
    assert statuses(build(first, "force-1")) == ["cached", "built", "built"]
    forced = base.run_commands(f"echo f-{u} > /f", force_build=True) \
        .run_commands(f"echo g-{u} > /g")
    assert forced.keys() == first.keys()
    assert statuses(build(forced, "force-2")) == ["cached", "built", "built"]
    last = base.run_commands(f"echo f-{u} > /f").run_commands(f"echo g-{u} > /g",
                                                                force_build=True)
    assert statuses(build(last, "force-3")) == ["cached", "cached", "built"]


def test_add_local_file_dir_and_workdir(runtime, tmp_path):
    u = uuid.uuid4().hex[:12]
    f = tmp_path / "hello.txt"
    f.write_text(f"hello {u}\n")
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    d = tmp_path / "proj"
    (d / "sub").mkdir(parents=True)
    (d / "main.py").write_text(f"VALUE = {u!r}\n")
    (d / "sub" / "data.txt").write_text("nested\n")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    img = (base.add_local_file(f, "/data/hello.txt").add_local_file(tool, "/usr/local/bin/")
           .add_local_dir(d, "/srv/proj").workdir("/srv/proj"))

    a = App("local-files")

    @a.function(image=img)
    def inspect_tree():
        import os
        return {"hello": open("/data/hello.txt").read(),
                "tool_x": os.access("/usr/local/bin/tool.sh", os.X_OK),
                "main": open("/srv/proj/main.py").read(),
                "nested": open("/srv/proj/sub/data.txt").read(),
                "listing": sorted(os.listdir("/srv/proj")),
                "cwd": os.getcwd()}

    with a.run():
        got = inspect_tree.remote()
        report = img.last_build
    assert got["hello"] == f"hello {u}\n"
    assert got["tool_x"] is True
    assert got["main"] == f"VALUE = {u!r}\n"
    assert got["nested"] == "nested\n"
    assert got["listing"] == ["main.py", "sub"]         # __pycache__ is never shipped
    assert got["cwd"] == "/srv/proj"
    kinds = [s["status"] for s in report]
    assert kinds[0] == "cached" and kinds[-1] == "meta"
    assert all(k in ("pulled", "built") for k in kinds[1:4]), report


def test_failing_image_step_raises_image_build_error(runtime):
    u = uuid.uuid4().hex[:12]
    bad = base.run_commands(f"echo oops-{u}; exit 3")
    with pytest.raises(ImageBuildError) as ei:
        build(bad, "bad-image")
    err = ei.value
    assert err.exit_code == 3
    assert f"oops-{u}" in err.log_tail
    assert "exit code 3" in str(err)
    assert err.step.startswith("run_commands")

    with pytest.raises(ImageBuildError) as ei:
        build(base.run_commands(f"echo also-{u}; false"), "bad-image-2")
    assert ei.value.exit_code == 1
    assert f"also-{u}" in ei.value.log_tail


# -- failures of the call itself -------------------------------------------------------------------
def test_oom_then_recovery(runtime, deployed):
    node_before = runtime.node_process()
    with pytest.raises(OOMError, match="memory"):
        allocate.remote(256)
    # the daemon is alive and serves the next calls
    assert runtime.node_process() is not None
    assert runtime.node_process().pid == node_before.pid
    assert add_offset.remote(1) == 1001
    assert allocate.remote(1) == 2**20


def test_timeout_stops_the_call_then_recovery(deployed):
    t = time.monotonic()
    with pytest.raises(ExecutionError):
        sleeper.remote(30)
    assert time.monotonic() - t < 15
    assert sleeper.remote(0) == 0
    # FunctionCall.get(timeout) gives up waiting without failing the call
    call = sleeper.spawn(1.5)
    with pytest.raises(sdk.TimeoutError):
        call.get(timeout=0.2)
    assert call.get(timeout=30) == 1.5


def test_timeout_raises_function_timeout_error(deployed):
    with pytest.raises(FunctionTimeoutError, match="timeout of 2 s"):
        sleeper.remote(30)


def test_concurrent_map_of_50_is_ordered(deployed):
    assert list(add_offset.map(range(50))) == [i + OFFSET for i in range(50)]
    assert list(square.map(range(50))) == [i * i for i in range(50)]


# -- logs ----------------------------------------------------------------------------------------
def test_stdout_reaches_caller_and_runtimectl_logs(runtime, deployed, capsys):
    tag = uuid.uuid4().hex[:8]
    assert shout.remote(tag) == tag
    out, err = capsys.readouterr()
    assert f"out-{tag}" in out
    assert f"err-{tag}" in err
    cid = shout.last_call.object_id
    r = runtime.cli("logs", cid)
    assert r.returncode == 0, r.stderr
    assert f"out-{tag}" in r.stdout
    assert f"err-{tag}" in r.stderr


# -- the HTTP API refuses bad requests ---------------------------------------------------------------
def _http(runtime, method: str, path: str, body: bytes | None = None, *,
          token: str | None = "default", content_type: str = "application/json"):
    conn = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=30)
    headers = {"Content-Type": content_type}
    if token == "default":
        token = runtime.token
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(data) if data else {}
    except ValueError:
        parsed = {"raw": data}
    return resp.status, parsed


def _code(parsed: dict) -> str | None:
    return (parsed.get("error") or {}).get("code")


def test_http_auth(runtime):
    status, body = _http(runtime, "GET", "/v1/nodes", token=None)
    assert (status, _code(body)) == (401, "unauthenticated")
    status, body = _http(runtime, "GET", "/v1/calls", token="not-the-token")
    assert (status, _code(body)) == (401, "unauthenticated")
    status, body = _http(runtime, "POST", "/v1/calls", b"{}", token="not-the-token")
    assert (status, _code(body)) == (401, "unauthenticated")
    status, body = _http(runtime, "GET", "/healthz", token=None)
    assert status == 200


def test_http_bad_requests(runtime, deployed):
    good_args = base64.b64encode(b"x").decode()
    status, body = _http(runtime, "POST", "/v1/calls", b"{not json")
    assert (status, _code(body)) == (400, "invalid")
    status, body = _http(runtime, "POST", "/v1/calls", b"[1, 2]")
    assert (status, _code(body)) == (400, "invalid")
    status, body = _http(runtime, "POST", "/v1/calls", json.dumps({"args_b64": good_args}).encode())
    assert (status, _code(body)) == (400, "invalid")
    status, body = _http(runtime, "GET", "/v1/calls/call-doesnotexist")
    assert (status, _code(body)) == (404, "not_found")
    status, body = _http(runtime, "GET", "/v1/calls/call-doesnotexist/logs")
    assert (status, _code(body)) == (404, "not_found")
    status, body = _http(runtime, "POST", "/v1/calls", json.dumps(
        {"function_id": "fn-doesnotexist", "args_b64": good_args}).encode())
    assert (status, _code(body)) == (404, "not_found")
    status, body = _http(runtime, "POST", "/v1/calls", json.dumps(
        {"function_id": square.object_id, "args_b64": "!!not base64!!"}).encode())
    assert (status, _code(body)) == (400, "invalid")
    status, body = _http(runtime, "POST", "/v1/calls", json.dumps(
        {"function_id": square.object_id, "args_b64": good_args, "wait": "soon"}).encode())
    assert (status, _code(body)) == (400, "invalid")
    status, body = _http(runtime, "POST", "/v1/calls/batch", json.dumps(
        {"function_id": square.object_id, "inputs": [good_args, "%%%"]}).encode())
    assert (status, _code(body)) == (400, "invalid")
    status, body = _http(runtime, "GET", "/v1/calls?limit=many")
    assert (status, _code(body)) == (400, "invalid")
    # blobs: content must match the name
    data = b"blob content " + RUN.encode()
    wrong = hashlib.sha256(b"something else").hexdigest()
    status, body = _http(runtime, "PUT", f"/v1/blobs/{wrong}", data,
                         content_type="application/octet-stream")
    assert (status, _code(body)) == (400, "invalid")
    status, _ = _http(runtime, "GET", f"/v1/blobs/{wrong}")
    assert status == 404
    status, body = _http(runtime, "PUT", "/v1/blobs/not-a-digest", data,
                         content_type="application/octet-stream")
    assert (status, _code(body)) == (400, "invalid")
    right = hashlib.sha256(data).hexdigest()
    status, _ = _http(runtime, "PUT", f"/v1/blobs/{right}", data,
                      content_type="application/octet-stream")
    assert status == 201
    status, _ = _http(runtime, "GET", "/v1/no-such-route")
    assert status == 404


def test_batch_with_bad_input_submits_nothing(runtime, deployed):
    before = {c["id"] for c in runtime.client.json("GET", "/v1/calls?limit=1000")["calls"]}
    good_args = base64.b64encode(b"x").decode()
    status, _ = _http(runtime, "POST", "/v1/calls/batch", json.dumps(
        {"function_id": square.object_id, "inputs": [good_args, good_args, "%%%"]}).encode())
    assert status == 400
    after = {c["id"] for c in runtime.client.json("GET", "/v1/calls?limit=1000")["calls"]}
    assert after == before


# -- runtimectl ----------------------------------------------------------------------------------
def test_runtimectl_views(runtime, deployed):
    assert square.remote(7) == 49
    cid = square.last_call.info["container_id"]

    r = runtime.cli("ps", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    mine = [row for row in rows if row["id"] == cid]
    assert mine, rows
    assert mine[0]["function"] == square.object_id
    assert mine[0]["state"] == "idle"
    assert mine[0]["tier"] in ("cold", "warm", "restore")

    r = runtime.cli("ps")
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert header[:5] == ["ID", "NODE_ID", "FUNCTION", "STATE", "TIER"]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(cid))
    assert "idle" in line.split()

    r = runtime.cli("images")
    assert r.returncode == 0, r.stderr
    assert "images:" in r.stdout and image.image_id in r.stdout and "layers" in r.stdout

    r = runtime.cli("status")
    assert r.returncode == 0, r.stderr
    assert "up since" in r.stdout and "node-node0" in r.stdout

    r = runtime.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert any(n["alive"] for n in st["nodes"])

    r = runtime.cli("nodes")
    assert r.returncode == 0, r.stderr
    assert "node-node0" in r.stdout and "True" in r.stdout

    r = runtime.cli("calls", "--limit", "5")
    assert r.returncode == 0, r.stderr
    assert "STATUS" in r.stdout and "succeeded" in r.stdout

    r = runtime.cli("logs", "call-doesnotexist")
    assert r.returncode == 1 and "error" in r.stderr


# -- the node daemon dies; the dispatcher carries on (keep this last: it kills containers) ----------
def test_dispatcher_survives_node_restart(runtime, deployed):
    assert square.remote(8) == 64
    old_cid = square.last_call.info["container_id"]
    assert old_cid in {c["id"] for c in runtime.containers()}
    node = runtime.node_process()
    assert node is not None, runtime.log_tail()
    old_pid = node.pid
    node.kill()                                        # SIGKILL: no cleanup of its own
    node.wait(timeout=10)
    # right away: the first attempt finds the node gone, retries=1 carries the call over
    # to the restarted node (the dispatcher waits for it to register)
    t = time.monotonic()
    assert square.remote(10) == 100
    assert time.monotonic() - t < 30

    deadline = time.monotonic() + 30
    new = None
    while time.monotonic() < deadline:
        new = runtime.node_process()
        if new is not None and new.pid != old_pid and _node_healthy(runtime):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the node was not restarted within 30 s:\n{runtime.log_tail()}")

    # a call with retries=0 succeeds once the node is back
    assert add_offset.remote(2) == 1002
    assert square.remote(9) == 81
    # the restarted node removed the orphaned container of its predecessor
    assert old_cid not in {c["id"] for c in runtime.containers()}
    assert old_cid not in runtime.runc_ids()


def _node_healthy(runtime) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", runtime.node_port, timeout=2)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False
