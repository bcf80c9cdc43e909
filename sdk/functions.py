"""`Function` (what `@app.function` returns) and `FunctionCall` (what `.spawn` returns)."""
from __future__ import annotations

import base64
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import cloudpickle

from .client import Client, default_client
from .exception import InvalidError, TimeoutError, from_wire
from .serialization import dumps_args, rebuild_exception

if TYPE_CHECKING:
    from .app import App

LONG_POLL = 50.0


def _print_logs(logs: list[dict]) -> int:
    last = -1
    for entry in logs:
        out = sys.stderr if entry.get("stream") == "stderr" else sys.stdout
        out.write(entry.get("text", ""))
        last = entry["seq"]
    if logs:
        sys.stdout.flush()
    return last


def _outcome(state: dict) -> Any:
    """The call's return value, or raise what it raised / why it failed."""
    res = state.get("result") or {}
    status = state["status"]
    if status == "succeeded":
        return cloudpickle.loads(base64.b64decode(res.get("payload_b64", "")))
    if "exc_type" in res:
        raise rebuild_exception(res, base64.b64decode(res.get("payload_b64") or ""))
    raise from_wire(res.get("error") or {"code": "error", "message": f"call {status}"})


class FunctionCall:
    """A handle on a spawned call: `.get(timeout)`, `.cancel()`, `.object_id`."""

    def __init__(self, call_id: str, client: Client | None = None):
        self.object_id = call_id
        self._client = client or default_client()
        self._logs_after = -1
        self.last_state: dict | None = None

    @classmethod
    def from_id(cls, call_id: str) -> "FunctionCall":
        return cls(call_id)

    def _poll(self, wait: float) -> dict:
        state = self._client.json(
            "GET", f"/v1/calls/{self.object_id}?wait={wait:.3f}&logs_after={self._logs_after}")
        self._logs_after = max(self._logs_after, _print_logs(state.get("logs", [])))
        self.last_state = state
        return state

    def get(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL if deadline is None else max(0.0, min(LONG_POLL, deadline - time.monotonic()))
            state = self._poll(left)
            if state["status"] in ("succeeded", "failed", "cancelled"):
                return _outcome(state)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"call {self.object_id} did not finish within {timeout} s "
                                   f"(status: {state['status']})")

    def cancel(self) -> None:
        self.last_state = self._client.json("POST", f"/v1/calls/{self.object_id}/cancel", {})

    @property
    def info(self) -> dict:
        """Where and how the call ran: tier (warm/cold/...), node, container, phase spans."""
        state = self.last_state or self._poll(0)
        return {k: v for k, v in (state.get("result") or {}).items() if k != "payload_b64"}


class Function:
    """A function registered on an App. Call it with .remote/.local/.map/.starmap/.spawn."""

    def __init__(self, app: "App", raw_f, name: str, config: dict, image, *,
                 cls: type | None = None, method: str | None = None):
        self.app, self.raw_f, self.name = app, raw_f, name
        self.config, self.image = config, image
        self._cls, self._method = cls, method
        self.object_id: str | None = None       # set when the app hydrates it
        self.last_call: FunctionCall | None = None
        self.__doc__ = getattr(raw_f, "__doc__", None)
        self.__wrapped__ = raw_f

    # hydration is done by App.run; methods of a class share the class's function id
    def _id(self) -> str:
        if self.object_id is None:
            raise InvalidError(
                f"function {self.name!r} is not deployed: call it inside `with app.run():` "
                "(or `runtimectl run script.py::main`)")
        return self.object_id

    def local(self, *args, **kwargs):
        """Run in this process, like calling the undecorated function."""
        if self._cls is not None:
            obj = self._cls()
            for name in dir(self._cls):
                meta = getattr(getattr(self._cls, name, None), "_runtimed_enter", None)
                if meta is not None:
                    getattr(obj, name)()
            return getattr(obj, self._method)(*args, **kwargs)
        return self.raw_f(*args, **kwargs)

    def _submit(self, args: tuple, kwargs: dict, wait: float) -> dict:
        blob = dumps_args(args, kwargs, self._method)
        return self.app._client().json("POST", "/v1/calls", {
            "function_id": self._id(), "args_b64": base64.b64encode(blob).decode(), "wait": wait})

    def remote(self, *args, **kwargs):
        """Run in a container and return the result (re-raising a remote exception)."""
        self.last_call = None
        state = self._submit(args, kwargs, wait=LONG_POLL)
        fc = FunctionCall(state["call_id"], self.app._client())
        fc._logs_after = _print_logs(state.get("logs", []))
        fc.last_state = state
        self.last_call = fc
        if state["status"] in ("succeeded", "failed", "cancelled"):
            return _outcome(state)
        return fc.get()

    def spawn(self, *args, **kwargs) -> FunctionCall:
        state = self._submit(args, kwargs, wait=0)
        fc = FunctionCall(state["call_id"], self.app._client())
        self.last_call = fc
        return fc

    def map(self, *iterables: Iterable, order_outputs: bool = True,
            return_exceptions: bool = False) -> Iterator[Any]:
        return self._map_args([(a, {}) for a in zip(*iterables)], return_exceptions)

    def starmap(self, input_iterator: Iterable[tuple], kwargs: dict | None = None,
                order_outputs: bool = True, return_exceptions: bool = False) -> Iterator[Any]:
        return self._map_args([(tuple(a), dict(kwargs or {})) for a in input_iterator],
                              return_exceptions)

    def _map_args(self, inputs: list[tuple[tuple, dict]], return_exceptions: bool) -> Iterator[Any]:
        blobs = [base64.b64encode(dumps_args(a, k, self._method)).decode() for a, k in inputs]
        client = self.app._client()
        ids: list[str] = []
        for i in range(0, len(blobs), 500):
            ids += client.json("POST", "/v1/calls/batch", {
                "function_id": self._id(), "inputs": blobs[i:i + 500]})["call_ids"]

        def gen():
            for cid in ids:
                try:
                    yield FunctionCall(cid, client).get()
                except Exception as e:  # noqa: BLE001
                    if not return_exceptions:
                        raise
                    yield e
        return gen()

    def __call__(self, *args, **kwargs):
        return self.local(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Function {self.name} {self.object_id or '(not deployed)'}>"
