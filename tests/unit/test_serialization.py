"""sdk.serialization: unpicklable closures/arguments named, remote exceptions rebuilt."""
from __future__ import annotations

import pickle
import threading

import cloudpickle
import pytest

from sdk import InvalidError, RemoteError
from sdk.serialization import (RemoteTraceback, check_closure, check_globals, dumps_args,
                               dumps_function, rebuild_exception)

GLOBAL_LOCK = threading.Lock()
GLOBAL_OK = {"a": 1}


def test_closure_check_names_variable_and_type():
    the_lock = threading.Lock()
    fine = 3

    def f():
        return the_lock, fine

    with pytest.raises(InvalidError) as ei:
        check_closure(f, "my_fn")
    msg = str(ei.value)
    assert "'my_fn'" in msg
    assert "variable 'the_lock'" in msg
    assert "of type lock" in msg
    assert "cannot be pickled" in msg


def test_closure_check_passes_picklable_and_nested_functions():
    k = 5

    def helper(x):
        return x + k

    def f(x):
        return helper(x) * 2

    check_closure(f, "f")
    check_closure(lambda: 1, "no closure")
    assert cloudpickle.loads(dumps_function({"kind": "function", "fn": f}, "f", f))["fn"](1) == 12


def test_closure_check_skips_unassigned_cells():
    def outer():
        def inner():
            return later
        check_closure(inner, "inner")      # `later` is not bound yet: no error
        later = 1
        return inner
    assert outer()() == 1


def test_globals_check():
    def uses_lock():
        return GLOBAL_LOCK.locked()

    def uses_ok():
        return GLOBAL_OK["a"]

    with pytest.raises(InvalidError, match="global 'GLOBAL_LOCK' of type lock"):
        check_globals(uses_lock, "uses_lock")
    check_globals(uses_ok, "uses_ok")
    with pytest.raises(InvalidError, match="GLOBAL_LOCK"):
        dumps_function({"kind": "function", "fn": uses_lock}, "uses_lock", uses_lock)


def test_dumps_args_round_trip_and_errors():
    args, kwargs, method = cloudpickle.loads(dumps_args((1, "x"), {"k": [1, 2]}, "m"))
    assert (args, kwargs, method) == ((1, "x"), {"k": [1, 2]}, "m")
    with pytest.raises(InvalidError, match="argument 1 of type lock"):
        dumps_args((1, threading.Lock()), {})
    with pytest.raises(InvalidError, match="keyword argument 'cb' of type lock"):
        dumps_args((), {"cb": threading.Lock()})


class LocalOnlyError(Exception):
    pass


def _result(exc_type: str, exc_module: str, message: str, tb: str = "Traceback...\n") -> dict:
    return {"exc_type": exc_type, "exc_module": exc_module, "message": message,
            "traceback": tb, "tier": "cold", "container_id": "ctr-1"}


def test_rebuild_from_payload():
    exc = rebuild_exception(_result("ValueError", "builtins", "boom 42",
                                    'File "x.py", line 3, in square\nValueError: boom 42'),
                            cloudpickle.dumps(ValueError("boom 42")))
    assert type(exc) is ValueError and str(exc) == "boom 42"
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "in square" in str(exc.__cause__) and "remote traceback" in str(exc.__cause__)
    assert exc.__cause__.tb.endswith("ValueError: boom 42")
    assert any("tier=cold" in n and "ctr-1" in n for n in exc.__notes__)


def test_rebuild_custom_type_from_payload():
    exc = rebuild_exception(_result("LocalOnlyError", __name__, "x"),
                            cloudpickle.dumps(LocalOnlyError("x")))
    assert type(exc) is LocalOnlyError


def test_rebuild_importable_type_without_payload():
    exc = rebuild_exception(_result("KeyError", "builtins", "'k'"), b"")
    assert type(exc) is KeyError
    exc = rebuild_exception(_result("JSONDecodeError", "json.decoder", "bad"), b"")
    # a type whose constructor needs more arguments cannot be rebuilt: RemoteError instead
    assert isinstance(exc, RemoteError) and "json.decoder.JSONDecodeError: bad" in str(exc)


def test_rebuild_unimportable_type():
    # a payload that cannot be unpickled here (its module does not exist locally)
    payload = pickle.dumps(ValueError("x")).replace(b"builtins", b"nomodule")
    exc = rebuild_exception(_result("WeirdError", "somewhere.not.installed", "it broke",
                                    "Traceback\nWeirdError: it broke"), payload)
    assert isinstance(exc, RemoteError)
    assert "somewhere.not.installed.WeirdError: it broke" in str(exc)
    assert "WeirdError: it broke" in exc.__cause__.tb
    # not an exception class at all
    exc = rebuild_exception(_result("dumps", "json", "x"), b"")
    assert isinstance(exc, RemoteError)


def test_rebuild_ignores_a_payload_that_is_not_an_exception():
    exc = rebuild_exception(_result("ValueError", "builtins", "v"), cloudpickle.dumps([1, 2]))
    assert type(exc) is ValueError and str(exc) == "v"


def test_user_exception_type_survives_a_round_trip_through_another_interpreter(tmp_path,
                                                                                 monkeypatch):
    """What `except MyError:` around `.remote()` relies on: the user's module is pickled by
    value, the container (a fresh interpreter without that module) raises the class, and
    the exception that comes back must be *the same class object* as here."""
    import importlib
    import subprocess
    import sys
    import uuid

    name = f"usermod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "class MyError(Exception):\n    pass\n\n"
        "def fail(x):\n    raise MyError(f'mine {x}')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(name)
    blob = dumps_function({"kind": "function", "fn": mod.fail}, "fail", mod.fail)
    child = ("import sys, cloudpickle\n"
             "spec = cloudpickle.loads(sys.stdin.buffer.read())\n"
             "try:\n    spec['fn'](5)\n"
             "except BaseException as e:\n    sys.stdout.buffer.write(cloudpickle.dumps(e))\n")
    out = subprocess.run([sys.executable, "-c", child], input=blob, capture_output=True,
                         cwd="/", env={"PATH": "/usr/bin:/bin"}, check=True).stdout
    exc = rebuild_exception(_result("MyError", name, "mine 5"), out)
    assert type(exc) is mod.MyError
    assert str(exc) == "mine 5"
