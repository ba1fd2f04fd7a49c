"""The lab's registry from the outside: read and write keys like etcdctl, and stop or
start the lab's real etcd (to see that the data plane outlives it)."""
from __future__ import annotations

import atexit
import signal

from ..errors import LabStateError
from ..registry import open_registry
from ..registry.server import start_etcd
from . import labstate
from .lab import _signal, _wait_gone, process_running, registry_url
from .labstate import LabState, Process


def _etcd(st: LabState) -> Process | None:
    return next((p for p in st.processes if p.role == "etcd"), None)


def get(lab: str, key: str, prefix: bool = False) -> list[tuple[str, str]]:
    reg = open_registry(registry_url(lab))
    try:
        if prefix:
            return [(kv.key, kv.value) for kv in reg.range(key)]
        kv = reg.get(key)
        return [(kv.key, kv.value)] if kv else []
    finally:
        reg.close()


def put(lab: str, key: str, value: str) -> None:
    reg = open_registry(registry_url(lab))
    try:
        reg.put(key, value)
    finally:
        reg.close()


def delete(lab: str, key: str) -> int:
    reg = open_registry(registry_url(lab))
    try:
        return reg.delete(key).deleted
    finally:
        reg.close()


def stop_etcd(lab: str) -> int:
    """Stop the lab's etcd, keeping its data; returns the PID that was stopped."""
    st = LabState.load(lab)
    proc = _etcd(st)
    if proc is None:
        raise LabStateError(f"lab {lab} uses the embedded registry; only a real etcd can be stopped")
    if not process_running(proc):
        raise LabStateError(f"the etcd of lab {lab} is not running")
    _signal(proc.pid, signal.SIGTERM)
    _wait_gone([proc.pid])
    return proc.pid


def start_etcd_again(lab: str) -> int:
    """Start the lab's etcd on its existing data (same socket, same keys and leases)."""
    st = LabState.load(lab)
    proc = _etcd(st)
    if proc is None:
        raise LabStateError(f"lab {lab} uses the embedded registry")
    if process_running(proc):
        raise LabStateError(f"the etcd of lab {lab} is already running (pid {proc.pid})")
    server = start_etcd(str(st.dir), keep_data=True)
    atexit.unregister(server.stop)
    st.processes = [p for p in st.processes if p is not proc] + [
        Process(server.pid, "etcd", "", labstate.start_time(server.pid))]
    st.save()
    return server.pid
