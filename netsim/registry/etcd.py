"""A standard-library client for a real etcd v3, over its gRPC-gateway JSON API.

Every call is one ``POST /v3/...`` with a JSON body (keys and values base64, int64 fields
as strings); a watch is one long response carrying a JSON object per line. The server is
reached over TCP (``etcd+http://host:port``) or a Unix socket
(``etcd+unix:///path/etcd.sock:0``), which also works from inside other network namespaces.
Each thread keeps one keep-alive connection; a dropped one is re-opened and the request
retried once. Each watch reads on its own connection in a background thread and, when
that connection drops, resumes from the revision after the last event it delivered.
"""
from __future__ import annotations

import base64
import http.client
import json
import queue
import socket
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from .base import (KV, Compacted, Compare, Delete, DeleteResult, Event, LeaseNotFound, Op,
                   Put, PutResult, Range, RangeResult, Registry, RegistryError, TxnResult,
                   Unavailable, Watcher, WatchBatch, decode, encode, prefix_end)

GRPC_NOT_FOUND, GRPC_OUT_OF_RANGE, GRPC_UNAVAILABLE = 5, 11, 14
COMPARE_TARGETS = {"create_revision": "CREATE", "version": "VERSION",
                   "mod_revision": "MOD", "value": "VALUE", "lease": "LEASE"}
