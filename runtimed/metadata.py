"""Dispatcher metadata in SQLite (the embedded default): functions, images, layers, calls, logs.
Synchronous and single-process; `backend_sqlite.SqliteStore` adapts it to the `Store`
contract (store.py) that the Redis backend implements too.

Call states:  queued -> running -> succeeded | failed | cancelled
              running -> queued   (node lost or retry; at-least-once)
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
  id TEXT PRIMARY KEY, name TEXT, app TEXT, blob TEXT, image_id TEXT, config TEXT, created REAL);
CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, spec TEXT, built REAL, report TEXT);
CREATE TABLE IF NOT EXISTS layers (key TEXT PRIMARY KEY, digest TEXT, size INTEGER, raw_size INTEGER,
  created REAL, extra TEXT);
CREATE TABLE IF NOT EXISTS calls (
  id TEXT PRIMARY KEY, function_id TEXT, status TEXT, attempts INTEGER DEFAULT 0,
  args BLOB, result TEXT, result_payload BLOB, created REAL, started REAL, finished REAL,
  node_id TEXT, tier TEXT, placement TEXT, pin TEXT, events TEXT);
CREATE INDEX IF NOT EXISTS calls_status ON calls(status);
CREATE TABLE IF NOT EXISTS logs (call_id TEXT, seq INTEGER, stream TEXT, text TEXT, ts REAL,
  PRIMARY KEY (call_id, seq));
"""

TERMINAL = ("succeeded", "failed", "cancelled")
TRANSITIONS = {
    "queued": {"running", "cancelled", "failed"},
    "running": {"succeeded", "failed", "queued", "cancelled"},
    "succeeded": set(), "failed": set(), "cancelled": set(),
}


class InvalidCallTransition(RuntimeError):
    pass


