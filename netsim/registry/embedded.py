"""The embedded registry: an etcd-like store in one SQLite file (``sqlite:///path.db``).

Several processes, in any network namespace, may open the same file: every write is one
``BEGIN IMMEDIATE`` transaction, which SQLite serialises across processes, so a
compare-and-put is atomic. Leases expire by wall clock (``time.time``, shared by all
processes; injectable for tests); whoever touches the store next reaps expired leases,
deleting their keys with DELETE events in one revision. Watchers poll the event log.
``memory://`` is the same store in a private temporary file, removed on close.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .base import (KV, Compacted, Compare, Delete, DeleteResult, Event, LeaseNotFound, Op,
                   Put, PutResult, Range, RangeResult, Registry, RegistryError, TxnResult,
                   Unavailable, Watcher, WatchBatch, decode, encode, prefix_end)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY, value BLOB NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL, lease INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_at);
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, key BLOB NOT NULL,
    value BLOB, create_rev INTEGER, mod_rev INTEGER, version INTEGER, lease INTEGER,
    p_value BLOB, p_create_rev INTEGER, p_mod_rev INTEGER, p_version INTEGER, p_lease INTEGER,
    PRIMARY KEY (rev, seq));
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compact_revision', 0);
"""
KV_COLS = "key, value, create_rev, mod_rev, version, lease"
COMPACT_EVERY = 1000        # auto-compaction check interval, in revisions


