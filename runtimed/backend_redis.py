"""The scale-out backend: `Store` over Redis, shared by every dispatcher replica.

Keys (prefix P, default "rtd"; one Redis, not Redis Cluster: the scripts touch keys
they compute):

    P:fn:<id>  P:fn-name:<name>      function records (JSON), latest id per name
    P:img:<id>  P:images (zset)      image records (JSON), by build time
    P:layers (hash)                  layer key -> archive record (JSON)
    P:call:<id> (hash)               call state; expires RUNTIMED_RESULT_TTL_S after it ends
    P:calls (zset)                   every call by creation time (listing; trimmed)
    P:open (zset)                    unfinished calls (what backpressure counts)
    P:log:<id> (list)                log entries [stream, text]; seq = list index
    P:queue (stream)                 entries {cid, fid, args, pin}; group "dispatchers"
    P:nodes  P:nodes-lost (hash)     node id -> last heartbeat (JSON) / when it was lost
    P:stats (hash)                   counters (e.g. overloaded = 429 answers)
    P:replica:<name>  P:replicas     replica liveness key (TTL) and descriptions
    channel P:events                 "<replica>|<call id>" when a call ends or logs

The queue: `submit` adds the call hash and the stream entry in one script (with the
backpressure check). Each replica is one consumer of the group: XREADGROUP hands it
new entries; the entry stays in the consumer's pending list until `finish` stores the
result, XACKs and XDELs it in one script (so the stream only holds unfinished calls
and the call arguments live only there). A live replica re-claims its own pending
entries every RECLAIM_IDLE/5 s (XCLAIM JUSTID resets their idle time); any replica
XAUTOCLAIMs entries idle for longer than RECLAIM_IDLE -- those of a replica that
died -- and drives them again. A replica restarted under the same name (liveness key
expired or released) first re-reads its own pending entries. A replica that finds an
entry it drives now owned by another (it stalled longer than RECLAIM_IDLE) stops
driving it (`on_lost`). At-least-once: see store.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .metadata import TERMINAL, TRANSITIONS, InvalidCallTransition
from .store import Claim, NewCall, Overloaded, StoreUnavailableError

log = logging.getLogger("runtimed.redis")

GROUP = "dispatchers"
MAX_CALL_INDEX = 100_000          # calls kept listable in P:calls
REPLICA_TTL_S = 6                 # liveness key of a replica
REPLICA_BEAT_S = 2.0

_LUA_T = "{" + ", ".join(
    f"{k} = {{" + ", ".join(f"{v} = true" for v in sorted(vs)) + "}"
    for k, vs in TRANSITIONS.items()) + "}"
_LUA_TERMINAL = "{" + ", ".join(f"{s} = true" for s in TERMINAL) + "}"

# KEYS: open, calls, queue.  ARGV: prefix, bound, now, n, consumer, take, then
# (cid, fid, args, pin) * n.  Returns {0, unfinished} (refused) or {1, unfinished,
# entries handed to `consumer` (XREADGROUP reply) or false}.
SUBMIT = f"""
local open = redis.call('ZCARD', KEYS[1])
local bound = tonumber(ARGV[2])
local n = tonumber(ARGV[4])
if open > 0 and open + n > bound then return {{0, open}} end
local now = ARGV[3]
for i = 0, n - 1 do
  local b = 7 + i * 4
  local cid = ARGV[b]
  redis.call('HSET', ARGV[1] .. 'call:' .. cid, 'id', cid, 'function_id', ARGV[b + 1],
             'status', 'queued', 'attempts', 0, 'created', now, 'pin', ARGV[b + 3])
  redis.call('ZADD', KEYS[1], now, cid)
  redis.call('ZADD', KEYS[2], now, cid)
  redis.call('XADD', KEYS[3], '*', 'cid', cid, 'fid', ARGV[b + 1], 'args', ARGV[b + 2],
             'pin', ARGV[b + 3])
