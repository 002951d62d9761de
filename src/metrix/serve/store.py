"""The service's durable store: collections, items, API keys, an audit log and a change feed, in SQLite (one
machine, the default) or PostgreSQL (several replicas sharing one store).

SQLite runs in WAL mode with ``synchronous=FULL``; PostgreSQL commits durably by default (``fsync``,
``synchronous_commit``). Either way a write is on disk when its ``COMMIT`` returns, so a write the service
acknowledges survives ``kill -9``. Every write is one transaction (an upsert of many items lands whole or not at
all) and appends to ``changes``, whose ``version`` grows in commit order (writers are serialised: SQLite's
``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so a replica that applies "every change after version v" never
skips one. The in-memory search indexes are derived from this store; the store is the truth.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('collection', 'gallery')),
    metric TEXT NOT NULL,
    dim INTEGER NOT NULL,
    index_type TEXT NOT NULL,
    threshold {real},
    calibration TEXT,
    created {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    seq {serial},
    collection TEXT NOT NULL REFERENCES collections(name) ON DELETE CASCADE,
    item_id TEXT NOT NULL,
    vector {blob} NOT NULL,
    metadata TEXT NOT NULL,
    label TEXT,
    UNIQUE (collection, item_id)
);
CREATE INDEX IF NOT EXISTS items_by_label ON items(collection, label);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    name TEXT NOT NULL,
    created {real} NOT NULL,
    revoked {real}
);
CREATE TABLE IF NOT EXISTS audit (
    at {real} NOT NULL,
    key_id TEXT,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    version {serial},
    collection TEXT NOT NULL,
    op TEXT NOT NULL,
    seq BIGINT,
    label TEXT
);
"""


@dataclass(frozen=True)
class Change:
    """One entry of the change feed: ``op`` is create, drop, calibrate (a collection), add, remove (an item by
    seq) or remove_label (a gallery identity)."""

    version: int
    collection: str
    op: str
    seq: int | None
    label: str | None


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    kind: str
    metric: str
    dim: int
    index_type: str
    threshold: float | None
    calibration: dict | None

    def public(self, count: int) -> dict:
        out = {"name": self.name, "kind": self.kind, "metric": self.metric, "dim": self.dim,
               "index_type": self.index_type, "count": count}
        if self.kind == "gallery":
            out["threshold"] = self.threshold
        return out


@dataclass(frozen=True)
class ItemRow:
    seq: int
    item_id: str
    vector: np.ndarray
    metadata: dict
    label: str | None


class _Transaction:
    def __init__(self, db, begin: str, after_begin: str | None = None):
        self.db, self.begin, self.after_begin = db, begin, after_begin

    def __enter__(self):
        self.db.execute(self.begin)
        if self.after_begin:
            self.db.execute(self.after_begin)
        return self.db

    def __exit__(self, kind, exc, tb):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