class ManualClock:
    """A settable clock for tests: ``clock()`` returns the time, ``advance(s)`` moves it."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _kv(row) -> KV:
    return KV(decode(row[0]), decode(row[1]), row[2], row[3], row[4], row[5])


def _range_sql(key: bytes, prefix: bool) -> tuple[str, tuple]:
    if not prefix:
        return "key = ?", (key,)
    end = prefix_end(key)
    return ("key >= ?", (key,)) if end is None else ("key >= ? AND key < ?", (key, end))


class _Write:
    """One write transaction: hands out revisions lazily and appends events."""

    def __init__(self, conn: sqlite3.Connection, now: float):
        self.c = conn
        self.now = now
        self.rev = conn.execute("SELECT v FROM meta WHERE k='revision'").fetchone()[0]
        self.pending: int | None = None     # revision of the op in progress, once it mutates
        self.seq = 0
        self.bumped = False

    def mutation_rev(self) -> int:
        if self.pending is None:
            self.pending, self.seq = self.rev + 1, 0
        return self.pending

    def seal(self) -> int:
        """Finish an op: commit its revision (if it changed anything); return the revision."""
        if self.pending is not None:
            self.rev, self.pending, self.bumped = self.pending, None, True
            self.c.execute("UPDATE meta SET v=? WHERE k='revision'", (self.rev,))
        return self.rev

    def event(self, typ: str, kv: tuple, prev: tuple | None) -> None:
        """Log an event: ``kv`` and ``prev`` are kv-table rows (prev None = no previous value)."""
        self.seq += 1
        p = prev if prev is not None else (None,) * 6
        self.c.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (self.pending, self.seq, typ, *kv, *p[1:]))

    def rows(self, where: str, args: tuple) -> list:
        return self.c.execute(f"SELECT {KV_COLS} FROM kv WHERE {where} ORDER BY key", args).fetchall()

    def put(self, key: bytes, value: bytes, lease: int, prev_kv: bool) -> PutResult:
        if lease and not self.c.execute("SELECT 1 FROM leases WHERE id=?", (lease,)).fetchone():
            raise LeaseNotFound(lease)
        old = self.c.execute(f"SELECT {KV_COLS} FROM kv WHERE key=?", (key,)).fetchone()
        rev = self.mutation_rev()
        create, version = (old[2], old[4] + 1) if old else (rev, 1)
        new = (key, value, create, rev, version, lease)
        self.c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?,?,?,?)", new)
        self.event("PUT", new, old)
        return PutResult(rev, _kv(old) if (old and prev_kv) else None)

    def delete_rows(self, rows: list, prev_kv: bool) -> DeleteResult:
        if not rows:
            return DeleteResult(self.pending or self.rev)
        rev = self.mutation_rev()
        for row in rows:
            self.c.execute("DELETE FROM kv WHERE key=?", (row[0],))
            self.event("DELETE", (row[0], b"", 0, rev, 0, 0), row)
        prev = tuple(_kv(r) for r in rows) if prev_kv else ()
        return DeleteResult(rev, len(rows), prev)

    def reap(self) -> None:
        """Delete every expired lease and its keys, all in one revision."""
        ids = [r[0] for r in self.c.execute("SELECT id FROM leases WHERE expires_at <= ?", (self.now,))]
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        self.delete_rows(self.rows(f"lease IN ({marks})", tuple(ids)), False)
        self.c.execute(f"DELETE FROM leases WHERE id IN ({marks})", ids)
        self.seal()


class SqliteRegistry(Registry):
    """The embedded store. Thread-safe; open one per process (do not share across fork)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time,
                 poll_interval: float = 0.025, busy_timeout: float = 5.0,
                 history: int = 10_000, url: str | None = None, _tempdir: str | None = None):
        self.path = path
        self.url = url or f"sqlite://{path}"
        self.clock = clock
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self.history = history
        self._lock = threading.RLock()
        self._changed = threading.Condition()
        self._generation = 0                 # bumped on every local commit; wakes local watchers
        self._watchers: weakref.WeakSet = weakref.WeakSet()
        self._conn: sqlite3.Connection | None = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, _tempdir, True) if _tempdir else None
        with self._errors():
            self._conn = self._connect()

    # --- plumbing -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        deadline = time.monotonic() + self.busy_timeout
        while True:                          # switching to WAL needs a moment alone with the file
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as err:
            text = str(err)
            if "locked" in text or "busy" in text:
                raise Unavailable(self.url, f"database busy for more than {self.busy_timeout:g}s") from err
            raise Unavailable(self.url, text) from err
        except sqlite3.Error as err:
            raise RegistryError(f"registry {self.url}: {err}") from err

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError(f"registry {self.url} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[_Write]:
        with self._lock, self._errors():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                w = _Write(conn, self.clock())
                w.reap()
                yield w
                w.seal()
                if w.bumped:
                    self._maybe_autocompact(w)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        if w.bumped:
            self._notify()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read snapshot, after reaping anything that has expired."""
        self._reap_if_due()
        with self._lock, self._errors():
            conn = self._db()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def _reap_if_due(self) -> None:
        with self._lock, self._errors():
            due = self._db().execute("SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1",
                                     (self.clock(),)).fetchone()
        if due:
            with self._write():
                pass                         # _write reaps first thing

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _maybe_autocompact(self, w: _Write) -> None:
        if self.history and w.rev % COMPACT_EVERY == 0 and w.rev > self.history:
            self._compact(w.c, w.rev - self.history, strict=False)

    @staticmethod
    def _compact(conn: sqlite3.Connection, revision: int, strict: bool) -> None:
        cur, done = (r[0] for r in conn.execute(
            "SELECT v FROM meta WHERE k IN ('revision','compact_revision') ORDER BY k DESC"))
        if revision > cur:
            raise RegistryError(f"cannot compact to revision {revision}: current revision is {cur}")
        if revision <= done:
            if strict:
                raise Compacted(done, revision)
            return
        conn.execute("DELETE FROM events WHERE rev < ?", (revision,))
        conn.execute("UPDATE meta SET v=? WHERE k='compact_revision'", (revision,))

    # --- key/value ------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        with self._read() as c:
            row = c.execute(f"SELECT {KV_COLS} FROM kv WHERE key=?", (encode(key),)).fetchone()
        return _kv(row) if row else None

    def range(self, prefix: str) -> RangeResult:
        where, args = _range_sql(encode(prefix), True)
        with self._read() as c:
            rev = c.execute("SELECT v FROM meta WHERE k='revision'").fetchone()[0]
            rows = c.execute(f"SELECT {KV_COLS} FROM kv WHERE {where} ORDER BY key", args).fetchall()
        return RangeResult(rev, tuple(_kv(r) for r in rows))

    def put(self, key: str, value: str, lease: int = 0, prev_kv: bool = False) -> PutResult:
        with self._write() as w:
            return w.put(encode(key), encode(value), lease, prev_kv)

    def delete(self, key: str, prefix: bool = False, prev_kv: bool = False) -> DeleteResult:
        with self._write() as w:
            return w.delete_rows(w.rows(*_range_sql(encode(key), prefix)), prev_kv)

    def txn(self, compare: Sequence[Compare], success: Sequence[Op] = (),
            failure: Sequence[Op] = ()) -> TxnResult:
        with self._write() as w:
            ok = all(c.holds(self._row_kv(w, c.key)) for c in compare)
            results = tuple(self._run_op(w, op) for op in (success if ok else failure))
            rev = w.seal()
        return TxnResult(ok, rev, results)

    @staticmethod
    def _row_kv(w: _Write, key: str) -> KV | None:
        rows = w.rows("key = ?", (encode(key),))
        return _kv(rows[0]) if rows else None

    @staticmethod
    def _run_op(w: _Write, op: Op):
        if isinstance(op, Put):
            return w.put(encode(op.key), encode(op.value), op.lease, op.prev_kv)
        if isinstance(op, Delete):
            return w.delete_rows(w.rows(*_range_sql(encode(op.key), op.prefix)), op.prev_kv)
        if isinstance(op, Range):
            rows = w.rows(*_range_sql(encode(op.key), op.prefix))
            return RangeResult(w.pending or w.rev, tuple(_kv(r) for r in rows))
        raise TypeError(f"not a txn op: {op!r}")

    def revision(self) -> int:
        with self._read() as c:
            return c.execute("SELECT v FROM meta WHERE k='revision'").fetchone()[0]

    def compact(self, revision: int) -> None:
        with self._write() as w:
            self._compact(w.c, revision, strict=True)

    # --- leases ---------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> int:
        ttl = max(1, int(ttl))
        with self._write() as w:
            while True:
                lease = secrets.randbits(62) or 1
                try:
                    w.c.execute("INSERT INTO leases VALUES (?,?,?)", (lease, ttl, w.now + ttl))
                    return lease
                except sqlite3.IntegrityError:
                    continue

    def lease_keepalive(self, lease: int) -> int:
        with self._write() as w:
            row = w.c.execute("SELECT ttl FROM leases WHERE id=?", (lease,)).fetchone()
            if not row:
                return 0
            w.c.execute("UPDATE leases SET expires_at=? WHERE id=?", (w.now + row[0], lease))
            return row[0]

    def lease_time_to_live(self, lease: int) -> int:
        with self._read() as c:
            row = c.execute("SELECT expires_at FROM leases WHERE id=?", (lease,)).fetchone()
        return max(0, int(row[0] - self.clock())) if row else -1

    def lease_revoke(self, lease: int) -> None:
        with self._write() as w:
            if not w.c.execute("DELETE FROM leases WHERE id=?", (lease,)).rowcount:
                raise LeaseNotFound(lease)
            w.delete_rows(w.rows("lease = ?", (lease,)), False)

    # --- watch ----------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int = 0, prev_kv: bool = True,
              timeout: float | None = None) -> Watcher:
        start = start_revision if start_revision > 0 else self.revision() + 1
        watcher = SqliteWatcher(self, encode(prefix), start, prev_kv, timeout)
        self._watchers.add(watcher)
        return watcher

    def close(self) -> None:
        for watcher in list(self._watchers):
            watcher.close()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self._notify()
        if self._cleanup:
            self._cleanup()                  # memory://: remove the temporary file


class SqliteWatcher(Watcher):
    """Polls the event log every ``poll_interval``; local commits wake it at once."""

    def __init__(self, store: SqliteRegistry, prefix: bytes, start: int, prev_kv: bool,
                 timeout: float | None):
        super().__init__(timeout)
        self._store = store
        self._where, self._args = _range_sql(prefix, True)
        self._next = start
        self._prev_kv = prev_kv
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._store._notify()

    def next_batch(self, timeout: float | None = None) -> WatchBatch | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self._store
        while not self._closed and store._conn is not None:
            seen = store._generation
            try:
                batch = self._poll()
            except Compacted:
                self._closed = True
                raise
            except RegistryError:
                if self._closed or store._conn is None:    # closed under our feet
                    return None
                raise
            if batch:
                return batch
            wait = store.poll_interval
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = min(wait, left)
            with store._changed:
                store._changed.wait_for(lambda: store._generation != seen or self._closed, wait)
        return None

    def _poll(self) -> WatchBatch | None:
        with self._store._read() as c:
            cur, compacted = (r[0] for r in c.execute(
                "SELECT v FROM meta WHERE k IN ('revision','compact_revision') ORDER BY k DESC"))
            if self._next < compacted:
                raise Compacted(compacted, self._next)
            if cur < self._next:
                return None
            rows = c.execute(f"SELECT * FROM events WHERE rev >= ? AND rev <= ? AND {self._where} "
                             "ORDER BY rev, seq", (self._next, cur, *self._args)).fetchall()
        self._next = cur + 1
        if not rows:
            return None
        return WatchBatch(cur, tuple(self._event(r) for r in rows))

    def _event(self, r) -> Event:
        kv = KV(decode(r[3]), decode(r[4] or b""), r[5], r[6], r[7], r[8])
        prev = None
        if self._prev_kv and r[9] is not None:
            prev = KV(decode(r[3]), decode(r[9]), r[10], r[11], r[12], r[13])
        return Event(r[2], kv, prev)


def open_sqlite(path: str, **kwargs) -> SqliteRegistry:
    """Open (creating if needed) the store at an absolute path."""
    if not os.path.isabs(path):
        raise RegistryError(f"sqlite registry path must be absolute (sqlite:///abs/path.db), got {path!r}")
    if not os.path.isdir(os.path.dirname(path)):
        raise Unavailable(f"sqlite://{path}", f"directory {os.path.dirname(path)} does not exist")
    return SqliteRegistry(path, **kwargs)


def open_memory(**kwargs) -> SqliteRegistry:
    """A private store for one process (tests): a temporary file, in /dev/shm when possible."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="netsim-registry-", dir=base)
    return SqliteRegistry(os.path.join(tmp, "registry.db"), url="memory://", _tempdir=tmp, **kwargs)