end
local total = redis.call('ZCARD', KEYS[2])
if total > {MAX_CALL_INDEX} then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, total - {MAX_CALL_INDEX} - 1)
end
local taken = false
if tonumber(ARGV[6]) > 0 then
  taken = redis.call('XREADGROUP', 'GROUP', '{GROUP}', ARGV[5], 'COUNT', ARGV[6],
                     'STREAMS', KEYS[3], '>')
end
return {{1, open + n, taken}}
"""

# KEYS: call, open, log, queue.  ARGV: cid, new, ttl, channel, origin, entry id ('' =
# none), mode ('set' | 'finish'), then field, value pairs.
TRANSITION = f"""
local T = {_LUA_T}
local TERMINAL = {_LUA_TERMINAL}
local function ack()
  if ARGV[6] ~= '' then
    redis.call('XACK', KEYS[4], '{GROUP}', ARGV[6])
    redis.call('XDEL', KEYS[4], ARGV[6])
  end
end
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then
  if ARGV[7] == 'finish' then ack() end
  return 'missing'
end
local new = ARGV[2]
if not T[cur] or not T[cur][new] then
  if ARGV[7] == 'finish' and TERMINAL[cur] then ack() end
  return 'invalid:' .. cur
end
local f = {{'status', new}}
for i = 8, #ARGV do f[#f + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(f))
if TERMINAL[new] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  ack()
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. '|' .. ARGV[1])
end
return 'ok'
"""

# KEYS: call.  ARGV: now, node id, placement
START = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, 'missing'} end
if cur ~= 'queued' and cur ~= 'running' then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[1], 'node_id', ARGV[2],
           'placement', ARGV[3])
return {redis.call('HINCRBY', KEYS[1], 'attempts', 1), 'running'}
"""

_INT = {"attempts"}
_FLOAT = {"created", "started", "finished"}
_LIST_FIELDS = ("id", "function_id", "status", "attempts", "created", "started", "finished",
                "node_id", "tier", "placement", "pin", "events")


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _call_record(raw: dict) -> dict:
    out: dict = {k: None for k in _LIST_FIELDS + ("result", "result_payload")}
    for k, v in raw.items():
        k = _s(k)
        if v is None:
            continue
        if k == "result_payload":
            out[k] = v
        elif k in _INT:
            out[k] = int(v)
        elif k in _FLOAT:
            out[k] = float(v) if v not in (b"", "") else None
        else:
            out[k] = _s(v)
    if not out.get("pin"):
        out["pin"] = None
    return out


def _field(v) -> bytes | str | int | float:
    if v is None:
        return ""
    if isinstance(v, (bytes, str, int, float)):
        return v
    return json.dumps(v)