class SQLStore:
    """What both databases share: the queries (written with ``?`` placeholders), one connection per thread,
    and the change feed. Subclasses say how to connect, begin a write and spell types."""

    TYPES = {"real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB"}
    BEGIN, AFTER_BEGIN = "BEGIN IMMEDIATE", None
    KEY_CACHE_SECONDS = 1.0  # a key revoked by another process stops working within this time

    def __init__(self):
        self._local = threading.local()
        self._key_cache: dict[str, tuple[float, tuple | None]] = {}
        self._create_schema(SCHEMA.format(**self.TYPES))

    def _connect(self):
        raise NotImplementedError

    def _create_schema(self, schema: str) -> None:
        raise NotImplementedError

    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _tx(self) -> _Transaction:
        return _Transaction(self._db(), self.BEGIN, self.AFTER_BEGIN)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @staticmethod
    def _change(db, collection: str, op: str, seq: int | None = None, label: str | None = None) -> int:
        return int(db.execute("INSERT INTO changes (collection, op, seq, label) VALUES (?, ?, ?, ?) RETURNING version",
                              (collection, op, seq, label)).fetchone()[0])

    # ------------------------------------------------------------ change feed
    def version(self) -> int:
        """The newest change's version (0 for none)."""
        row = self._db().execute("SELECT MAX(version) FROM changes").fetchone()
        return int(row[0] or 0)

    def changes_since(self, version: int, limit: int = 10000) -> list[Change]:
        rows = self._db().execute("SELECT version, collection, op, seq, label FROM changes WHERE version > ? "
                                  "ORDER BY version LIMIT ?", (int(version), int(limit))).fetchall()
        return [Change(int(r[0]), r[1], r[2], None if r[3] is None else int(r[3]), r[4]) for r in rows]

    def items_by_seq(self, collection: str, seqs: list[int], dim: int) -> list[ItemRow]:
        """The items of ``collection`` among ``seqs`` that still exist, in seq order."""
        out = []
        for start in range(0, len(seqs), 500):
            part = [int(s) for s in seqs[start : start + 500]]
            marks = ",".join("?" * len(part))
            rows = self._db().execute(f"SELECT seq, item_id, vector, metadata, label FROM items WHERE collection = ? "
                                      f"AND seq IN ({marks}) ORDER BY seq", (collection, *part)).fetchall()
            out += [ItemRow(int(r[0]), r[1], np.frombuffer(bytes(r[2]), dtype=np.float32, count=dim),
                            json.loads(r[3]), r[4]) for r in rows]
        return out

    def collection_info(self, name: str) -> CollectionInfo | None:
        return next((c for c in self.collections() if c.name == name), None)

    # ------------------------------------------------------------ collections
    def create_collection(self, info: CollectionInfo, audit: tuple | None = None) -> int:
        """Create a collection; returns the version of its creation in the change feed."""
        with self._tx() as db:
            self._log(db, audit)
            if db.execute("SELECT 1 FROM collections WHERE name = ?", (info.name,)).fetchone():
                raise FileExistsError(f"collection {info.name!r} exists")
            db.execute("INSERT INTO collections VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (info.name, info.kind, info.metric, info.dim, info.index_type, info.threshold,
                        None if info.calibration is None else json.dumps(info.calibration), time.time()))
            return self._change(db, info.name, "create")

    def collections(self) -> list[CollectionInfo]:
        rows = self._db().execute("SELECT name, kind, metric, dim, index_type, threshold, calibration "
                                  "FROM collections ORDER BY name").fetchall()
        return [CollectionInfo(r[0], r[1], r[2], int(r[3]), r[4], r[5], None if r[6] is None else json.loads(r[6]))
                for r in rows]

    def delete_collection(self, name: str, audit: tuple | None = None) -> None:
        with self._tx() as db:
            self._log(db, audit)
            db.execute("DELETE FROM items WHERE collection = ?", (name,))
            db.execute("DELETE FROM collections WHERE name = ?", (name,))
            self._change(db, name, "drop")

    def set_calibration(self, name: str, threshold: float, calibration: dict, audit: tuple | None = None) -> None:
        with self._tx() as db:
            self._log(db, audit)
            db.execute("UPDATE collections SET threshold = ?, calibration = ? WHERE name = ?",
                       (threshold, json.dumps(calibration), name))
            self._change(db, name, "calibrate")

    # ------------------------------------------------------------------ items
    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, metadata: list[dict],
               labels: list[str | None], audit: tuple | None = None) -> tuple[list[int], list[int]]:
        """Insert or replace items in one transaction; returns ``(new seqs, replaced seqs)``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        new, old = [], []
        with self._tx() as db:
            self._log(db, audit)
            for item_id, vec, meta, label in zip(ids, vectors, metadata, labels):
                prev = db.execute("DELETE FROM items WHERE collection = ? AND item_id = ? RETURNING seq",
                                  (collection, item_id)).fetchone()
                if prev is not None:
                    old.append(int(prev[0]))
                    self._change(db, collection, "remove", old[-1])
                row = db.execute("INSERT INTO items (collection, item_id, vector, metadata, label) "
                                 "VALUES (?, ?, ?, ?, ?) RETURNING seq",
                                 (collection, item_id, vec.tobytes(), json.dumps(meta), label)).fetchone()
                new.append(int(row[0]))
                self._change(db, collection, "add", new[-1])
        return new, old

    def delete_items(self, collection: str, ids: list[str], audit: tuple | None = None) -> list[int]:
        """Delete items by id in one transaction; returns the seqs removed (ids not present are skipped)."""
        removed = []
        with self._tx() as db:
            self._log(db, audit)
            for item_id in ids:
                row = db.execute("DELETE FROM items WHERE collection = ? AND item_id = ? RETURNING seq",
                                 (collection, item_id)).fetchone()
                if row is not None:
                    removed.append(int(row[0]))
                    self._change(db, collection, "remove", removed[-1])
        return removed

    def delete_label(self, collection: str, label: str, audit: tuple | None = None) -> list[int]:
        with self._tx() as db:
            self._log(db, audit)
            removed = [int(r[0]) for r in db.execute("DELETE FROM items WHERE collection = ? AND label = ? "
                                                     "RETURNING seq", (collection, label)).fetchall()]
            self._change(db, collection, "remove_label", label=label)
            return removed

    def items(self, collection: str, dim: int) -> list[ItemRow]:
        rows = self._db().execute("SELECT seq, item_id, vector, metadata, label FROM items WHERE collection = ? "
                                  "ORDER BY seq", (collection,)).fetchall()
        return [ItemRow(int(r[0]), r[1], np.frombuffer(bytes(r[2]), dtype=np.float32, count=dim), json.loads(r[3]),
                        r[4]) for r in rows]

    def get(self, collection: str, item_id: str, dim: int) -> ItemRow | None:
        r = self._db().execute("SELECT seq, item_id, vector, metadata, label FROM items WHERE collection = ? "
                               "AND item_id = ?", (collection, item_id)).fetchone()
        return None if r is None else ItemRow(int(r[0]), r[1], np.frombuffer(bytes(r[2]), dtype=np.float32, count=dim),
                                              json.loads(r[3]), r[4])

    # ------------------------------------------------------------------- keys
    def add_key(self, key_id: str, secret_hash: str, scopes: list[str], name: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)",
                       (key_id, secret_hash, json.dumps(sorted(scopes)), name, time.time()))

    def key(self, key_id: str) -> tuple[str, list[str]] | None:
        """``(secret hash, scopes)`` of an unrevoked key; read from the database at most once a second per key
        (every request checks its key)."""
        now = time.monotonic()
        cached = self._key_cache.get(key_id)
        if cached is not None and now - cached[0] < self.KEY_CACHE_SECONDS:
            return cached[1]
        r = self._db().execute("SELECT secret_hash, scopes FROM api_keys WHERE key_id = ? AND revoked IS NULL",
                               (key_id,)).fetchone()
        found = None if r is None else (r[0], json.loads(r[1]))
        self._key_cache[key_id] = (now, found)
        return found

    def keys(self) -> list[dict]:
        rows = self._db().execute("SELECT key_id, scopes, name, created, revoked FROM api_keys ORDER BY created").fetchall()
        return [{"key_id": r[0], "scopes": json.loads(r[1]), "name": r[2], "created": r[3], "revoked": r[4]} for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._tx() as db:
            done = db.execute("UPDATE api_keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL",
                              (time.time(), key_id)).rowcount == 1
        self._key_cache.pop(key_id, None)
        return done

    # ------------------------------------------------------------------ audit
    @staticmethod
    def _log(db, audit: tuple | None) -> None:
        """An audit row ``(key_id, action, detail)`` in the same transaction as the write it records."""
        if audit is not None:
            key_id, action, detail = audit
            db.execute("INSERT INTO audit VALUES (?, ?, ?, ?)", (time.time(), key_id, action, json.dumps(detail)))

    def audit_log(self, limit: int = 100) -> list[dict]:
        rows = self._db().execute("SELECT at, key_id, action, detail FROM audit ORDER BY at DESC LIMIT ?",
                                  (int(limit),)).fetchall()
        return [{"at": r[0], "key_id": r[1], "action": r[2], "detail": json.loads(r[3])} for r in rows]


class SQLiteStore(SQLStore):
    """The store in ``folder/metrix.db`` (one machine; several processes may share it)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrix.db"
        self.url = str(self.folder)
        super().__init__()

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # COMMIT returns after the WAL is fsynced
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def _create_schema(self, schema: str) -> None:
        self._db().executescript(schema)  # idempotent (IF NOT EXISTS); commits by itself


