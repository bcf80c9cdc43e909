"""The agent: PID 1 of every function container. Standard library + cloudpickle only.

It is started by the node daemon as `python3 -u /.runtimed/agent.py` with stdin
and stdout as pipes to the daemon (see protocol.py). On start it keeps a private
dup of stdout for frames and points fds 1 and 2 at the stderr pipe, so output of
subprocesses and C code cannot corrupt the frame stream; Python-level
`print()`/`sys.stderr` output is sent as `log` frames tagged with the call.

Conversation (daemon -> agent / agent -> daemon):
    init(payload=function blob)       -> ready(import_ms, enter_ms) | init_error
    call(call_id, payload=args)       -> log* , result(ok, ...)
    restored(seed)                    -> ready        (after a snapshot restore, issue 4)
    exit                              -> (process exits)
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

sys.path.insert(0, "/.runtimed/lib")       # our cloudpickle first: it must match the SDK's
sys.path.insert(1, "/.runtimed")

import cloudpickle  # noqa: E402
import protocol  # noqa: E402  (same file as runtimed/protocol.py, bind-mounted)

_out_fd = -1
_out_lock = threading.Lock()
_current_call: str | None = None


def send(op: str, payload: bytes = b"", **header) -> None:
    data = protocol.encode(op, payload, **header)
    with _out_lock:
        view = memoryview(data)
        while view:
            n = os.write(_out_fd, view)
            view = view[n:]


class CallStream:
    """sys.stdout/sys.stderr replacement: line-buffered `log` frames for the current call."""

    def __init__(self, name: str):
        self.name, self._buf, self._lock = name, [], threading.Lock()
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self._lock:
            self._buf.append(s)
            if "\n" in s or sum(map(len, self._buf)) > 8192:
                self._flush_locked()
        return len(s)

    def _flush_locked(self) -> None:
        if self._buf:
            text, self._buf = "".join(self._buf), []
            send("log", text.encode("utf-8", "replace"), stream=self.name, call_id=_current_call)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 2  # raw writes land on the stderr pipe, which the daemon also streams

    def writable(self) -> bool:
        return True


class Target:
    """What a function blob unpickles into: a plain function, or a class + its hooks."""

    def __init__(self, spec: dict):
        self.kind = spec.get("kind", "function")
        self.spec = spec
        self.instance = None
        self.enter_ms = 0.0
        if self.kind == "function":
            self.fn = spec["fn"]
        elif self.kind == "cls":
            cls = spec["cls"]
            self.instance = cls.__new__(cls)
            params = spec.get("params") or {}
            if hasattr(cls, "__runtimed_init__"):
                cls.__runtimed_init__(self.instance, **params)
            else:
                for k, v in params.items():
                    setattr(self.instance, k, v)
        else:
            raise ValueError(f"unknown function kind {self.kind!r}")

    def hooks(self, snap: bool) -> list:
        if self.instance is None:
            return []
        out = []
        for name in dir(type(self.instance)):
            attr = getattr(type(self.instance), name, None)
            meta = getattr(attr, "_runtimed_enter", None)
            if meta is not None and bool(meta.get("snap")) == snap:
                out.append(getattr(self.instance, name))
        return out

    def run_hooks(self, snap: bool) -> None:
        t0 = time.perf_counter()
        for hook in self.hooks(snap):
            hook()
        self.enter_ms += (time.perf_counter() - t0) * 1000

    def resolve(self, method: str | None):
        if self.kind == "function":
            return self.fn
        if not method:
            raise ValueError("a class function needs a method name")
        return getattr(self.instance, method)


def exception_header(exc: BaseException) -> tuple[dict, bytes]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = cloudpickle.dumps(exc)
    except Exception:
        blob = b""
    return {"ok": False, "exc_type": type(exc).__qualname__, "exc_module": type(exc).__module__,
            "message": str(exc), "traceback": tb}, blob


def reseed(seed: int) -> None:
    """Fresh entropy after a restore or fork: two restores must not share random streams."""
    import random

    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed(seed % (2**32))
        except Exception:
            pass


def apply_resume(frame: protocol.Frame) -> None:
    """After a checkpoint or a restore: fresh randomness and identity for this container."""
    reseed(int(frame.get("seed") or int.from_bytes(os.urandom(8), "little")))
    for k, v in (frame.get("env") or {}).items():
        os.environ[k] = v


class Zygote:
    """Fork tier: this process is a zygote (imports and hooks done); each call runs in a
    child forked from it, so calls share nothing but the pristine post-init state.

    One child is forked ahead of the next call (a spare, blocked on a pipe until it gets
    its call frame): fork() copies the page tables of the whole imported process (~2-8
    ms for numpy..pandas), and this way that is paid between calls, not in them. The
    zygote runs no user code after init, so a spare forked early is the same state as
    one forked on arrival. gc.freeze() first: the children's collections then skip the
    inherited objects instead of touching (copying) every page that holds one."""

    def __init__(self, target: Target):
        self.target = target
        self.spare: tuple[int, int] | None = None     # (pid, write end of its frame pipe)

    def fork_spare(self) -> None:
        import gc
        gc.freeze()
        r, w = os.pipe()
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                frame = protocol.read_frame_blocking(r)
                if frame is not None:
                    reseed(int.from_bytes(os.urandom(8), "little"))
                    handle_call(self.target, frame,
                                fork_ms=(time.perf_counter() - frame.get("t_arrived", 0)) * 1000)
            finally:
                os._exit(0)
        os.close(r)
        self.spare = (pid, w)

    def call(self, frame: protocol.Frame) -> None:
        t_arrived = time.perf_counter()        # CLOCK_MONOTONIC: comparable in the child
        if self.spare is None:
            self.fork_spare()
        pid, w = self.spare
        self.spare = None
        try:
            data = memoryview(protocol.encode(frame.op, frame.payload, **frame.header,
                                              t_arrived=t_arrived))
            while data:
                data = data[os.write(w, data):]
        except OSError:
            pass                               # the spare died: reported below
        finally:
            os.close(w)
        self.fork_spare()       # while this call runs: a back-to-back next call finds it
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:   # the child died before it could send its result
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            send("result", call_id=frame.get("call_id"), ok=False, exc_type="ContainerCrashError",
                 exc_module="sdk.exception", message=f"the forked call process died ({how})",
                 traceback="")


def handle_call(target: Target, frame: protocol.Frame, fork_ms: float | None = None) -> None:
    global _current_call
    _current_call = frame.get("call_id")
    try:
        loaded = cloudpickle.loads(frame.payload)
        args, kwargs = loaded[0], loaded[1]
        method = loaded[2] if len(loaded) > 2 and loaded[2] else frame.get("method")
        fn = target.resolve(method)
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        run_ms = (time.perf_counter() - t0) * 1000
        try:
            blob = cloudpickle.dumps(value)
        except Exception as e:
            raise TypeError(f"the function's return value of type {type(value).__name__} "
                            f"cannot be pickled: {e}") from None
        header, payload = {"ok": True, "run_ms": run_ms}, blob
        if fork_ms is not None:
            header["fork_ms"] = fork_ms
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        header, payload = exception_header(exc)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    send("result", payload, call_id=_current_call, **header)
    _current_call = None


def main() -> None:
    global _out_fd
    _out_fd = os.dup(1)
    os.set_inheritable(_out_fd, False)
    os.dup2(2, 1)
    sys.stdout, sys.stderr = CallStream("stdout"), CallStream("stderr")
    target: Target | None = None
    zygote: Zygote | None = None
    while True:
        frame = protocol.read_frame_blocking(0)
        if frame is None or frame.op == "exit":
            return
        if frame.op == "init":
            t0, c0 = time.perf_counter(), time.process_time()
            for k, v in (frame.get("env") or {}).items():
                os.environ[k] = v          # e.g. CUDA_VISIBLE_DEVICES, before user code runs
            try:
                if frame.get("workdir"):
                    sys.path.insert(0, frame.get("workdir"))
                spec = cloudpickle.loads(frame.payload)
                import_ms = (time.perf_counter() - t0) * 1000
                # CPU time of the imports: far below import_ms means they waited (for
                # I/O, e.g. a lazily mounted layer, or for a CPU)
                import_cpu_ms = (time.process_time() - c0) * 1000
                target = Target(spec)
                target.run_hooks(snap=True)
                if frame.get("snapshot"):
                    # The snapshot point: imports and snap hooks are done, nothing else
                    # runs until the daemon says resume. A restored agent wakes up here.
                    sys.stdout.flush(), sys.stderr.flush()
                    send("snap_point", import_ms=import_ms, enter_ms=target.enter_ms)
                    while True:
                        f = protocol.read_frame_blocking(0)
                        if f is None or f.op == "exit":
                            return
                        if f.op == "resume":
                            apply_resume(f)
                            break
                target.run_hooks(snap=False)
            except BaseException as exc:  # noqa: BLE001
                header, payload = exception_header(exc)
                sys.stdout.flush(), sys.stderr.flush()
                send("init_error", payload, **header)
                return
            send("ready", pid=os.getpid(), import_ms=import_ms, import_cpu_ms=import_cpu_ms,
                 enter_ms=target.enter_ms)
            if frame.get("fork"):              # fork tier: the first call's child is ready too
                zygote = Zygote(target)
                zygote.fork_spare()
        elif frame.op == "call" and target is not None:
            if frame.get("fork"):
                zygote = zygote or Zygote(target)
                zygote.call(frame)
            else:
                handle_call(target, frame)
        elif frame.op == "resume":
            # restored from a snapshot of an idle container (runtimectl snapshot create CTR)
            apply_resume(frame)
            send("ready", pid=os.getpid())
        else:
            send("result", call_id=frame.get("call_id"), ok=False, exc_type="ProtocolError",
                 exc_module="runtimed", message=f"unexpected op {frame.op!r}", traceback="")


if __name__ == "__main__":
    main()
