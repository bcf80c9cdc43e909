"""The errors users of runtimed see, in one closed hierarchy.

    Error
    ├── InvalidError            bad arguments, bad request, unpicklable objects
    ├── AuthError               missing or wrong API token
    ├── NotFoundError           unknown app, function, call, image, snapshot
    ├── ImageBuildError         an Image step failed (exit code + log tail)
    ├── ExecutionError          the runtime could not run the call
    │   ├── OOMError            the container hit its memory limit
    │   ├── FunctionTimeoutError  the call ran past its timeout
    │   ├── ContainerCrashError the container died without a result
    │   └── NodeUnavailableError no node can take the call now
    ├── SnapshotError           a snapshot could not be taken or restored
    ├── RemoteError             a user exception whose type is not importable here
    └── TimeoutError (builtin subclass)  FunctionCall.get(timeout) ran out

Each error maps to one HTTP status and a stable `code`; the dispatcher sends
`{"error": {"code", "message", ...}}` and the client re-raises the same class.
"""
from __future__ import annotations

import builtins
from collections.abc import Mapping
from types import MappingProxyType


class Error(Exception):
    """Base of every runtimed error."""

    code = "error"
    http_status = 500
    # more fields on the wire (e.g. who preempted a GPU call); read-only unless set
    details: Mapping[str, object] = MappingProxyType({})

    def to_wire(self) -> dict:
        return {**self.details, "code": self.code, "message": str(self)}


class InvalidError(Error):
    code, http_status = "invalid", 400


class AuthError(Error):
    code, http_status = "unauthenticated", 401


class NotFoundError(Error):
    code, http_status = "not_found", 404


class ImageBuildError(Error):
    code, http_status = "image_build_failed", 422

    def __init__(self, message: str, *, step: str = "", exit_code: int | None = None,
                 log_tail: str = ""):
        super().__init__(message)
        self.step, self.exit_code, self.log_tail = step, exit_code, log_tail

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n--- last lines of the step's output ---\n{self.log_tail}" if self.log_tail else base

    def to_wire(self) -> dict:
        return {"code": self.code, "message": Exception.__str__(self), "step": self.step,
                "exit_code": self.exit_code, "log_tail": self.log_tail}


class ExecutionError(Error):
    code, http_status = "execution_failed", 500


class OOMError(ExecutionError):
    code = "oom"


class FunctionTimeoutError(ExecutionError, builtins.TimeoutError):
    code = "function_timeout"


class ContainerCrashError(ExecutionError):
    code = "container_crashed"


class NodeUnavailableError(ExecutionError):
    code, http_status = "node_unavailable", 503


class SnapshotError(Error):
    code = "snapshot_failed"


class RemoteError(Error):
    """A remote exception whose class could not be imported or rebuilt locally."""

    code = "remote_error"


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - mirrors modal.exception
    """`FunctionCall.get(timeout=...)` ran out before the call finished."""

    code, http_status = "timeout", 408


class OverloadedError(Error):
    code, http_status = "overloaded", 429


_BY_CODE = {cls.code: cls for cls in (
    Error, InvalidError, AuthError, NotFoundError, ImageBuildError, ExecutionError, OOMError,
    FunctionTimeoutError, ContainerCrashError, NodeUnavailableError, SnapshotError,
    RemoteError, TimeoutError, OverloadedError)}


def from_wire(err: dict) -> Error:
    """Rebuild the error the server sent (`{"code", "message", ...}`)."""
    cls = _BY_CODE.get(err.get("code", ""), Error)
    msg = err.get("message", "unknown error")
    if cls is ImageBuildError:
        return ImageBuildError(msg, step=err.get("step", ""), exit_code=err.get("exit_code"),
                               log_tail=err.get("log_tail", ""))
    e = cls(msg)
    # A server-side subclass this client has no class for (cuda_restore's
    # gpu_preempted) keeps its code and fields, so relaying it does not lose them.
    if err.get("code") and err["code"] != e.code:
        e.code = err["code"]
    extra = {k: v for k, v in err.items() if k not in ("code", "message")}
    if extra:
        e.details = extra
    return e
