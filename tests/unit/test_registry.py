"""One contract suite for every registry backend: memory://, sqlite:// and a real etcd.

The etcd variant starts one throw-away server per module on a Unix socket (no root
needed) and is skipped when /usr/bin/etcd is missing. SQLite-backed stores use a manual
clock, so lease expiry costs no wall time there; etcd's leases run on real time.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pytest

from netsim.registry import (Compacted, Compare, Delete, LeaseNotFound, ManualClock, Put,
                             Range, Registry, RegistryError, Unavailable, WatchBatch,
                             open_registry)
from netsim.registry.flannel import (SUBNETS_PREFIX, LeaseAttrs, NetworkConfig, acquire_lease,
                                     parse_subnet_key)
from netsim.registry.server import ETCD_BINARY, start_etcd

HAVE_ETCD = os.access(ETCD_BINARY, os.X_OK)
BACKENDS = ["memory", "sqlite", pytest.param("etcd", marks=pytest.mark.skipif(
    not HAVE_ETCD, reason=f"{ETCD_BINARY} not installed (apt-get install etcd-server)"))]


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    server = start_etcd(str(tmp_path_factory.mktemp("etcd")))
    yield server
    server.stop()
    assert not server.alive()


@dataclass
class Env:
    """A registry under test, a fresh key prefix, and how to let lease time pass."""

    reg: Registry
    url: str                       # opens another client of the same store ("" = none)
    prefix: str
    elapse: Callable[[float], None]
    clock: ManualClock | None

    def open(self) -> Registry:
        return open_registry(self.url, clock=self.clock) if self.clock else open_registry(self.url)


@pytest.fixture(params=BACKENDS)
def env(request, tmp_path):
    prefix = f"/test/{uuid.uuid4().hex[:8]}/"
    if request.param == "etcd":
        server = request.getfixturevalue("etcd_server")
        reg = open_registry(server.url)
        yield Env(reg, server.url, prefix, time.sleep, None)
    else:
        clock = ManualClock()
        url = "memory://" if request.param == "memory" else f"sqlite://{tmp_path}/registry.db"
        reg = open_registry(url, clock=clock)
        yield Env(reg, "" if request.param == "memory" else url, prefix, clock.advance, clock)
    reg.close()


def collect(watcher, count: int, timeout: float = 5.0) -> list:
    """Events from ``watcher`` until ``count`` arrived; fails after ``timeout`` seconds."""
    events, deadline = [], time.monotonic() + timeout
    while len(events) < count:
        left = deadline - time.monotonic()
        batch = watcher.next_batch(max(left, 0)) if left > 0 else None
        if batch is None:
            pytest.fail(f"got {len(events)} of {count} events within {timeout}s: {events}")
        assert isinstance(batch, WatchBatch) and batch.events
        assert all(e.kv.mod_revision <= batch.revision for e in batch.events)
        events.extend(batch.events)
    return events


# --- key/value --------------------------------------------------------------------------


def test_put_get_range_and_revisions(env):
    reg, p = env.reg, env.prefix
    r0 = reg.revision()
    assert reg.put(p + "b", "2").revision == r0 + 1
    assert reg.put(p + "a", "1").revision == r0 + 2
    reg.put(p + "a", "1b")
    reg.put(p + "c/", "x")
    reg.put(p[:-1] + "0", "outside the prefix")
    a = reg.get(p + "a")
    assert (a.value, a.create_revision, a.mod_revision, a.version, a.lease) == ("1b", r0 + 2, r0 + 3, 2, 0)
    assert reg.get(p + "missing") is None
    listing = reg.range(p)
    assert [kv.key for kv in listing] == [p + "a", p + "b", p + "c/"]
    assert listing.revision == reg.revision() == r0 + 5
    assert len(reg.range(p + "zzz")) == 0
    assert len(reg.range("")) >= 4                      # "" lists every key


def test_delete_and_prev_kv(env):
    reg, p = env.reg, env.prefix
    reg.put(p + "k", "v1")
    assert reg.put(p + "k", "v2", prev_kv=True).prev_kv.value == "v1"
    rev = reg.revision()
    missing = reg.delete(p + "nothing")
    assert missing.deleted == 0 and reg.revision() == rev    # no-op delete: no new revision
    reg.put(p + "d/1", "x")
    reg.put(p + "d/2", "y")
    res = reg.delete(p + "d/", prefix=True, prev_kv=True)
    assert res.deleted == 2 and [kv.value for kv in res.prev_kvs] == ["x", "y"]
    assert res.revision == rev + 3
    reg.put(p + "k", "again")
    reg.delete(p + "k")
    reborn = reg.put(p + "k", "new")
    kv = reg.get(p + "k")
    assert (kv.version, kv.create_revision) == (1, reborn.revision)  # recreate restarts version


def test_unicode_keys_and_values(env):
    key, value = env.prefix + "ключ/✓", "välue 🚀"
    env.reg.put(key, value)
    assert env.reg.get(key).value == value
    assert [kv.key for kv in env.reg.range(env.prefix + "ключ")] == [key]


# --- transactions -----------------------------------------------------------------------


def test_txn_compare_targets(env):
    reg, k = env.reg, env.prefix + "cas"
    assert reg.txn([Compare(k, "version", "EQUAL", 0)], [Put(k, "one")]).succeeded
    kv = reg.get(k)
    assert not reg.txn([Compare(k, "create_revision", "EQUAL", 0)], [Put(k, "lost")]).succeeded
    assert reg.txn([Compare(k, "mod_revision", "EQUAL", kv.mod_revision)], [Put(k, "two")]).succeeded
    assert not reg.txn([Compare(k, "mod_revision", "EQUAL", kv.mod_revision)], [Put(k, "stale")]).succeeded
    assert reg.txn([Compare(k, "value", "NOT_EQUAL", "one"), Compare(k, "version", "EQUAL", 2)]).succeeded
    assert not reg.txn([Compare(env.prefix + "absent", "value", "NOT_EQUAL", "x")]).succeeded
    res = reg.txn([Compare(k, "value", "EQUAL", "nope")],
                  [Put(k, "never")],
                  [Range(env.prefix, prefix=True), Put(k, "three", prev_kv=True), Delete(k + "x")])
    assert not res.succeeded
    assert [kv.value for kv in res.results[0]] == ["two"]
    assert res.results[1].prev_kv.value == "two"
    assert res.results[2].deleted == 0
    assert reg.get(k).value == "three" and res.revision == reg.revision()


def test_create_if_absent_race_exactly_one_wins(env):
    key, n = env.prefix + "claim", 8
    clients = [env.open() if env.url else env.reg for _ in range(n)]
    barrier, wins = threading.Barrier(n), []

    def claim(i):
        barrier.wait()
        if clients[i].create_if_absent(key, f"claimer-{i}"):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(wins) == 1
    assert env.reg.get(key).value == f"claimer-{wins[0]}"
    for c in clients:
        if c is not env.reg:
            c.close()


# --- leases -----------------------------------------------------------------------------


def test_lease_expiry_deletes_keys_with_a_delete_event(env):
    reg, k = env.reg, env.prefix + "leased"
    lease = reg.lease_grant(1)
    rev = reg.put(k, "gone soon", lease=lease).revision
    assert reg.get(k).lease == lease and reg.lease_time_to_live(lease) >= 0
    with reg.watch(env.prefix, start_revision=rev + 1) as w:
        env.elapse(1.1)
        (ev,) = collect(w, 1, timeout=5)
    assert ev.type == "DELETE" and ev.kv.key == k
    assert ev.prev_kv.value == "gone soon" and ev.prev_kv.lease == lease
    assert reg.get(k) is None
    assert reg.lease_time_to_live(lease) == -1
    assert reg.lease_keepalive(lease) == 0
    with pytest.raises(LeaseNotFound):
        reg.put(k, "late", lease=lease)


def test_keepalive_extends_the_lease(env):
    reg, k = env.reg, env.prefix + "kept"
    lease = reg.lease_grant(2)
    reg.put(k, "v", lease=lease)
    env.elapse(1.2)
    assert reg.lease_keepalive(lease) == 2
    env.elapse(1.2)                                   # 2.4 s after the grant, 1.2 s after keepalive
    assert reg.get(k) is not None and reg.lease_time_to_live(lease) >= 0
    assert reg.lease_keepalive(12345) == 0


def test_revoke_deletes_all_keys_in_one_revision(env):
    reg, p = env.reg, env.prefix
    lease = reg.lease_grant(60)
    reg.put(p + "r1", "a", lease=lease)
    rev = reg.put(p + "r2", "b", lease=lease).revision
    with reg.watch(p, start_revision=rev + 1) as w:
        reg.lease_revoke(lease)
        events = collect(w, 2)
    assert [e.type for e in events] == ["DELETE", "DELETE"]
    assert {e.kv.mod_revision for e in events} == {rev + 1}
    assert {e.prev_kv.value for e in events} == {"a", "b"}
    with pytest.raises(LeaseNotFound):
        reg.lease_revoke(lease)
    assert reg.lease_time_to_live(lease) == -1


# --- watch ------------------------------------------------------------------------------


def test_watch_replays_from_a_revision(env):
    reg, p = env.reg, env.prefix
    reg.put(p + "a", "1")
    rev_b = reg.put(p + "b", "2").revision
    reg.put(p + "b", "3")
    reg.put(p[:-1] + "-other", "not watched")
    reg.delete(p + "a")
    with reg.watch(p, start_revision=rev_b) as w:
        events = collect(w, 3)
    assert [(e.type, e.kv.key, e.kv.value) for e in events] == [
        ("PUT", p + "b", "2"), ("PUT", p + "b", "3"), ("DELETE", p + "a", "")]
    assert events[1].prev_kv.value == "2" and events[2].prev_kv.value == "1"
    with reg.watch(p, start_revision=rev_b, prev_kv=False) as w:
        assert all(e.prev_kv is None for e in collect(w, 3))


def test_watch_resumes_after_the_last_batch(env):
    reg, p = env.reg, env.prefix
    w = reg.watch(p)                                  # from now on
    reg.put(p + "x", "1")
    first = collect(w, 1)
    last = first[-1].kv.mod_revision
    w.close()
    reg.put(p + "x", "2")
    reg.put(p + "y", "3")
    with reg.watch(p, start_revision=last + 1) as w2:
        again = collect(w2, 2)
        assert [e.kv.value for e in again] == ["2", "3"]
        assert w2.next_batch(0.1) is None             # nothing duplicated


def test_watch_iteration_stops_on_close_and_timeout(env):
    reg, p = env.reg, env.prefix
    w = reg.watch(p)
    seen: list = []
    reader = threading.Thread(target=lambda: seen.extend(e for b in w for e in b.events))
    reader.start()
    reg.put(p + "live", "v")
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        reader.join(0.01)
    w.close()
    reader.join(5)
    assert not reader.is_alive() and [e.kv.value for e in seen] == ["v"]
    assert w.closed and w.next_batch(0) is None
    t0 = time.monotonic()
    assert list(reg.watch(p, timeout=0.2)) == []
    assert time.monotonic() - t0 < 2


def test_compaction_raises_compacted(env):
    reg, p = env.reg, env.prefix
    reg.put(p + "c", "1")
    reg.put(p + "c", "2")
    rev = reg.put(p + "c", "3").revision
    reg.compact(rev)
    w = reg.watch(p, start_revision=rev - 1)
    with pytest.raises(Compacted) as err:
        collect(w, 1)
    assert err.value.compact_revision == rev and "compacted" in str(err.value)
    assert w.closed
    with reg.watch(p, start_revision=rev) as ok:      # the compact revision itself is kept
        assert [e.kv.value for e in collect(ok, 1)] == ["3"]
    with pytest.raises(Compacted):
        reg.compact(rev - 1)


# --- backend specifics ------------------------------------------------------------------


def test_sqlite_second_client_sees_writes_by_polling(tmp_path):
    url = f"sqlite://{tmp_path}/shared.db"
    with open_registry(url) as a, open_registry(url) as b:
        with a.watch("/p/") as w:
            b.put("/p/k", "from b")
            (ev,) = collect(w, 1, timeout=2)
        assert ev.kv.value == "from b" and a.get("/p/k").value == "from b"


def test_sqlite_reaping_is_idempotent_across_clients(tmp_path):
    clock = ManualClock()
    url = f"sqlite://{tmp_path}/reap.db"
    with open_registry(url, clock=clock) as a, open_registry(url, clock=clock) as b:
        lease = a.lease_grant(5)
        rev = a.put("/l/1", "x", lease=lease).revision
        a.put("/l/2", "y", lease=lease)
        clock.advance(6)
        assert b.get("/l/1") is None and a.get("/l/2") is None
        assert a.revision() == b.revision() == rev + 2     # one revision for both deletes
        with a.watch("/l/", start_revision=rev + 2) as w:
            assert len(collect(w, 2)) == 2
            assert w.next_batch(0.1) is None


def test_bad_urls_and_unreachable_servers(tmp_path):
    with pytest.raises(RegistryError, match="unknown registry URL"):
        open_registry("redis://x")
    with pytest.raises(Unavailable, match="does not exist"):
        open_registry(f"sqlite://{tmp_path}/no/such/dir/r.db")
    missing = open_registry(f"etcd+unix://{tmp_path}/nobody.sock:0")
    with pytest.raises(Unavailable, match=f"unix://{tmp_path}/nobody.sock:0"):
        missing.get("/k")
    with pytest.raises(Unavailable, match="http://127.0.0.1:1"):
        open_registry("etcd+http://127.0.0.1:1").put("/k", "v")


@pytest.mark.skipif(not HAVE_ETCD, reason="etcd not installed")
def test_etcd_client_survives_dropped_connections(etcd_server):
    with open_registry(etcd_server.url) as reg:
        p = f"/drop/{uuid.uuid4().hex[:8]}/"
        reg.put(p + "a", "1")
        reg._local.conn.sock.shutdown(socket.SHUT_RDWR)   # keep-alive connection gone under us
        assert reg.get(p + "a").value == "1"
        with reg.watch(p) as w:
            reg.put(p + "b", "2")
            assert [e.kv.value for e in collect(w, 1)] == ["2"]
            w._drop_connection()                      # stream cut: the watcher resumes
            reg.put(p + "c", "3")
            assert [e.kv.value for e in collect(w, 1)] == ["3"]
            assert w.next_batch(0.2) is None          # and replays nothing twice


# --- flannel's claim race, many processes -----------------------------------------------

RACE_CONFIG = NetworkConfig.create("10.244.0.0/16")


def _race_worker(url: str, i: int, barrier, results, mode: str) -> None:
    reg = open_registry(url)
    try:
        ip = f"192.168.64.{i + 1}"
        barrier.wait(20)
        if mode == "claim":
            results.put((i, reg.create_if_absent("/race/one-key", ip)))
        else:
            attrs = LeaseAttrs.vxlan(ip, f"02:00:00:00:00:{i + 1:02x}")
            lease = acquire_lease(reg, RACE_CONFIG, ip, attrs, ttl=60, rng=random.Random(i))
            results.put((i, str(lease.subnet)))
    except Exception as err:                          # reported to the parent
        results.put((i, f"error: {err!r}"))
    finally:
        reg.close()


def _race(url: str, mode: str, n: int = 20) -> dict[int, object]:
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(url, i, barrier, results, mode)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=30) for _ in range(n))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()                               # by PID, only our own children
    return got


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("etcd", marks=pytest.mark.skipif(
    not HAVE_ETCD, reason="etcd not installed"))])
def test_twenty_processes_one_claim_wins_and_subnets_are_distinct(backend, tmp_path, request):
    if backend == "etcd":
        url = request.getfixturevalue("etcd_server").url
        with open_registry(url) as reg:
            reg.delete(SUBNETS_PREFIX, prefix=True)
            reg.delete("/race/", prefix=True)
    else:
        url = f"sqlite://{tmp_path}/race.db"
        open_registry(url).close()                     # create the file before the stampede
    claims = _race(url, "claim")
    assert sorted(map(str, claims.values())) == ["False"] * 19 + ["True"], claims
    got = _race(url, "acquire")
    assert not [v for v in got.values() if v.startswith("error")], got
    assert len(set(got.values())) == 20
    with open_registry(url) as reg:
        kvs = reg.range(SUBNETS_PREFIX)
        assert sorted(str(parse_subnet_key(kv.key)) for kv in kvs) == sorted(got.values())
        owners = {LeaseAttrs.parse(kv.value).public_ip for kv in kvs}
        assert len(owners) == 20 and all(kv.lease for kv in kvs)
        winner = [i for i, won in claims.items() if won is True][0]
        assert reg.get("/race/one-key").value == f"192.168.64.{winner + 1}"
        if backend == "etcd":
            reg.delete(SUBNETS_PREFIX, prefix=True)
            reg.delete("/race/", prefix=True)
