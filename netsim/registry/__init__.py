"""The etcd-style subnet registry flannel agents use, with interchangeable backends.

``open_registry(url)`` picks the backend from the URL:

* ``sqlite:///abs/path/registry.db`` – the embedded store (default for labs); any number of
  processes in any network namespace may share the file;
* ``memory://`` – the same store in a private temporary file (tests);
* ``etcd+http://host:port`` / ``etcd+unix:///path/etcd.sock:0`` – a real etcd v3
  (see ``server.start_etcd`` for a throw-away one).

>>> reg = open_registry("memory://")
>>> reg.create_if_absent("/a", "1"), reg.create_if_absent("/a", "2")
(True, False)
>>> reg.get("/a").value
'1'
>>> reg.close()
"""
from __future__ import annotations

from .base import (KV, Compacted, Compare, Delete, DeleteResult, Event, LeaseNotFound, Put,
                   PutResult, Range, RangeResult, Registry, RegistryError, TxnResult,
                   Unavailable, WatchBatch, Watcher)
from .embedded import ManualClock, SqliteRegistry, open_memory, open_sqlite
from .etcd import EtcdRegistry

SCHEMES = ("sqlite:///abs/path.db", "memory://", "etcd+http://host:port", "etcd+unix:///path/etcd.sock:0")


def open_registry(url: str, **options) -> Registry:
    """Open the registry named by ``url``; ``options`` go to the backend's constructor
    (e.g. ``clock=`` for the embedded store, ``timeout=`` for etcd)."""
    if url == "memory://" or url.startswith("memory:"):
        return open_memory(**options)
    if url.startswith("sqlite://"):
        return open_sqlite(url[len("sqlite://"):], **options)
    if url.startswith(("etcd+http://", "etcd+unix://")):
        return EtcdRegistry(url, **options)
    raise RegistryError(f"unknown registry URL {url!r}; use one of: {', '.join(SCHEMES)}")


__all__ = [
    "KV", "Compacted", "Compare", "Delete", "DeleteResult", "Event", "EtcdRegistry",
    "LeaseNotFound", "ManualClock", "Put", "PutResult", "Range", "RangeResult", "Registry",
    "RegistryError", "SqliteRegistry", "TxnResult", "Unavailable", "WatchBatch", "Watcher",
    "open_registry",
]