class RedisStore:
    kind = "redis"
    unavailable_errors: tuple[type[BaseException], ...] = (RedisConnectionError,
                                                           RedisTimeoutError, OSError)

    def __init__(self, url: str, replica: str, *, prefix: str = "rtd",
                 reclaim_idle_s: float = 15.0, result_ttl_s: float = 86_400.0):
        self.url, self.replica, self.prefix = url, replica, prefix.rstrip(":")
        self.reclaim_idle_s, self.result_ttl_s = reclaim_idle_s, int(result_ttl_s)
        self.r: aioredis.Redis | None = None
        self._leases: dict[str, str] = {}          # stream entry id -> call id (we drive it)
        self._reclaimed: list[Claim] = []
        self._tasks: list[asyncio.Task] = []
        self._on_change: Callable[[str], None] = lambda cid: None
        self._on_lost: Callable[[str], None] = lambda cid: None
        self._token = secrets.token_hex(8)
        self._since = time.time()
        self._submit = self._transition = self._start = None
        self._closing = asyncio.Event()

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    @property
    def _r(self) -> aioredis.Redis:
        if self.r is None:
            raise RuntimeError("the store is not open")
        return self.r

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        self.r = aioredis.from_url(self.url, decode_responses=False,
                                   socket_connect_timeout=5, health_check_interval=30)
        r = self.r
        try:
            await r.ping()
        except self.unavailable_errors as e:
            raise StoreUnavailableError(f"cannot reach Redis at {self.url}: {e} (is "
                                        "redis-server running? RUNTIMED_REDIS_URL)") from None
        self._submit = r.register_script(SUBMIT)
        self._transition = r.register_script(TRANSITION)
        self._start = r.register_script(START)
        try:
            await r.xgroup_create(self.k("queue"), GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        await self._take_name()
        await self._own_pending()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(f()) for f in (
            self._beat_loop, self._refresh_loop, self._reclaim_loop, self._listen_loop)]

    async def _take_name(self) -> None:
        """Own the replica name (its pending entries are ours). A name still held by a
        live replica is waited for one TTL (a restart after kill -9), then suffixed."""
        deadline = time.monotonic() + REPLICA_TTL_S + 1
        base = self.replica
        while not await self._r.set(self.k("replica", self.replica), self._token, nx=True,
                                    ex=REPLICA_TTL_S):
            if time.monotonic() > deadline:
                self.replica = f"{base}-{self._token[:6]}"
                log.warning("replica name %s is taken by a live dispatcher; using %s",
                            base, self.replica)
                continue
            await asyncio.sleep(0.25)
        await self._r.hset(self.k("replicas"), self.replica, json.dumps(
            {"name": self.replica, "pid": os.getpid(), "since": self._since}))
        log.info("replica %s joined group %s on %s", self.replica, GROUP, self.url)

    async def _own_pending(self) -> None:
        """Entries this replica (by name) took and never acknowledged: a restart."""
        r, q, cursor, n = self._r, self.k("queue"), "0", 0
        while True:
            res = await r.xreadgroup(GROUP, self.replica, {q: cursor}, count=500)
            entries = res[0][1] if res else []
            if not entries:
                break
            for eid, fields in entries:
                cursor = eid = _s(eid)
                claim = self._claim(eid, fields)
                if claim is None:
                    await r.xack(q, GROUP, eid)            # deleted meanwhile
                else:
                    self._reclaimed.append(claim)
                    n += 1
        if n:
            log.info("replica %s left %d calls unfinished: driving them again", self.replica, n)

    async def close(self) -> None:
        # Loops also watch `_closing`: Python 3.11's wait_for (inside redis-py) can swallow
        # a cancellation that arrives as a command completes.
        self._closing.set()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.r is not None:
            try:
                key = self.k("replica", self.replica)
                if await self.r.get(key) == self._token.encode():
                    await self.r.delete(key)        # a restart may take the name at once
                await self.r.hdel(self.k("replicas"), self.replica)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            await self.r.aclose()
            self.r = None

    def set_callbacks(self, on_change: Callable[[str], None],
                      on_lost: Callable[[str], None]) -> None:
        self._on_change, self._on_lost = on_change, on_lost

    # -- background ------------------------------------------------------------------------
    async def _forever(self, what: str, every: float, step) -> None:
        while not self._closing.is_set():
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis may come back
                if self._closing.is_set():
                    return
                log.warning("%s: %s", what, e)
            try:
                await asyncio.wait_for(self._closing.wait(), every)
            except TimeoutError:
                pass

    async def _beat_loop(self) -> None:
        async def beat():
            await self._r.set(self.k("replica", self.replica), self._token, ex=REPLICA_TTL_S)
        await self._forever("replica heartbeat", REPLICA_BEAT_S, beat)

    async def _refresh_loop(self) -> None:
        await self._forever("refreshing claims", max(0.5, self.reclaim_idle_s / 5),
                            self.refresh_claims)

    async def refresh_claims(self) -> None:
        """Keep the entries we drive from looking idle; drop those another took over."""
        ids = list(self._leases)
        if not ids:
            return
        pend = await self._r.xpending_range(self.k("queue"), GROUP, "-", "+",
                                            len(ids) + 1000, consumername=self.replica)
        owned = {_s(p["message_id"]) for p in pend}
        keep = []
        for i in ids:
            if i not in self._leases:
                continue                                   # finished meanwhile
            if i in owned:
                keep.append(i)
            else:
                cid = self._leases.pop(i)
                log.warning("call %s was reclaimed by another replica; not driving it here",
                            cid)
                self._on_lost(cid)
        for j in range(0, len(keep), 500):
            await self._r.xclaim(self.k("queue"), GROUP, self.replica, 0, keep[j:j + 500],
                                 justid=True)

    async def _reclaim_loop(self) -> None:
        await self._forever("reclaiming calls", max(0.5, self.reclaim_idle_s / 3),
                            self.reclaim)

    async def reclaim(self) -> int:
        """XAUTOCLAIM entries idle past the bound (their replica died); returns how many."""
        cursor, n = "0-0", 0
        while True:
            res = await self._r.xautoclaim(self.k("queue"), GROUP, self.replica,
                                           int(self.reclaim_idle_s * 1000), cursor, count=100)
            cursor, entries = _s(res[0]), res[1]
            deleted = res[2] if len(res) > 2 else []
            if deleted:
                await self._r.xack(self.k("queue"), GROUP, *deleted)
            for eid, fields in entries:
                eid = _s(eid)
                if eid in self._leases:
                    continue
                claim = self._claim(eid, fields)
                if claim is not None:
                    self._reclaimed.append(claim)
                    n += 1
            if cursor in ("0-0", "0"):
                break
        if n:
            log.warning("reclaimed %d calls from a replica that stopped", n)
        return n

    async def _listen_loop(self) -> None:
        channel = self.k("events").encode()
        while not self._closing.is_set():
            ps = self._r.pubsub(ignore_subscribe_messages=True)
            try:
                await ps.subscribe(channel)
                while not self._closing.is_set():
                    msg = await ps.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    origin, _, cid = _s(msg["data"]).partition("|")
                    if origin != self.replica:
                        self._on_change(cid)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                if self._closing.is_set():
                    return
                log.warning("event subscription: %s; resubscribing", e)
                await asyncio.sleep(1)
            finally:
                try:
                    await ps.aclose()
                except Exception:  # noqa: BLE001
                    pass

    # -- functions, images, layers ---------------------------------------------------------
    async def put_function(self, fid, name, app, blob, image_id, config) -> None:
        rec = {"id": fid, "name": name, "app": app, "blob": blob, "image_id": image_id,
               "config": config, "created": time.time()}
        async with self._r.pipeline(transaction=True) as p:
            p.set(self.k("fn", fid), json.dumps(rec))
            p.set(self.k("fn-name", name), fid)
            await p.execute()

    async def get_function(self, fid):
        raw = await self._r.get(self.k("fn", fid))
        return json.loads(raw) if raw else None

    async def function_by_name(self, name):
        fid = await self._r.get(self.k("fn-name", name))
        return await self.get_function(_s(fid)) if fid else None

    async def put_image(self, iid, spec, report) -> None:
        now = time.time()
        async with self._r.pipeline(transaction=True) as p:
            p.set(self.k("img", iid), json.dumps({"id": iid, "spec": spec, "built": now,
                                                   "report": report}))
            p.zadd(self.k("images"), {iid: now})
            await p.execute()

    async def get_image(self, iid):
        raw = await self._r.get(self.k("img", iid))
        return json.loads(raw)["spec"] if raw else None

    async def list_images(self):
        ids = await self._r.zrevrange(self.k("images"), 0, -1)
        if not ids:
            return []
        raws = await self._r.mget([self.k("img", _s(i)) for i in ids])
        return [{k: v for k, v in json.loads(r).items() if k != "spec"} for r in raws if r]

    async def put_layer(self, key, digest, size, raw_size, extra=None) -> None:
        await self._r.hset(self.k("layers"), key, json.dumps(
            {**(extra or {}), "key": key, "digest": digest, "size": size,
             "raw_size": raw_size, "created": time.time()}))

    async def layer_archives(self, keys):
        return {k: v["digest"] for k, v in (await self.layer_infos(keys)).items()}

    async def layer_infos(self, keys):
        if not keys:
            return {}
        vals = await self._r.hmget(self.k("layers"), keys)
        out = {}
        for k, v in zip(keys, vals):
            if v:
                rec = json.loads(v)
                rec.pop("key", None)
                rec.pop("created", None)
                out[k] = rec
        return out

    async def list_layers(self):
        rows = [json.loads(v) for v in (await self._r.hgetall(self.k("layers"))).values()]
        return sorted(rows, key=lambda r: r["created"])

    # -- calls -----------------------------------------------------------------------------
    async def submit(self, calls: Sequence[NewCall], bound: int, take: int = 0) -> list[Claim]:
        argv: list = [self.k(""), bound, repr(time.time()), len(calls), self.replica, take]
        for c in calls:
            argv += [c.call_id, c.function_id, c.args, c.pin or ""]
        res = await self._submit(keys=[self.k("open"), self.k("calls"), self.k("queue")],
                                 args=argv)
        if not res[0]:
            raise Overloaded(int(res[1]), bound)
        out = []
        for _stream, entries in (res[2] or []):
            for eid, flat in entries:
                claim = self._claim(_s(eid), dict(zip(flat[::2], flat[1::2])))
                if claim is not None:
                    out.append(claim)
        return out

    async def get_call(self, cid):
        raw = await self._r.hgetall(self.k("call", cid))
        return _call_record(raw) if raw else None

    async def _run_transition(self, cid: str, new: str, token: str, mode: str,
                              fields: dict) -> str:
        now = time.time()
        if new == "running":
            fields.setdefault("started", now)
        if new in TERMINAL:
            fields.setdefault("finished", now)
        argv: list = [cid, new, self.result_ttl_s, self.k("events"), self.replica, token, mode]
        for k, v in fields.items():
            argv += [k, _field(v)]
        res = await self._transition(
            keys=[self.k("call", cid), self.k("open"), self.k("log", cid), self.k("queue")],
            args=argv)
        return _s(res)

    async def set_status(self, cid: str, new: str, **fields) -> None:
        res = await self._run_transition(cid, new, "", "set", fields)
        if res == "missing":
            raise KeyError(cid)
        if res.startswith("invalid:"):
            raise InvalidCallTransition(f"call {cid}: {res[8:]} -> {new}")

    async def finish(self, claim: Claim, status: str, **fields) -> bool:
        # Not ours to refresh from here on (refresh_claims would see it acked and call it lost).
        self._leases.pop(claim.token, None)
        res = await self._run_transition(claim.call_id, status, claim.token, "finish", fields)
        if res == "missing":
            raise KeyError(claim.call_id)
        if res.startswith("invalid:"):
            if res[8:] not in TERMINAL:
                raise InvalidCallTransition(f"call {claim.call_id}: {res[8:]} -> {status}")
            return False
        return True

    async def ack(self, claim: Claim) -> None:
        self._leases.pop(claim.token, None)
        if claim.token:
            async with self._r.pipeline(transaction=True) as p:
                p.xack(self.k("queue"), GROUP, claim.token)
                p.xdel(self.k("queue"), claim.token)
                await p.execute()

    async def release(self, claim: Claim) -> None:
        self._leases.pop(claim.token, None)    # idle from now on: reclaimed after the bound

    async def start_attempt(self, cid: str, node_id: str, placement: str) -> int:
        n, cur = await self._start(keys=[self.k("call", cid)],
                                   args=[repr(time.time()), node_id, placement])
        if not n:
            if _s(cur) == "missing":
                raise KeyError(cid)
            raise InvalidCallTransition(f"call {cid}: {_s(cur)} -> running")
        return int(n)

    async def bump_attempts(self, cid: str, delta: int = 1) -> int:
        return int(await self._r.hincrby(self.k("call", cid), "attempts", delta))

    async def unfinished(self) -> int:
        return int(await self._r.zcard(self.k("open")))

    async def list_calls(self, limit: int = 50):
        cids = await self._r.zrevrange(self.k("calls"), 0, max(0, limit - 1))
        if not cids:
            return []
        async with self._r.pipeline(transaction=False) as p:
            for cid in cids:
                p.hmget(self.k("call", _s(cid)), *_LIST_FIELDS)
            rows = await p.execute()
        out, gone = [], []
        for cid, vals in zip(cids, rows):
            if vals[0] is None:
                gone.append(cid)
                continue
            rec = _call_record(dict(zip(_LIST_FIELDS, vals)))
            out.append({k: rec[k] for k in _LIST_FIELDS})
        if gone:
            await self._r.zrem(self.k("calls"), *gone)      # results that expired
        return out

    # -- queue -----------------------------------------------------------------------------
    def _claim(self, eid: str, fields: dict | None) -> Claim | None:
        if not fields:
            return None                                    # deleted entry
        f = {_s(k): v for k, v in fields.items()}
        claim = Claim(_s(f["cid"]), _s(f["fid"]), f.get("args") or b"",
                      _s(f.get("pin") or b"") or None, token=eid)
        self._leases[eid] = claim.call_id
        return claim

    async def take(self, max_n: int, timeout: float) -> list[Claim]:
        r, q = self._r, self.k("queue")
        out: list[Claim] = []
        while self._reclaimed and len(out) < max_n:
            out.append(self._reclaimed.pop(0))
        if out:
            return out
        res = await r.xreadgroup(GROUP, self.replica, {q: ">"}, count=max_n,
                                 block=max(1, int(timeout * 1000)))
        for eid, fields in (res[0][1] if res else []):
            claim = self._claim(_s(eid), fields)
            if claim is not None:
                out.append(claim)
        return out

    # -- logs ------------------------------------------------------------------------------
    async def append_logs(self, cid: str, entries: Sequence[tuple[str, str]]) -> None:
        if not entries:
            return
        async with self._r.pipeline(transaction=False) as p:
            p.rpush(self.k("log", cid), *[json.dumps([s, t]) for s, t in entries])
            p.publish(self.k("events"), f"{self.replica}|{cid}")
            await p.execute()

    async def logs(self, cid: str, after: int = -1):
        start = max(0, after + 1)
        raw = await self._r.lrange(self.k("log", cid), start, -1)
        out = []
        for i, v in enumerate(raw):
            stream, text = json.loads(v)
            out.append({"seq": start + i, "stream": stream, "text": text})
        return out

    # -- nodes -----------------------------------------------------------------------------
    async def put_node(self, info: dict, must_exist: bool = False) -> bool:
        nid = info["node_id"]
        if must_exist and not await self._r.hexists(self.k("nodes"), nid):
            return False
        await self._r.hset(self.k("nodes"), nid, json.dumps(info))
        return True

    async def list_nodes(self) -> list[dict]:
        async with self._r.pipeline(transaction=False) as p:
            p.hgetall(self.k("nodes"))
            p.hgetall(self.k("nodes-lost"))
            nodes, lost = await p.execute()
        lost = {_s(k): float(v) for k, v in lost.items()}
        out = []
        for k, v in nodes.items():
            info = json.loads(v)
            info["lost_at"] = lost.get(_s(k), 0.0)
            out.append(info)
        return out

    async def mark_node_lost(self, node_id: str, at: float) -> None:
        await self._r.hset(self.k("nodes-lost"), node_id, repr(at))

    # -- counters --------------------------------------------------------------------------
    async def incr_stat(self, name: str, n: int = 1) -> None:
        await self._r.hincrby(self.k("stats"), name, n)

    async def stats(self) -> dict[str, int]:
        return {_s(k): int(v) for k, v in (await self._r.hgetall(self.k("stats"))).items()}

    async def replicas(self) -> list[dict]:
        raw = await self._r.hgetall(self.k("replicas"))
        recs = [json.loads(v) for v in raw.values()]
        if not recs:
            return []
        async with self._r.pipeline(transaction=False) as p:
            for rec in recs:
                p.exists(self.k("replica", rec["name"]))
            flags = await p.execute()
        return [rec for rec, ok in zip(recs, flags) if ok]
