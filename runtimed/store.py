"""The dispatcher's store: one contract (`Store`), two implementations, chosen by one
setting.

    RUNTIMED_BACKEND=sqlite   (default) SQLite file + an in-process queue: one dispatcher
                              process, zero services (`runtimed.backend_sqlite`)
    RUNTIMED_BACKEND=redis    Redis: every dispatcher replica sees the same functions,
                              images, layers, calls, logs and nodes, and they share one
                              call queue (a Stream with a consumer group)
                              (`runtimed.backend_redis`, RUNTIMED_REDIS_URL)

Blobs (function pickles, layer archives) are files in RUNTIMED_BLOB_DIR (default
$RUNTIMED_STATE/d/blobs). Replicas must share that directory; in production it is an
OCI registry or an object store behind the same content-addressed interface.

Delivery is at-least-once. A call is taken from the queue by one replica (a `Claim`)
and acknowledged only together with storing its result (`finish`). Whatever happens in
between -- the replica is killed, the node running the call dies -- the call is driven
again: by the restarted replica (SQLite: unfinished rows at start; Redis: its own
pending entries), or by another replica once the entry was idle for
RUNTIMED_RECLAIM_IDLE_S (Redis XAUTOCLAIM; a live replica keeps its entries fresh).
So a call whose side effects happened may run again: functions with side effects
should be idempotent (key them by `call_id`). A stored result is final: a second
`finish` of the same call is refused by the state machine and only acknowledges.

Call states (the same machine in both backends, see `metadata.TRANSITIONS`):
    queued -> running -> succeeded | failed | cancelled
    running -> queued      (retry, node lost, GPU preempted, call reclaimed from a dead
                            replica)
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sdk.exception import Error, InvalidError

from .metadata import TERMINAL, TRANSITIONS, InvalidCallTransition

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "BackendConfig",
    "Claim",
    "InvalidCallTransition",
    "NewCall",
    "Overloaded",
    "Store",
    "StoreUnavailableError",
    "open_store",
]

BACKENDS = ("sqlite", "redis")


class Overloaded(Exception):
    """`submit` refused: `unfinished` calls are already waiting (the bound is reached)."""

    def __init__(self, unfinished: int, bound: int):
        super().__init__(f"{unfinished} calls unfinished (bound {bound})")
        self.unfinished, self.bound = unfinished, bound


class StoreUnavailableError(Error):
    """The store (Redis) cannot be reached; the request can be retried."""

    code, http_status = "store_unavailable", 503


@dataclass(frozen=True)
class NewCall:
    call_id: str
    function_id: str
    args: bytes
    pin: str | None = None          # node id the call must run on (admin, benchmarks)


@dataclass(frozen=True)
class Claim:
    """A call taken from the queue by this dispatcher: drive it, then `finish` it (or
    `ack` it when it turns out to be finished already). `token` is the backend's handle
    on the queue entry (the Redis stream entry id)."""

    call_id: str
    function_id: str
    args: bytes
    pin: str | None = None
    token: str = ""


class Store(Protocol):
    """Metadata, call state, logs, node registry and the call queue of the dispatcher.

    All methods are coroutines and may raise one of `unavailable_errors` when the
    backing service is down. Records are plain dicts (JSON-able except the bytes
    fields `result_payload` and `Claim.args`)."""

    kind: str                                   # "sqlite" | "redis"
    replica: str                                # this dispatcher's name in the group
    unavailable_errors: tuple[type[BaseException], ...]

    async def open(self) -> None:
        """Connect, create what is missing. After `open`, `take` first returns the calls
        this replica left unfinished (restart) before anything new."""

    async def close(self) -> None: ...

    def set_callbacks(self, on_change: Callable[[str], None],
                      on_lost: Callable[[str], None]) -> None:
        """`on_change(call_id)`: another replica stored a result, a cancel or logs of the
        call (long-poll waiters re-read it). `on_lost(call_id)`: this replica no longer
        owns a claim it is driving (another replica reclaimed it); stop driving it."""

    # -- functions, images, layers (immutable, content-addressed records) ---------------
    async def put_function(self, fid: str, name: str, app: str, blob: str, image_id: str,
                           config: dict) -> None: ...
    async def get_function(self, fid: str) -> dict | None: ...
    async def function_by_name(self, name: str) -> dict | None:
        """The most recently registered function of that name."""
    async def put_image(self, iid: str, spec: dict, report: list) -> None: ...
    async def get_image(self, iid: str) -> dict | None: ...
    async def list_images(self) -> list[dict]:
        """Newest first: {id, built, report}."""
    async def put_layer(self, key: str, digest: str, size: int, raw_size: int,
                        extra: dict | None = None) -> None:
        """A layer's archive blob; `extra` says more about its blobs (its eStargz for lazy
        mounts: estargz_digest, toc_digest, estargz_size)."""
    async def layer_archives(self, keys: list[str]) -> dict[str, str]:
        """key -> archive blob digest, for the keys that have one."""
    async def layer_infos(self, keys: list[str]) -> dict[str, dict]:
        """key -> {digest, size, raw_size, **extra}, for the keys that have an archive."""
    async def list_layers(self) -> list[dict]: ...

    # -- calls --------------------------------------------------------------------------
    async def submit(self, calls: Sequence[NewCall], bound: int, take: int = 0) -> list[Claim]:
        """Store the calls as `queued` and put them on the queue, all or none. Refused
        with `Overloaded` when calls are unfinished and `unfinished + len(calls) > bound`
        (an empty system always admits a batch, so any batch makes progress). With
        `take`, up to that many queued calls (oldest first: these, unless others wait)
        are handed to this replica at once, as `take` would: the caller drives them."""
    async def get_call(self, cid: str) -> dict | None:
        """id, function_id, status, attempts, result (JSON text), result_payload,
        created, started, finished, node_id, tier, placement (JSON text), pin, events
        (JSON text: a list, e.g. preemptions, see preemption.py; None when none)."""
    async def set_status(self, cid: str, new: str, **fields) -> None:
        """A checked transition (InvalidCallTransition; KeyError for an unknown call).
        `started`/`finished` are stamped on entering running/a terminal state."""
    async def finish(self, claim: Claim, status: str, **fields) -> bool:
        """Store the terminal state and acknowledge the claim, atomically. False when the
        call was already terminal (cancelled, or finished by another replica): nothing
        is overwritten, the claim is acknowledged all the same."""
    async def ack(self, claim: Claim) -> None:
        """Acknowledge a claim without storing anything (the call was already terminal)."""
    async def release(self, claim: Claim) -> None:
        """Stop owning a claim without acknowledging it: it is driven again later."""
    async def start_attempt(self, cid: str, node_id: str, placement: str) -> int:
        """The call starts an attempt on `node_id`: queued -> running (or running ->
        running for a call taken over from a replica that stopped), attempts + 1,
        `started`, `node_id` and `placement` (JSON text) stored, in one step. Returns the
        attempt number; InvalidCallTransition when the call has ended, KeyError when
        it is unknown."""
    async def bump_attempts(self, cid: str, delta: int = 1) -> int: ...
    async def unfinished(self) -> int:
        """Calls queued or running (what backpressure bounds)."""
    async def list_calls(self, limit: int = 50) -> list[dict]:
        """Newest first, without args/result/result_payload."""

    # -- queue ---------------------------------------------------------------------------
    async def take(self, max_n: int, timeout: float) -> list[Claim]:
        """Up to `max_n` calls for this replica to drive; waits up to `timeout` s for one."""

    # -- logs ----------------------------------------------------------------------------
    async def append_logs(self, cid: str, entries: Sequence[tuple[str, str]]) -> None:
        """Append (stream, text) entries in order; their seq numbers follow the last."""
    async def logs(self, cid: str, after: int = -1) -> list[dict]:
        """{seq, stream, text} with seq > after, in order."""

    # -- nodes ---------------------------------------------------------------------------
    async def put_node(self, info: dict, must_exist: bool = False) -> bool:
        """Record a node's registration or heartbeat (`info` has node_id, url and a wall
        clock `seen`). With `must_exist`, only a known node is updated (False if not)."""
    async def list_nodes(self) -> list[dict]:
        """Every known node's last info, with `lost_at` where a dispatcher lost it."""
    async def mark_node_lost(self, node_id: str, at: float) -> None:
        """A dispatcher lost the connection to the node at `at`: treat it as dead until it
        heartbeats again (every replica)."""

    # -- counters ------------------------------------------------------------------------
    async def incr_stat(self, name: str, n: int = 1) -> None: ...
    async def stats(self) -> dict[str, int]: ...
    async def replicas(self) -> list[dict]:
        """The dispatcher replicas alive now (name, pid, url)."""


