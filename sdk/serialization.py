"""Shipping functions and values with cloudpickle, and bringing remote exceptions home."""
from __future__ import annotations

import hashlib
import importlib
import threading
import inspect
import sys
import sysconfig
import types

import cloudpickle

from .exception import InvalidError, RemoteError

_STDLIB = sysconfig.get_paths()["stdlib"]
_PURELIB = sysconfig.get_paths()["purelib"]


def _is_users_module(mod: types.ModuleType) -> bool:
    """User code (not stdlib, not installed packages) is pickled by value: the
    container does not have the user's files."""
    f = getattr(mod, "__file__", None)
    if mod.__name__ == "__main__" or f is None:
        return False            # __main__ is pickled by value by cloudpickle already
    return not (f.startswith(_STDLIB) or f.startswith(_PURELIB) or "site-packages" in f
                or mod.__name__.split(".")[0] in ("sdk", "runtimed", "snapshot", "lazyfs",
                                                  "cuda_restore"))


def register_by_value(obj) -> None:
    mod = sys.modules.get(getattr(obj, "__module__", "") or "")
    if mod is not None and _is_users_module(mod):
        try:
            cloudpickle.register_pickle_by_value(mod)
        except ValueError:
            pass


def _try(value) -> Exception | None:
    try:
        cloudpickle.dumps(value)
    except Exception as e:  # noqa: BLE001 - anything unpicklable
        return e
    return None


def check_closure(fn, fn_name: str) -> None:
    """Raise InvalidError naming the closure variable that cannot be pickled."""
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return
    for name, cell in zip(code.co_freevars, fn.__closure__):
        try:
            value = cell.cell_contents
        except ValueError:
            continue            # not yet assigned: checked again at call time
        err = _try(value)
        if err is not None:
            raise InvalidError(
                f"function {fn_name!r} closes over variable {name!r} of type "
                f"{type(value).__qualname__}, which cannot be pickled: {err}")


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def check_globals(fn, fn_name: str) -> None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    g = getattr(fn, "__globals__", {})
    for name in sorted(_global_names(code)):
        if name in g and not isinstance(g[name], types.ModuleType):
            value = g[name]
            if inspect.isfunction(value) or inspect.isclass(value):
                continue        # pickled by reference or by value recursively
            err = _try(value)
            if err is not None:
                raise InvalidError(
                    f"function {fn_name!r} uses global {name!r} of type "
                    f"{type(value).__qualname__}, which cannot be pickled: {err}")


_tracker_lock = threading.Lock()


def _stable_tracker_id(class_def) -> str:
    """cloudpickle tags each class pickled by value with a random uuid4; a stable tag
    (module, qualname and the bytecode of its methods) makes the function blob, and so
    the function id and its snapshot key, the same across deploys of unchanged code.
    The class is registered under the tag, as cloudpickle does with its own ids, so a
    user exception class that comes back from a container is the same class object."""
    cp = cloudpickle.cloudpickle
    with cp._DYNAMIC_CLASS_TRACKER_LOCK:
        existing = cp._DYNAMIC_CLASS_TRACKER_BY_CLASS.get(class_def)
        if existing is not None:
            return existing
        h = hashlib.sha256(f"{class_def.__module__}.{class_def.__qualname__}".encode())
        for name, attr in sorted(vars(class_def).items()):
            code = getattr(attr, "__code__", None)
            h.update(name.encode() + (code.co_code if code is not None else b""))
        tid = h.hexdigest()[:32]
        if cp._DYNAMIC_CLASS_TRACKER_BY_ID.get(tid, class_def) is not class_def:
            tid = cp.uuid.uuid4().hex          # a different class with the same tag
        cp._DYNAMIC_CLASS_TRACKER_BY_CLASS[class_def] = tid
        cp._DYNAMIC_CLASS_TRACKER_BY_ID[tid] = class_def
        return tid


def dumps_function(spec: dict, fn_name: str, fn) -> bytes:
    register_by_value(fn)
    check_closure(fn, fn_name)
    check_globals(fn, fn_name)
    cp = cloudpickle.cloudpickle
    with _tracker_lock:
        original = cp._get_or_create_tracker_id
        cp._get_or_create_tracker_id = _stable_tracker_id
        try:
            return cloudpickle.dumps(spec)
        except Exception as e:  # noqa: BLE001
            raise InvalidError(f"function {fn_name!r} cannot be pickled: {e}") from None
        finally:
            cp._get_or_create_tracker_id = original


def dumps_args(args: tuple, kwargs: dict, method: str | None = None) -> bytes:
    try:
        return cloudpickle.dumps((args, kwargs, method))
    except Exception:  # noqa: BLE001 - find the culprit for the message
        for i, a in enumerate(args):
            if (err := _try(a)) is not None:
                raise InvalidError(f"argument {i} of type {type(a).__qualname__} cannot be "
                                   f"pickled: {err}") from None
        for k, v in kwargs.items():
            if (err := _try(v)) is not None:
                raise InvalidError(f"keyword argument {k!r} of type {type(v).__qualname__} "
                                   f"cannot be pickled: {err}") from None
        raise


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as __cause__ of re-raised remote errors."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\n--- remote traceback ---\n{self.tb}"


def rebuild_exception(result: dict, payload: bytes) -> BaseException:
    """The user's exception, with its own type where we can import it here."""
    tb = result.get("traceback") or ""
    exc: BaseException | None = None
    if payload:
        try:
            exc = cloudpickle.loads(payload)
            if not isinstance(exc, BaseException):
                exc = None
        except Exception:  # noqa: BLE001 - the type may not exist locally
            exc = None
    if exc is None:
        mod, name = result.get("exc_module") or "", result.get("exc_type") or "Exception"
        try:
            cls = getattr(importlib.import_module(mod), name)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                exc = cls(result.get("message", ""))
        except Exception:  # noqa: BLE001
            exc = None
    if exc is None:
        exc = RemoteError(f"{result.get('exc_module')}.{result.get('exc_type')}: "
                          f"{result.get('message')}")
    exc.__cause__ = RemoteTraceback(tb)
    try:
        exc.add_note(f"(raised remotely; tier={result.get('tier')}, "
                     f"container={result.get('container_id')})")
    except Exception:  # noqa: BLE001
        pass
    return exc
