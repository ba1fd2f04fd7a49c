"""The registry interface shared by every backend, its value types and its errors.

The model is etcd v3's: one flat, byte-ordered key space; a global revision that grows by
one per write transaction; keys optionally attached to a lease that deletes them when it
expires; an event log that watchers replay from any revision not yet compacted.
Keys and values are ``str`` here and UTF-8 on the wire or on disk.
"""
from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

from ..errors import NetsimError

# --- errors -----------------------------------------------------------------------------


class RegistryError(NetsimError):
    """Any registry failure; subclasses name the ones callers branch on."""


class Compacted(RegistryError):
    """The requested revision is older than the oldest one kept; re-list and resume."""

    def __init__(self, compact_revision: int, requested: int = 0):
        self.compact_revision = compact_revision        # 0 when the server did not say
        self.requested = requested
        asked = f"revision {requested}" if requested else "requested revision"
        where = f"; history starts at revision {compact_revision}" if compact_revision else ""
        super().__init__(f"{asked} has been compacted{where}")


class LeaseNotFound(RegistryError):
    """The lease does not exist (never granted, revoked or expired)."""

    def __init__(self, lease: int):
        self.lease = lease
        super().__init__(f"lease {lease:#x} not found (expired, revoked or never granted)")


class Unavailable(RegistryError):
    """The registry could not be reached; the message names the endpoint."""

    def __init__(self, endpoint: str, detail: str):
        self.endpoint = endpoint
        self.detail = detail
        super().__init__(f"registry {endpoint} unavailable: {detail}")


# --- values -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KV:
    """A key's value and its bookkeeping, as etcd reports it (lease 0 = no lease)."""

    key: str
    value: str
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


@dataclass(frozen=True)
class Event:
    """One change. A DELETE's ``kv`` carries only key and mod_revision; ``prev_kv`` the old value."""

    type: Literal["PUT", "DELETE"]
    kv: KV
    prev_kv: KV | None = None


@dataclass(frozen=True)
class WatchBatch:
    """Events delivered together; every change up to ``revision`` has been seen."""

    revision: int
    events: tuple[Event, ...]


@dataclass(frozen=True)
class RangeResult(Sequence[KV]):
    """Keys read at one ``revision``, sorted by key. Behaves as a sequence of KV."""

    revision: int
    kvs: tuple[KV, ...] = ()

    def __getitem__(self, i):  # type: ignore[override]
        return self.kvs[i]

    def __len__(self) -> int:
        return len(self.kvs)


@dataclass(frozen=True)
class PutResult:
    revision: int
    prev_kv: KV | None = None


@dataclass(frozen=True)
class DeleteResult:
    revision: int
    deleted: int = 0
    prev_kvs: tuple[KV, ...] = ()


# --- transactions -----------------------------------------------------------------------

TARGETS = ("create_revision", "version", "mod_revision", "value", "lease")
RESULTS = {"EQUAL": "EQUAL", "==": "EQUAL", "NOT_EQUAL": "NOT_EQUAL", "!=": "NOT_EQUAL",
           "GREATER": "GREATER", ">": "GREATER", "LESS": "LESS", "<": "LESS"}


@dataclass(frozen=True)
class Compare:
    """``target(key) result value``, e.g. ``Compare(k, "version", "EQUAL", 0)``.

    As in etcd, a missing key has revisions/version/lease 0 and fails every value compare.
    """

    key: str
    target: str
    result: str
    value: int | str

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"compare target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.result not in RESULTS:
            raise ValueError(f"compare result must be one of {', '.join(RESULTS)}, got {self.result!r}")
        object.__setattr__(self, "result", RESULTS[self.result])

    def holds(self, kv: KV | None) -> bool:
        """Evaluate against the key's current state (None = absent)."""
        if kv is None:
            if self.target == "value":
                return False
            kv = KV(self.key, "")
        actual = getattr(kv, self.target)
        want = self.value
        return {"EQUAL": actual == want, "NOT_EQUAL": actual != want,
                "GREATER": actual > want, "LESS": actual < want}[self.result]


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    lease: int = 0
    prev_kv: bool = False


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False
    prev_kv: bool = False