# -- configuration ----------------------------------------------------------------------------
def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise InvalidError(f"${name} must be a number") from None


@dataclass(frozen=True)
class BackendConfig:
    """The scale-out setting and its knobs (env, overridden by `runtimectl up` flags)."""

    kind: str = "sqlite"                              # RUNTIMED_BACKEND
    redis_url: str = "redis://127.0.0.1:6379/0"       # RUNTIMED_REDIS_URL
    redis_prefix: str = "rtd"                         # RUNTIMED_REDIS_PREFIX
    blob_dir: Path | None = None                      # RUNTIMED_BLOB_DIR
    replica: str | None = None                        # RUNTIMED_REPLICA (default host-port)
    max_pending: int = 10_000                         # RUNTIMED_MAX_PENDING: 429 above it
    reclaim_idle_s: float = 15.0                      # RUNTIMED_RECLAIM_IDLE_S
    result_ttl_s: float = 86_400.0                    # RUNTIMED_RESULT_TTL_S (Redis)

    @classmethod
    def from_env(cls, **override) -> BackendConfig:
        env = os.environ
        cfg = cls(kind=env.get("RUNTIMED_BACKEND", "sqlite").strip().lower() or "sqlite",
                  redis_url=env.get("RUNTIMED_REDIS_URL", cls.redis_url),
                  redis_prefix=env.get("RUNTIMED_REDIS_PREFIX", cls.redis_prefix),
                  blob_dir=Path(env["RUNTIMED_BLOB_DIR"]) if env.get("RUNTIMED_BLOB_DIR")
                  else None,
                  replica=env.get("RUNTIMED_REPLICA") or None,
                  max_pending=int(_env_float("RUNTIMED_MAX_PENDING", cls.max_pending)),
                  reclaim_idle_s=_env_float("RUNTIMED_RECLAIM_IDLE_S", cls.reclaim_idle_s),
                  result_ttl_s=_env_float("RUNTIMED_RESULT_TTL_S", cls.result_ttl_s))
        cfg = cls(**{**cfg.__dict__, **{k: v for k, v in override.items() if v is not None}})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for ok, msg in (
            (self.kind in BACKENDS, (f"backend must be one of {', '.join(BACKENDS)}, "
                                     f"not {self.kind!r} (RUNTIMED_BACKEND / --backend)")),
            (self.kind != "redis" or self.redis_url.startswith(("redis://", "unix://",
                                                                "rediss://")),
             f"the Redis URL must be redis://host:port/db, not {self.redis_url!r}"),
            (self.max_pending >= 1, "RUNTIMED_MAX_PENDING must be at least 1"),
            (self.reclaim_idle_s >= 1, "RUNTIMED_RECLAIM_IDLE_S must be at least 1 s"),
            (self.result_ttl_s >= 60, "RUNTIMED_RESULT_TTL_S must be at least 60 s"),
        ):
            if not ok:
                raise InvalidError(msg)

    def replica_name(self, port: int) -> str:
        return self.replica or f"{socket.gethostname().split('.')[0]}-{port}"


def open_store(cfg: BackendConfig, dispatcher_dir: Path, replica: str) -> Store:
    """The store `cfg` selects (not yet opened)."""
    if cfg.kind == "redis":
        try:
            from .backend_redis import RedisStore
        except ImportError as e:
            raise InvalidError(f"the redis backend needs the redis Python client ({e}): "
                               "pip install redis, or use the sqlite backend") from None
        return RedisStore(cfg.redis_url, replica, prefix=cfg.redis_prefix,
                          reclaim_idle_s=cfg.reclaim_idle_s, result_ttl_s=cfg.result_ttl_s)
    from .backend_sqlite import SqliteStore
    return SqliteStore(dispatcher_dir / "meta.db", replica)