class _PostgresConnection:
    """A psycopg connection that takes the ``?`` placeholders the shared queries are written with."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def close(self) -> None:
        self.conn.close()


class PostgresStore(SQLStore):
    """The store in a PostgreSQL database (``postgresql://user:password@host:port/db``), shared by replicas."""

    TYPES = {"real": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA"}
    # writers take one transaction-scoped lock, so change versions are handed out in commit order
    BEGIN, AFTER_BEGIN = "BEGIN", "SELECT pg_advisory_xact_lock(727274)"

    def __init__(self, url: str):
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise ImportError("a PostgreSQL store needs psycopg: pip install 'metrix[postgres]'") from exc
        self.url = url
        super().__init__()

    def _connect(self):
        import psycopg

        try:
            return _PostgresConnection(psycopg.connect(self.url, autocommit=True, connect_timeout=10))
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"cannot connect to the PostgreSQL store: {str(exc).splitlines()[0]}") from None

    def _create_schema(self, schema: str) -> None:
        with self._tx() as db:
            for statement in schema.split(";"):
                if statement.strip():
                    db.execute(statement)


def open_store(spec, create: bool = True) -> SQLStore:
    """``postgresql://...`` → :class:`PostgresStore`; anything else is a folder for a :class:`SQLiteStore`
    (made when missing unless ``create=False``)."""
    text = str(spec)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    if not create and not (Path(text) / "metrix.db").is_file():
        raise FileNotFoundError(f"no store at {text} (no metrix.db in it): give the --store the service uses")
    return SQLiteStore(text)