class Metadata:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(calls)")}
        for col in ("placement", "pin", "events"):      # older state dirs
            if col not in cols:
                self.db.execute(f"ALTER TABLE calls ADD COLUMN {col} TEXT")
        if "extra" not in {r[1] for r in self.db.execute("PRAGMA table_info(layers)")}:
            self.db.execute("ALTER TABLE layers ADD COLUMN extra TEXT")
        self.db.row_factory = sqlite3.Row

    # functions / images / layers
    def put_function(self, fid: str, name: str, app: str, blob: str, image_id: str,
                     config: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO functions VALUES (?,?,?,?,?,?,?)",
                        (fid, name, app, blob, image_id, json.dumps(config), time.time()))

    def get_function(self, fid: str) -> dict | None:
        r = self.db.execute("SELECT * FROM functions WHERE id=?", (fid,)).fetchone()
        if r is None:
            return None
        d = dict(r)
        d["config"] = json.loads(d["config"])
        return d

    def function_by_name(self, name: str) -> dict | None:
        r = self.db.execute("SELECT id FROM functions WHERE name=? ORDER BY created DESC LIMIT 1",
                            (name,)).fetchone()
        return self.get_function(r[0]) if r else None

    def put_image(self, iid: str, spec: dict, report: list) -> None:
        self.db.execute("INSERT OR REPLACE INTO images VALUES (?,?,?,?)",
                        (iid, json.dumps(spec), time.time(), json.dumps(report)))

    def get_image(self, iid: str) -> dict | None:
        r = self.db.execute("SELECT spec FROM images WHERE id=?", (iid,)).fetchone()
        return json.loads(r[0]) if r else None

    def list_images(self) -> list[dict]:
        return [{"id": r["id"], "built": r["built"], "report": json.loads(r["report"] or "[]")}
                for r in self.db.execute("SELECT * FROM images ORDER BY built DESC")]

    def put_layer(self, key: str, digest: str, size: int, raw_size: int,
                  extra: dict | None = None) -> None:
        """`extra`: more about the layer's blobs (e.g. its eStargz for lazy mounts)."""
        self.db.execute("INSERT OR REPLACE INTO layers (key, digest, size, raw_size, created, "
                        "extra) VALUES (?,?,?,?,?,?)", (key, digest, size, raw_size, time.time(),
                                                       json.dumps(extra or {})))

    def layer_infos(self, keys: list[str]) -> dict[str, dict]:
        """key -> {digest, size, raw_size, **extra} for the keys that have an archive."""
        if not keys:
            return {}
        q = ("SELECT key, digest, size, raw_size, extra FROM layers WHERE key IN (%s)"
             % ",".join("?" * len(keys)))
        return {r[0]: {**json.loads(r[4] or "{}"), "digest": r[1], "size": r[2],
                       "raw_size": r[3]} for r in self.db.execute(q, keys)}

    def layer_archives(self, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        q = "SELECT key, digest FROM layers WHERE key IN (%s)" % ",".join("?" * len(keys))
        return {r[0]: r[1] for r in self.db.execute(q, keys)}

    def list_layers(self) -> list[dict]:
        out = []
        for r in self.db.execute("SELECT * FROM layers ORDER BY created"):
            d = dict(r)
            d.update(json.loads(d.pop("extra", None) or "{}"))
            out.append(d)
        return out

    # calls
    def add_call(self, cid: str, fid: str, args: bytes, pin: str | None = None) -> None:
        self.add_calls([(cid, fid, args, pin)])

    def add_calls(self, calls: list[tuple[str, str, bytes, str | None]]) -> None:
        """Insert (id, function_id, args, pin) rows as queued, in one transaction."""
        now = time.time()
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT INTO calls (id, function_id, status, args, created, pin) "
                                "VALUES (?,?,?,?,?,?)",
                                [(cid, fid, "queued", args, now, pin)
                                 for cid, fid, args, pin in calls])
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get_call(self, cid: str) -> dict | None:
        r = self.db.execute("SELECT * FROM calls WHERE id=?", (cid,)).fetchone()
        return dict(r) if r else None

    def set_status(self, cid: str, new: str, **fields) -> None:
        cur = self.db.execute("SELECT status FROM calls WHERE id=?", (cid,)).fetchone()
        if cur is None:
            raise KeyError(cid)
        if new not in TRANSITIONS[cur[0]]:
            raise InvalidCallTransition(f"call {cid}: {cur[0]} -> {new}")
        fields["status"] = new
        if new == "running":
            fields.setdefault("started", time.time())
        if new in TERMINAL:
            fields.setdefault("finished", time.time())
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE calls SET {cols} WHERE id=?", (*fields.values(), cid))

    def start_attempt(self, cid: str, node_id: str, placement: str) -> int:
        """queued -> running (or running -> running: a call taken over after its dispatcher
        stopped), attempts + 1, in one statement; returns the attempt number."""
        r = self.db.execute("UPDATE calls SET status='running', attempts=attempts+1, started=?, "
                            "node_id=?, placement=? WHERE id=? AND status IN ('queued','running') "
                            "RETURNING attempts", (time.time(), node_id, placement, cid)).fetchone()
        if r is not None:
            return r[0]
        cur = self.db.execute("SELECT status FROM calls WHERE id=?", (cid,)).fetchone()
        if cur is None:
            raise KeyError(cid)
        raise InvalidCallTransition(f"call {cid}: {cur[0]} -> running")

    def bump_attempts(self, cid: str, delta: int = 1) -> int:
        self.db.execute("UPDATE calls SET attempts=attempts+? WHERE id=?", (delta, cid))
        return self.db.execute("SELECT attempts FROM calls WHERE id=?", (cid,)).fetchone()[0]

    def count_unfinished(self) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM calls WHERE status IN ('queued','running')").fetchone()[0]

    def unfinished_calls(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT id FROM calls WHERE status IN ('queued','running') ORDER BY created")]

    def list_calls(self, limit: int = 50) -> list[dict]:
        rows = self.db.execute("SELECT id, function_id, status, attempts, created, started, "
                               "finished, node_id, tier, placement, pin, events FROM calls "
                               "ORDER BY created "
                               "DESC LIMIT ?",
                               (limit,))
        return [dict(r) for r in rows]

    # logs
    def add_log(self, cid: str, seq: int, stream: str, text: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO logs VALUES (?,?,?,?,?)",
                        (cid, seq, stream, text, time.time()))

    def logs(self, cid: str, after: int = -1) -> list[dict]:
        return [dict(r) for r in self.db.execute(
            "SELECT seq, stream, text FROM logs WHERE call_id=? AND seq>? ORDER BY seq",
            (cid, after))]

    def append_logs(self, cid: str, entries: list[tuple[str, str]], first_seq: int) -> None:
        now = time.time()
        self.db.executemany("INSERT OR REPLACE INTO logs VALUES (?,?,?,?,?)",
                            [(cid, first_seq + i, stream, text, now)
                             for i, (stream, text) in enumerate(entries)])

    def next_log_seq(self, cid: str) -> int:
        r = self.db.execute("SELECT MAX(seq) FROM logs WHERE call_id=?", (cid,)).fetchone()
        return (r[0] + 1) if r and r[0] is not None else 0