# errors meaning "the keep-alive connection went away": reconnect and retry once
DROPPED = (http.client.RemoteDisconnected, http.client.CannotSendRequest,
           http.client.ResponseNotReady, http.client.IncompleteRead,
           ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _kv(d: dict) -> KV:
    return KV(decode(_unb64(d.get("key"))), decode(_unb64(d.get("value"))),
              int(d.get("create_revision", 0)), int(d.get("mod_revision", 0)),
              int(d.get("version", 0)), int(d.get("lease", 0)))


def _key_range(key: str, prefix: bool) -> dict:
    """``key``/``range_end`` for one key or a prefix ("" = everything, as etcdctl does)."""
    k = encode(key)
    if not prefix:
        return {"key": _b64(k)}
    end = prefix_end(k)
    return {"key": _b64(k or b"\0"), "range_end": _b64(end if end is not None else b"\0")}


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over an AF_UNIX stream socket."""

    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def parse_url(url: str) -> tuple[str, str, int]:
    """``etcd+http://h:p`` → ("tcp", h, p); ``etcd+unix:///path`` → ("unix", path, 0)."""
    parts = urlsplit(url)
    if parts.scheme == "etcd+unix":
        path = parts.netloc + parts.path if parts.netloc else parts.path
        if not path.startswith("/"):
            raise RegistryError(f"etcd unix URL needs an absolute socket path: {url!r}")
        return "unix", path, 0
    if parts.scheme == "etcd+http":
        host, _, port = parts.netloc.rpartition(":")
        if not host or not port.isdigit():
            raise RegistryError(f"etcd URL needs host:port: {url!r}")
        return "tcp", host.strip("[]"), int(port)
    raise RegistryError(f"not an etcd URL (etcd+http://host:port or etcd+unix:///path): {url!r}")


class EtcdRegistry(Registry):
    """A Registry backed by a real etcd server."""

    def __init__(self, url: str, *, timeout: float = 10.0, watch_reconnect_timeout: float = 10.0):
        self.url = url
        self.kind, self.host, self.port = parse_url(url)
        self.endpoint = f"unix://{self.host}" if self.kind == "unix" else f"http://{self.host}:{self.port}"
        self.timeout = timeout
        self.watch_reconnect_timeout = watch_reconnect_timeout
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self._watchers: list[EtcdWatcher] = []
        self._closed = False

    # --- plumbing -------------------------------------------------------------------------

    def new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.kind == "unix":
            return _UnixHTTPConnection(self.host, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _connection(self) -> http.client.HTTPConnection:
        if self._closed:
            raise RegistryError(f"registry {self.url} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.new_connection(self.timeout)
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._conns_lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def call(self, path: str, body: dict) -> dict:
        """POST ``body`` to a gateway ``path``; the decoded answer, or a typed error."""
        data = json.dumps(body).encode()
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("POST", path, data, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
            except (ConnectionRefusedError, FileNotFoundError) as err:
                self._drop()
                raise Unavailable(self.endpoint, f"connection refused ({err.strerror or err})") from err
            except DROPPED as err:
                # A stale keep-alive connection. The retry may repeat a request the server
                # already applied: harmless for put/delete; a repeated create-if-absent reports
                # a lost claim, and acquire_lease then finds the key as its own on the next pass.
                self._drop()
                if attempt == 2:
                    raise Unavailable(self.endpoint, f"connection dropped twice ({err!r})") from err
                continue
            except TimeoutError as err:
                self._drop()
                raise Unavailable(self.endpoint, f"no answer within {self.timeout:g}s") from err
            except OSError as err:
                self._drop()
                raise Unavailable(self.endpoint, str(err)) from err
            if resp.status != 200:
                raise self._error(resp.status, raw, body)
            answer = json.loads(raw)
            if isinstance(answer, dict) and answer.get("error") and "header" not in answer:
                raise self._error(resp.status, raw, body)
            return answer
        raise AssertionError("unreachable")

    def _error(self, status: int, raw: bytes, request: dict) -> RegistryError:
        try:
            err = json.loads(raw)
            code, message = err.get("code"), err.get("message") or err.get("error") or ""
        except ValueError:
            code, message = None, raw.decode("utf-8", "replace").strip()[:200]
        if code == GRPC_NOT_FOUND and "lease not found" in message:
            return LeaseNotFound(int(request.get("ID") or request.get("lease") or 0))
        if code == GRPC_OUT_OF_RANGE and "compacted" in message:
            return Compacted(0, int(request.get("revision") or 0))
        if code == GRPC_UNAVAILABLE or status == 503:
            return Unavailable(self.endpoint, message or f"HTTP {status}")
        return RegistryError(f"etcd {self.endpoint}: {message or f'HTTP {status}'}")

    @staticmethod
    def _rev(answer: dict) -> int:
        return int(answer.get("header", {}).get("revision", 0))

    # --- key/value ------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        kvs = self.call("/v3/kv/range", _key_range(key, False)).get("kvs")
        return _kv(kvs[0]) if kvs else None

    def range(self, prefix: str) -> RangeResult:
        answer = self.call("/v3/kv/range", _key_range(prefix, True))
        return RangeResult(self._rev(answer), tuple(_kv(d) for d in answer.get("kvs", ())))

    @staticmethod
    def _put_body(key: str, value: str, lease: int, prev_kv: bool) -> dict:
        body = {"key": _b64(encode(key)), "value": _b64(encode(value))}
        if lease:
            body["lease"] = str(lease)
        if prev_kv:
            body["prev_kv"] = True
        return body

    def put(self, key: str, value: str, lease: int = 0, prev_kv: bool = False) -> PutResult:
        answer = self.call("/v3/kv/put", self._put_body(key, value, lease, prev_kv))
        prev = answer.get("prev_kv")
        return PutResult(self._rev(answer), _kv(prev) if prev else None)

    @staticmethod
    def _delete_body(key: str, prefix: bool, prev_kv: bool) -> dict:
        body = _key_range(key, prefix)
        if prev_kv:
            body["prev_kv"] = True
        return body

    def delete(self, key: str, prefix: bool = False, prev_kv: bool = False) -> DeleteResult:
        answer = self.call("/v3/kv/deleterange", self._delete_body(key, prefix, prev_kv))
        return DeleteResult(self._rev(answer), int(answer.get("deleted", 0)),
                            tuple(_kv(d) for d in answer.get("prev_kvs", ())))

    def txn(self, compare: Sequence[Compare], success: Sequence[Op] = (),
            failure: Sequence[Op] = ()) -> TxnResult:
        body = {"compare": [self._compare(c) for c in compare],
                "success": [self._op(op) for op in success],
                "failure": [self._op(op) for op in failure]}
        answer = self.call("/v3/kv/txn", body)
        ok = bool(answer.get("succeeded", False))
        rev = self._rev(answer)
        ops = success if ok else failure
        results = tuple(self._op_result(op, resp, rev)
                        for op, resp in zip(ops, answer.get("responses", ())))
        return TxnResult(ok, rev, results)

    @staticmethod
    def _compare(c: Compare) -> dict:
        value = _b64(encode(c.value)) if c.target == "value" else str(int(c.value))
        return {"key": _b64(encode(c.key)), "target": COMPARE_TARGETS[c.target],
                "result": c.result, c.target: value}

    def _op(self, op: Op) -> dict:
        if isinstance(op, Put):
            return {"request_put": self._put_body(op.key, op.value, op.lease, op.prev_kv)}
        if isinstance(op, Delete):
            return {"request_delete_range": self._delete_body(op.key, op.prefix, op.prev_kv)}
        if isinstance(op, Range):
            return {"request_range": _key_range(op.key, op.prefix)}
        raise TypeError(f"not a txn op: {op!r}")

    @staticmethod
    def _op_result(op: Op, resp: dict, rev: int):
        if isinstance(op, Put):
            prev = resp.get("response_put", {}).get("prev_kv")
            return PutResult(rev, _kv(prev) if prev else None)
        if isinstance(op, Delete):
            d = resp.get("response_delete_range", {})
            return DeleteResult(rev, int(d.get("deleted", 0)), tuple(_kv(x) for x in d.get("prev_kvs", ())))
        return RangeResult(rev, tuple(_kv(x) for x in resp.get("response_range", {}).get("kvs", ())))

    def revision(self) -> int:
        return self._rev(self.call("/v3/kv/range", {"key": _b64(b"\0"), "count_only": True}))

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    # --- leases ---------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": str(int(ttl))})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        return int(self.call("/v3/lease/keepalive", {"ID": str(lease)}).get("result", {}).get("TTL", 0))

    def lease_time_to_live(self, lease: int) -> int:
        # TTL is "-1" for a lost lease; absent (proto3 default) when 0 seconds remain
        return int(self.call("/v3/lease/timetolive", {"ID": str(lease)}).get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})

    # --- watch ----------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int = 0, prev_kv: bool = True,
              timeout: float | None = None) -> Watcher:
        start = start_revision if start_revision > 0 else self.revision() + 1
        watcher = EtcdWatcher(self, _key_range(prefix, True), start, prev_kv, timeout)
        self._watchers = [w for w in self._watchers if not w.closed] + [watcher]
        return watcher

    def close(self) -> None:
        self._closed = True
        for watcher in self._watchers:
            watcher.close()
        self._watchers = []
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


class EtcdWatcher(Watcher):
    """One watch stream read by a daemon thread into a queue; see the module docstring."""

    def __init__(self, reg: EtcdRegistry, key_range: dict, start: int, prev_kv: bool,
                 timeout: float | None):
        super().__init__(timeout)
        self._reg = reg
        self._range = key_range
        self._next = start
        self._prev_kv = prev_kv
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {reg.endpoint}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def next_batch(self, timeout: float | None = None) -> WatchBatch | None:
        if self._stop.is_set():
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            self.close()
            raise item
        return None if self._stop.is_set() else item     # None in the queue: closed

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._drop_connection()
        self._queue.put(None)

    def _drop_connection(self) -> None:
        """Cut the stream (the reader thread reconnects unless closed)."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self) -> None:
        backoff, down_since = 0.05, None
        while not self._stop.is_set():
            try:
                self._stream()
                down_since = None                       # clean EOF: server closed the stream
            except _Finished:
                return
            except (OSError, http.client.HTTPException, ValueError, RegistryError) as err:
                if self._stop.is_set():
                    return
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self._reg.watch_reconnect_timeout:
                    self._queue.put(Unavailable(self._reg.endpoint, f"watch stream lost: {err}"))
                    return
            finally:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 1.0)

    def _stream(self) -> None:
        conn = self._conn = self._reg.new_connection(self._reg.timeout)
        conn.connect()
        if self._stop.is_set():
            raise _Finished
        conn.sock.settimeout(None)                      # a watch waits as long as it must
        body = {"create_request": {**self._range, "start_revision": str(self._next),
                                   "prev_kv": self._prev_kv}}
        conn.request("POST", "/v3/watch", json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise self._reg._error(resp.status, resp.read(), {})
        while True:
            line = resp.readline()
            if not line:
                return
            msg = json.loads(line)
            if "error" in msg:
                raise RegistryError(f"watch: {msg['error'].get('message', msg['error'])}")
            self._handle(msg.get("result", {}))

    def _handle(self, res: dict) -> None:
        if res.get("canceled"):
            compact = int(res.get("compact_revision", 0))
            if compact:
                self._queue.put(Compacted(compact, self._next))
                raise _Finished
            raise RegistryError(f"watch canceled: {res.get('cancel_reason', 'no reason given')}")
        events = res.get("events")
        if not events:
            return                                      # created / progress notification
        out = []
        for ev in events:
            kv = _kv(ev["kv"])
            prev = _kv(ev["prev_kv"]) if self._prev_kv and ev.get("prev_kv") else None
            out.append(Event("DELETE" if ev.get("type") == "DELETE" else "PUT", kv, prev))
        last = max(e.kv.mod_revision for e in out)
        self._next = last + 1
        self._queue.put(WatchBatch(last, tuple(out)))


class _Finished(Exception):
    """The watch ended for good (compacted or closed)."""
