"""`App`, `@app.function`, `@app.cls` with `@enter`/`@method`, `@app.local_entrypoint`."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
from typing import Any, Callable

from .client import Client, default_client
from .exception import ImageBuildError, InvalidError, from_wire
from .functions import Function
from .image import Image
from .serialization import check_closure, dumps_function

_FUNCTION_OPTIONS = ("cpu", "memory", "gpu", "timeout", "retries", "min_containers",
                     "max_containers", "scaledown_window", "snapshot", "block_network",
                     "env", "fork", "restore_mode", "priority")


def enter(*, snap: bool = False):
    """Mark a method of an `@app.cls` to run when a container starts. With snap=True it
    runs before the snapshot is taken (once); without, after every start or restore."""
    def deco(f):
        f._runtimed_enter = {"snap": snap}
        return f
    return deco


def method():
    """Mark a method of an `@app.cls` as remotely callable."""
    def deco(f):
        f._runtimed_method = True
        return f
    return deco


def _config(cpu, memory, gpu, timeout, retries, min_containers, max_containers,
            scaledown_window, snapshot, block_network, env, fork, restore_mode=None,
            priority=0) -> dict:
    if isinstance(cpu, tuple):
        cpu, cpu_limit = cpu
    else:
        cpu_limit = 0.0
    if isinstance(memory, tuple):
        memory = memory[1]
    checks = [(cpu is None or cpu > 0, "cpu must be > 0"),
              (memory is None or int(memory) >= 16, "memory must be >= 16 MiB"),
              (timeout is None or timeout > 0, "timeout must be > 0 seconds"),
              (retries is None or 0 <= int(retries) <= 10, "retries must be 0..10"),
              (min_containers is None or int(min_containers) >= 0, "min_containers must be >= 0"),
              (restore_mode in (None, "auto", "eager", "lazy"),
               "restore_mode must be 'auto', 'eager' or 'lazy'")]
    for ok, msg in checks:
        if not ok:
            raise InvalidError(msg)
    priority = 0 if priority is None else priority
    if not isinstance(priority, int) or isinstance(priority, bool) \
            or not -1000 <= priority <= 1000:
        raise InvalidError(f"priority must be an integer in -1000..1000, not {priority!r}")
    if priority and gpu is None:
        raise InvalidError("priority= orders GPU calls (a call may preempt GPU calls of lower "
                           "priority); this function has no gpu=")
    if gpu is not None:
        from cuda_restore.request import parse_gpu_request
        parse_gpu_request(gpu)          # GpuRequestError (an InvalidError) names the problem
    return {"cpu": cpu or 0.125, "cpu_limit": cpu_limit or 0.0, "memory": int(memory or 128),
            "gpu": gpu, "timeout": float(timeout or 300), "retries": int(retries or 0),
            "min_containers": int(min_containers or 0), "max_containers": max_containers,
            "scaledown_window": float(scaledown_window or 60), "snapshot": bool(snapshot),
            "block_network": bool(block_network), "env": dict(env or {}), "fork": bool(fork),
            **({"restore_mode": restore_mode} if restore_mode not in (None, "auto") else {}),
            # only when set: the function id hashes the config, and 0 is the default
            **({"priority": priority} if priority else {})}


class App:
    def __init__(self, name: str | None = None, *, image: Image | None = None):
        self.name = name or "app"
        self.image = image
        self.registered_functions: dict[str, Function] = {}
        self._entrypoints: dict[str, Callable] = {}
        self._client_obj: Client | None = None
        self._running = False

    def _client(self) -> Client:
        return self._client_obj or default_client()

    # -- decorators -----------------------------------------------------------------------------
    def function(self, _f=None, *, image: Image | None = None, cpu: float | tuple | None = None,
                 memory: int | tuple | None = None, gpu: str | None = None,
                 timeout: float | None = None, retries: int | None = None,
                 min_containers: int | None = None, keep_warm: int | None = None,
                 max_containers: int | None = None, scaledown_window: float | None = None,
                 container_idle_timeout: float | None = None, snapshot: bool = False,
                 enable_memory_snapshot: bool = False, block_network: bool = False,
                 env: dict | None = None, fork: bool = False, name: str | None = None,
                 restore_mode: str | None = None, priority: int = 0):
        cfg = _config(cpu, memory, gpu, timeout, retries,
                      min_containers if min_containers is not None else keep_warm,
                      max_containers, scaledown_window or container_idle_timeout,
                      snapshot or enable_memory_snapshot, block_network, env, fork,
                      restore_mode, priority)

        def deco(f):
            if isinstance(f, Function):
                raise InvalidError("@app.function applied twice")
            if not callable(f) or inspect.isclass(f):
                raise InvalidError("@app.function decorates functions; use @app.cls for classes")
            fname = name or f.__qualname__
            check_closure(f, fname)
            fn = Function(self, f, fname, cfg, image or self.image or Image.debian_slim())
            self.registered_functions[fname] = fn
            return fn
        return deco(_f) if _f is not None else deco

    def cls(self, _c=None, *, image: Image | None = None, **options):
        snap = options.pop("enable_memory_snapshot", False) or options.pop("snapshot", False)
        keep = options.pop("keep_warm", None)
        idle = options.pop("container_idle_timeout", None)
        unknown = set(options) - set(_FUNCTION_OPTIONS)
        if unknown:
            raise InvalidError(f"unknown @app.cls options: {sorted(unknown)}")
        cfg = _config(options.get("cpu"), options.get("memory"), options.get("gpu"),
                      options.get("timeout"), options.get("retries"),
                      options.get("min_containers", keep), options.get("max_containers"),
                      options.get("scaledown_window", idle), snap, options.get("block_network"),
                      options.get("env"), options.get("fork", False),
                      options.get("restore_mode"), options.get("priority", 0))

        def deco(c):
            if not inspect.isclass(c):
                raise InvalidError("@app.cls decorates classes")
            methods = [n for n, v in vars(c).items() if getattr(v, "_runtimed_method", False)]
            if not methods:
                raise InvalidError(f"class {c.__name__} has no @method()")
            img = image or self.image or Image.debian_slim()
            fns = {m: Function(self, getattr(c, m), f"{c.__qualname__}.{m}", cfg, img,
                               cls=c, method=m) for m in methods}
            for fn in fns.values():
                self.registered_functions[fn.name] = fn
            return _ClsHandle(c, fns)
        return deco(_c) if _c is not None else deco

    def local_entrypoint(self, _f=None, *, name: str | None = None):
        def deco(f):
            self._entrypoints[name or f.__name__] = f
            return f
        return deco(_f) if _f is not None else deco

    # -- deployment ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def run(self, *, client: Client | None = None, show_progress: bool = True):
        """Build images, upload functions, and make `.remote()` work inside the block."""
        self._client_obj = client
        self.deploy(show_progress=show_progress)
        self._running = True
        try:
            yield self
        finally:
            self._running = False

    def deploy(self, show_progress: bool = True) -> dict[str, str]:
        built: dict[int, str] = {}
        groups: dict[Any, list[Function]] = {}
        for fn in self.registered_functions.values():
            # a class's methods share one container pool; each decorated function is its
            # own (the same raw function decorated twice with other options is two).
            groups.setdefault(fn._cls if fn._cls is not None else id(fn), []).append(fn)
        ids = {}
        for target, fns in groups.items():
            head = fns[0]
            if id(head.image) not in built:
                built[id(head.image)] = self._build_image(head.image, show_progress)
            image_id = built[id(head.image)]
            if head._cls is not None:
                spec = {"kind": "cls", "cls": head._cls}
            else:
                spec = {"kind": "function", "fn": head.raw_f}
            blob = dumps_function(spec, head.name, head.raw_f if head._cls is None else head._cls)
            digest = hashlib.sha256(blob).hexdigest()
            self._client().put_blob(digest, blob)
            name = head._cls.__qualname__ if head._cls is not None else head.name
            fid = self._client().json("POST", "/v1/functions", {
                "name": name, "app": self.name, "blob": digest, "image_id": image_id,
                "config": head.config})["function_id"]
            for fn in fns:
                fn.object_id = fid
                ids[fn.name] = fid
        return ids

    def _build_image(self, image: Image, show_progress: bool) -> str:
        client = self._client()
        for digest, data in image.file_blobs():
            client.put_blob(digest, data)
        steps = image.spec()["steps"]
        total = len(steps)
        image.last_build = []
        for ev in client.ndjson("/v1/images", image.spec()):
            kind = ev.get("type")
            if kind == "step" and show_progress and ev["status"] != "cached":
                print(f"[image] step {ev['index'] + 1}/{total} {ev['desc']}: {ev['status']}",
                      file=sys.stderr, flush=True)
            elif kind == "log" and show_progress:
                sys.stderr.write(ev.get("text", ""))
            elif kind == "done":
                image.last_build = ev.get("report", [])
                image.image_id = ev["image_id"]
                return ev["image_id"]
            elif kind == "error":
                err = from_wire(ev["error"])
                raise err
        raise ImageBuildError("the dispatcher closed the build stream without a result")


class _ClsHandle:
    """What `@app.cls` returns: instantiate it, then call `obj.method.remote(...)`."""

    def __init__(self, cls: type, fns: dict[str, Function]):
        self._cls, self._fns = cls, fns
        self.__doc__ = cls.__doc__

    def __call__(self, *args, **kwargs) -> "_ClsHandle":
        if args or kwargs:
            raise InvalidError("parametrized classes are not supported yet: use Model()")
        return self

    def __getattr__(self, name: str) -> Function:
        fns = self.__dict__.get("_fns", {})
        if name in fns:
            return fns[name]
        raise AttributeError(name)