@dataclass(frozen=True)
class Range:
    key: str
    prefix: bool = False


Op = Union[Put, Delete, Range]
OpResult = Union[PutResult, DeleteResult, RangeResult]


@dataclass(frozen=True)
class TxnResult:
    """Which branch ran and one result per op of that branch, in order."""

    succeeded: bool
    revision: int
    results: tuple[OpResult, ...] = field(default=())


# --- watch ------------------------------------------------------------------------------


class Watcher(abc.ABC):
    """A stream of WatchBatch. Iterate it, or call ``next_batch``; ``close`` stops both.

    Iteration blocks until events arrive and ends when the watcher is closed (from any
    thread) or, if the watch was given a ``timeout``, after that long without events.
    ``Compacted`` (and ``Unavailable`` for a server that stays away) is raised from here.
    """

    def __init__(self, timeout: float | None):
        self.timeout = timeout

    @abc.abstractmethod
    def next_batch(self, timeout: float | None = None) -> WatchBatch | None:
        """The next batch, or None after ``timeout`` seconds (None = wait) or once closed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop watching; idempotent and safe from another thread."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    def __iter__(self) -> Iterator[WatchBatch]:
        while True:
            batch = self.next_batch(self.timeout)
            if batch is None:
                return
            yield batch

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the interface ----------------------------------------------------------------------


class Registry(abc.ABC):
    """An etcd-like key-value store: revisions, leases, transactions and watches."""

    url: str = ""
    clock: Callable[[], float] = staticmethod(time.time)    # the wall clock leases run on

    @abc.abstractmethod
    def get(self, key: str) -> KV | None:
        """The key's current KV, or None."""

    @abc.abstractmethod
    def range(self, prefix: str) -> RangeResult:
        """All keys starting with ``prefix`` ("" = every key), sorted, with the read revision."""

    @abc.abstractmethod
    def put(self, key: str, value: str, lease: int = 0, prev_kv: bool = False) -> PutResult:
        """Write ``key``; ``lease`` attaches it to a lease (LeaseNotFound if there is none)."""

    @abc.abstractmethod
    def delete(self, key: str, prefix: bool = False, prev_kv: bool = False) -> DeleteResult:
        """Delete ``key`` (or every key under it with ``prefix``)."""

    @abc.abstractmethod
    def txn(self, compare: Sequence[Compare], success: Sequence[Op] = (),
            failure: Sequence[Op] = ()) -> TxnResult:
        """Atomically: if every compare holds run ``success``, else ``failure``."""

    @abc.abstractmethod
    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (the server may raise tiny TTLs); returns its id."""

    @abc.abstractmethod
    def lease_keepalive(self, lease: int) -> int:
        """Restart the lease's TTL; returns it, or 0 when the lease is gone."""

    @abc.abstractmethod
    def lease_time_to_live(self, lease: int) -> int:
        """Seconds left on the lease, or -1 when it is gone."""

    @abc.abstractmethod
    def lease_revoke(self, lease: int) -> None:
        """Delete the lease and all its keys (one revision); LeaseNotFound if absent."""

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int = 0, prev_kv: bool = True,
              timeout: float | None = None) -> Watcher:
        """Changes under ``prefix`` from ``start_revision`` (0 = from now on)."""

    @abc.abstractmethod
    def revision(self) -> int:
        """The current global revision."""

    @abc.abstractmethod
    def compact(self, revision: int) -> None:
        """Discard history before ``revision``; older watches then raise Compacted."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections/files. Idempotent."""

    def create_if_absent(self, key: str, value: str, lease: int = 0) -> bool:
        """Put ``key`` only if it does not exist (flannel's claim); True if we created it."""
        res = self.txn([Compare(key, "version", "EQUAL", 0)], [Put(key, value, lease)])
        return res.succeeded

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def prefix_end(prefix: bytes) -> bytes | None:
    """etcd's range end for a prefix: bump the last byte below 0xff; None = no upper bound."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return None


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")
