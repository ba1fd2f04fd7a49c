"""The built-in pod server: one process per node serves the ports of every pod on it.

Each pod is a pinned network namespace (``/run/netns/<name>``). For every pod the
server enters that namespace with ``setns(2)``, creates and binds its listening
sockets there, and returns to its own namespace. A socket stays in the namespace it
was created in, so a single asyncio loop on a single thread serves all pods.
(``setns`` only moves the calling thread, so sockets are always made on the loop
thread and nothing here starts threads.)

Per declared container port the server binds ``0.0.0.0:<port>`` in the pod:

* TCP: if the first bytes received start an HTTP request line, it answers HTTP/1.1
  (keep-alive) like agnhost netexec: ``/hostname`` (pod name), ``/clientip``
  (``ip:port`` of the peer), ``/echo?msg=X``, ``/healthz``; anything else is 404.
  Otherwise the connection is a raw echo until the client closes.
* UDP: ``hostname`` -> pod name, ``clientip`` -> ``ip:port`` of the sender (a trailing
  newline is allowed), anything else is echoed back unchanged.

Usage::

    python -m netsim.agents.podserver --spec SPEC.json --control CONTROL.sock \\
        [--ready-file PATH] [--address 0.0.0.0] [--idle-timeout 30] [--max-connections 4096]

SPEC.json is ``{"node": "n1", "pods": [{"name", "namespace", "netns", "ports":
[{"port", "protocol", "name"}]}]}``; ``netns`` null means the server's own namespace.
The control socket speaks JSON lines: ``{"op": "add", "pod": {...}}``, ``{"op":
"remove", "name", "namespace"}``, ``{"op": "list"}``, ``{"op": "ping"}``; each reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": "<one line>"}``. Once every spec pod
has been tried, the ready file is written atomically (JSON: pid, node, pods served,
per-pod errors). SIGTERM/SIGINT close everything, remove the control socket and the
ready file, and exit 0.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and "ssl" not in sys.modules:
    # Run as the server: it never uses TLS, so keep asyncio from loading OpenSSL (~4 MB RSS).
    sys.modules["ssl"] = None   # type: ignore[assignment]

import argparse
import asyncio
import errno
import json
import os
import re
import signal
import socket
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from netsim.errors import NetsimError

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
PROTOCOLS = ("TCP", "UDP")

IDLE_TIMEOUT = 30.0            # seconds without data before a TCP connection is closed
MAX_CONNECTIONS = 4096         # open TCP connections, all pods together
MAX_HEADER_BYTES = 16 * 1024   # request line + headers of one HTTP request
MAX_BODY_BYTES = 1024 * 1024   # request bodies are read and discarded
MAX_UDP_BACKLOG = 256 * 1024   # queued UDP replies per socket before dropping
MAX_CONTROL_LINE = 1024 * 1024
LISTEN_BACKLOG = 4096           # as Go servers (agnhost) ask: somaxconn; 128 overflowed under connection benchmarks

HTTP_METHODS = frozenset(
    b"GET HEAD POST PUT DELETE OPTIONS PATCH TRACE CONNECT".split())
HEAD_END = re.compile(rb"\r?\n\r?\n")
REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Content Too Large",
    431: "Request Header Fields Too Large", 501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


class PodServerError(NetsimError):
    """An expected failure (bad spec, missing netns, port in use); ``str()`` is one line."""


def log(message: str) -> None:
    """Print one line to stderr, prefixed so that mixed logs stay readable."""
    print(f"podserver: {message}", file=sys.stderr, flush=True)


# --- spec ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PortSpec:
    """One container port to serve."""

    port: int
    protocol: str = "TCP"
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "protocol": self.protocol, "name": self.name}


@dataclass(frozen=True)
class PodSpec:
    """One pod: its identity, its network namespace (None = ours) and its ports."""

    name: str
    namespace: str
    netns: str | None
    ports: tuple[PortSpec, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "netns": self.netns,
                "ports": [p.to_json() for p in self.ports]}

    @classmethod
    def from_json(cls, obj: Any) -> PodSpec:
        """Validate one pod object; raises PodServerError naming the bad field."""
        if not isinstance(obj, dict):
            raise PodServerError("pod must be an object")
        name, namespace = obj.get("name"), obj.get("namespace", "default")
        if not isinstance(name, str) or not name:
            raise PodServerError("pod.name must be a non-empty string")
        if not isinstance(namespace, str) or not namespace:
            raise PodServerError(f"pod {name}: namespace must be a non-empty string")
        where = f"pod {namespace}/{name}"
        netns = obj.get("netns")
        if netns is not None and (not isinstance(netns, str) or not netns
                                  or "/" in netns or netns in (".", "..")):
            raise PodServerError(f"{where}: netns must be a name under {NETNS_RUN_DIR} or null")
        raw_ports = obj.get("ports") or []
        if not isinstance(raw_ports, list):
            raise PodServerError(f"{where}: ports must be a list")
        ports = tuple(_port_from_json(p, f"{where}: ports[{i}]") for i, p in enumerate(raw_ports))
        seen = set()
        for p in ports:
            if (p.port, p.protocol) in seen:
                raise PodServerError(f"{where}: port {p.port}/{p.protocol} is declared twice")
            seen.add((p.port, p.protocol))
        return cls(name, namespace, netns, ports)


def _port_from_json(obj: Any, where: str) -> PortSpec:
    if not isinstance(obj, dict):
        raise PodServerError(f"{where} must be an object")
    port = obj.get("port", obj.get("containerPort"))
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise PodServerError(f"{where}.port must be an integer 1-65535, got {port!r}")
    protocol = obj.get("protocol") or "TCP"
    if not isinstance(protocol, str) or protocol.upper() not in PROTOCOLS:
        raise PodServerError(f"{where}.protocol {protocol!r} is not served (TCP or UDP only)")
    name = obj.get("name")
    if name is not None and not isinstance(name, str):
        raise PodServerError(f"{where}.name must be a string")
    return PortSpec(port, protocol.upper(), name)


def load_spec(path: str) -> tuple[str, list[Any]]:
    """Read SPEC.json; returns the node name and the raw pod objects (validated later,
    one by one, so that one bad pod does not stop the others)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise PodServerError(f"cannot read spec {path}: {e.strerror}") from None
    except ValueError as e:
        raise PodServerError(f"spec {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("pods", []), list):
        raise PodServerError(f"spec {path} must be an object with a 'pods' list")
    return str(data.get("node") or ""), list(data.get("pods") or [])


# --- network namespaces and sockets ----------------------------------------------------

class NetnsSwitch:
    """Moves the calling thread into a named network namespace and back again."""

    def __init__(self) -> None:
        self._libc: Any = None
        self._home = -1

    def _setup(self) -> None:
        # Lazy: a server whose pods all use its own namespace never loads ctypes.
        import ctypes
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._ctypes = ctypes
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def _setns(self, fd: int) -> int:
        if self._libc.setns(fd, CLONE_NEWNET) == 0:
            return 0
        return self._ctypes.get_errno()

    @contextmanager
    def entered(self, netns: str | None) -> Iterator[None]:
        """Run the body inside ``/run/netns/<netns>`` (or where we are, for None)."""
        if netns is None:
            yield
            return
        if self._libc is None:
            self._setup()
        path = os.path.join(NETNS_RUN_DIR, netns)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PodServerError(f"netns {netns} not found ({path})") from None
        except OSError as e:
            raise PodServerError(f"netns {netns}: {e.strerror}") from None
        try:
            err = self._setns(fd)
            if err:
                reason = "not a network namespace" if err == errno.EINVAL else os.strerror(err)
                raise PodServerError(f"cannot enter netns {netns}: {reason}")
            try:
                yield
            finally:
                self._go_home()
        finally:
            os.close(fd)

    def _go_home(self) -> None:
        err = self._setns(self._home)
        if err:
            # Continuing would bind later pods in the wrong namespace.
            log(f"fatal: cannot return to own network namespace: {os.strerror(err)}")
            raise SystemExit(1)


def bind_socket(port: PortSpec, address: str) -> socket.socket:
    """A bound, non-blocking socket for ``port`` in the current namespace (listening if TCP)."""
    tcp = port.protocol == "TCP"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        if tcp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port.port))
        if tcp:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        reason = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise PodServerError(f"{port.protocol} {address}:{port.port}: {reason}") from None
    return sock


def format_peer(addr: Any) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6), as Go's RemoteAddr prints it."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return str(addr)
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- HTTP ------------------------------------------------------------------------------

class HttpError(Exception):
    """A request that gets an error status and then the connection is closed."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    keep_alive: bool
    body_length: int
    expect_continue: bool


def looks_like_http(data: bytes) -> bool:
    """True if the first chunk starts with ``<METHOD> `` (decides HTTP vs raw echo)."""
    method, sep, _ = data[:8].partition(b" ")
    return bool(sep) and method in HTTP_METHODS


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (without the blank line); raises HttpError."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[1]:
        raise HttpError(400)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505 if version.startswith("HTTP/") else 400)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400)
        name, value = name.lower(), value.strip()
        if name == "content-length" and headers.get(name, value) != value:
            raise HttpError(400)
        headers[name] = value
    if "transfer-encoding" in headers:
        raise HttpError(501)
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise HttpError(400)
    if int(length) > MAX_BODY_BYTES:
        raise HttpError(413)
    connection = headers.get("connection", "").lower()
    keep_alive = ("close" not in connection if version == "HTTP/1.1"
                  else "keep-alive" in connection)
    expect = headers.get("expect", "").lower() == "100-continue"
    return Request(method, target, keep_alive, int(length), expect)


def route(target: str, pod_name: str, peer: str) -> tuple[int, str]:
    """Status and body for a request target, like agnhost netexec."""
    from urllib.parse import parse_qs, urlsplit   # only loaded once HTTP is used
    parts = urlsplit(target)
    path = parts.path
    if path == "/hostname":
        return 200, pod_name
    if path == "/clientip":
        return 200, peer
    if path == "/echo":
        return 200, parse_qs(parts.query, keep_blank_values=True).get("msg", [""])[0]
    if path == "/healthz":
        return 200, "ok"
    return 404, "404 page not found\n"


def http_response(status: int, body: str, keep_alive: bool, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response with Content-Length."""
    data = body.encode()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode() + (b"" if head_only else data)


# --- protocols -------------------------------------------------------------------------

class TcpConnection(asyncio.Protocol):
    """One accepted TCP connection: HTTP or raw echo, decided on the first chunk."""

    def __init__(self, pod: ServedPod):
        self.pod = pod
        self.transport: asyncio.Transport | None = None
        self.mode = ""                  # "", "http" or "echo"
        self.buf = bytearray()
        self.discard = 0                # body bytes of the pending request still to skip
        self.pending: Request | None = None
        self.closing = False
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport      # type: ignore[assignment]
        owner = self.pod.owner
        if owner.connections >= owner.max_connections:
            transport.abort()
            return
        owner.connections += 1
        self.pod.conns.add(self)
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        self.timer = loop.call_later(owner.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pod.conns:
            self.pod.conns.discard(self)
            self.pod.owner.connections -= 1
        if self.timer:
            self.timer.cancel()
        self.buf = bytearray()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        left = self.last + self.pod.owner.idle_timeout - loop.time()
        if left <= 0:
            self.transport.abort()
        else:
            self.timer = loop.call_later(left, self._check_idle)

    # Flow control: stop reading while the peer is not reading our replies.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False                    # the client closed: close after flushing

    def data_received(self, data: bytes) -> None:
        self.last = asyncio.get_running_loop().time()
        if not self.mode:
            self.mode = "http" if looks_like_http(data) else "echo"
        if self.mode == "echo":
            self.transport.write(data)
        elif not self.closing:
            self.buf += data
            self._serve_http()

    def _serve_http(self) -> None:
        """Answer every complete request in the buffer (pipelining keeps order)."""
        while not self.closing:
            if self.pending is not None:
                taken = min(self.discard, len(self.buf))
                del self.buf[:taken]
                self.discard -= taken
                if self.discard:
                    return
                request, self.pending = self.pending, None
                self._answer(request)
                continue
            match = HEAD_END.search(self.buf, 0, MAX_HEADER_BYTES + 4)
            if match is None:
                if len(self.buf) > MAX_HEADER_BYTES:
                    self._fail(431)
                return
            head = bytes(self.buf[:match.start()])
            del self.buf[:match.end()]
            try:
                request = parse_head(head)
            except HttpError as e:
                self._fail(e.status)
                return
            if request.expect_continue and request.body_length:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.pending, self.discard = request, request.body_length

    def _answer(self, request: Request) -> None:
        peer = format_peer(self.transport.get_extra_info("peername"))
        status, body = route(request.target, self.pod.spec.name, peer)
        self.transport.write(http_response(status, body, request.keep_alive,
                                           head_only=request.method == "HEAD"))
        if not request.keep_alive:
            self._close()

    def _fail(self, status: int) -> None:
        self.transport.write(http_response(status, REASONS.get(status, "error") + "\n", False))
        self._close()

    def _close(self) -> None:
        self.closing = True
        self.buf = bytearray()
        self.transport.close()


class UdpResponder(asyncio.DatagramProtocol):
    """Answers datagrams on one UDP port: hostname, clientip or echo."""

    def __init__(self, pod_name: str):
        self.name = pod_name.encode()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport      # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        command = data.rstrip(b"\r\n")
        if command == b"hostname":
            reply = self.name
        elif command == b"clientip":
            reply = format_peer(addr).encode()
        else:
            reply = data
        if self.transport.get_write_buffer_size() < MAX_UDP_BACKLOG:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass                            # e.g. ICMP port unreachable from a gone client


# --- the server ------------------------------------------------------------------------

class ServedPod:
    """The open sockets of one pod and its live TCP connections."""

    def __init__(self, spec: PodSpec, owner: PodServer):
        self.spec = spec
        self.owner = owner
        self.servers: list[asyncio.AbstractServer] = []
        self.udp: list[asyncio.BaseTransport] = []
        self.conns: set[TcpConnection] = set()
        self.starting = True

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for transport in self.udp:
            transport.close()
        for conn in list(self.conns):
            conn.transport.abort()
        self.servers, self.udp = [], []


class PodServer:
    """All pods of one node, keyed by (namespace, name)."""

    def __init__(self, node: str, address: str = "0.0.0.0",
                 idle_timeout: float = IDLE_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
        self.node = node
        self.address = address
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections = 0
        self.pods: dict[tuple[str, str], ServedPod] = {}
        self.netns = NetnsSwitch()

    def bind_pod(self, spec: PodSpec) -> list[tuple[PortSpec, socket.socket]]:
        """Create all sockets of a pod inside its namespace; all or nothing."""
        sockets: list[tuple[PortSpec, socket.socket]] = []
        try:
            with self.netns.entered(spec.netns):
                for port in spec.ports:
                    sockets.append((port, bind_socket(port, self.address)))
        except BaseException:
            for _, sock in sockets:
                sock.close()
            raise
        return sockets

    async def add(self, spec: PodSpec) -> None:
        """Serve a pod; raises PodServerError (and keeps nothing open) on failure."""
        if spec.key in self.pods:
            raise PodServerError(f"pod {spec.label} is already served")
        served = ServedPod(spec, self)
        self.pods[spec.key] = served            # reserved while the sockets are wrapped
        try:
            sockets = self.bind_pod(spec)
            await self._wrap(served, sockets)
        except BaseException as e:
            del self.pods[spec.key]
            served.close()
            if isinstance(e, PodServerError):
                raise PodServerError(f"pod {spec.label}: {e}") from None
            raise
        served.starting = False

    async def _wrap(self, served: ServedPod, sockets: list[tuple[PortSpec, socket.socket]]) -> None:
        loop = asyncio.get_running_loop()
        name = served.spec.name
        while sockets:
            port, sock = sockets[0]
            try:
                if port.protocol == "TCP":
                    server = await loop.create_server(lambda: TcpConnection(served), sock=sock,
                                                      backlog=LISTEN_BACKLOG)
                    served.servers.append(server)
                else:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: UdpResponder(name), sock=sock)
                    served.udp.append(transport)
            except BaseException:
                for _, other in sockets:
                    other.close()
                raise
            sockets.pop(0)

    def remove(self, namespace: str, name: str) -> None:
        """Close a pod's sockets and connections."""
        served = self.pods.get((namespace, name))
        if served is None:
            raise PodServerError(f"pod {namespace}/{name} is not served")
        if served.starting:
            raise PodServerError(f"pod {namespace}/{name} is still starting; retry")
        del self.pods[(namespace, name)]
        served.close()

    def close_all(self) -> None:
        for served in self.pods.values():
            served.close()
        self.pods.clear()

    def listing(self) -> list[dict[str, Any]]:
        return [p.spec.to_json() for p in self.pods.values() if not p.starting]

    async def add_all(self, raw_pods: list[Any]) -> list[dict[str, str]]:
        """Serve every spec pod; returns one error entry per pod that failed."""
        errors = []
        for i, raw in enumerate(raw_pods):
            try:
                await self.add(PodSpec.from_json(raw))
            except PodServerError as e:
                log(f"not served: {e}")
                errors.append({"pod": _raw_label(raw, i), "error": str(e)})
        return errors

    # control protocol

    async def handle(self, request: Any) -> dict[str, Any]:
        """Answer one control request."""
        if not isinstance(request, dict):
            raise PodServerError("request must be a JSON object")
        op = request.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "list":
            return {"ok": True, "node": self.node, "pods": self.listing()}
        if op == "add":
            await self.add(PodSpec.from_json(request.get("pod")))
            return {"ok": True}
        if op == "remove":
            name, namespace = request.get("name"), request.get("namespace", "default")
            if not isinstance(name, str) or not isinstance(namespace, str):
                raise PodServerError("remove needs 'name' (and optionally 'namespace') strings")
            self.remove(namespace, name)
            return {"ok": True}
        raise PodServerError(f"unknown op {op!r} (expected add, remove, list or ping)")

    async def answer_line(self, line: bytes) -> dict[str, Any]:
        """Decode one JSON line and answer it; never raises for bad input."""
        try:
            request = json.loads(line)
        except ValueError as e:
            return {"ok": False, "error": f"invalid JSON: {e}"}
        try:
            return await self.handle(request)
        except PodServerError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:         # a bug: report it, keep serving the other pods
            log(f"internal error on {line[:200]!r}: {type(e).__name__}: {e}")
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    async def control_client(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        """Serve one control connection: a JSON request per line, a JSON reply per line."""
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    writer.write(b'{"ok": false, "error": "request line too long"}\n')
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                reply = await self.answer_line(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def _raw_label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return f"{raw.get('namespace', 'default')}/{raw['name']}"
    return f"pods[{index}]"


# --- files -----------------------------------------------------------------------------

async def open_control(path: str, handler: Any) -> tuple[asyncio.AbstractServer, int]:
    """Listen on the control socket; replaces a stale one, refuses a live one.
    Returns the server and the socket file's inode (to remove only our own file)."""
    try:
        _clear_stale_socket(path)
        server = await asyncio.start_unix_server(handler, path=path, limit=MAX_CONTROL_LINE)
        os.chmod(path, 0o600)
        return server, os.stat(path).st_ino
    except OSError as e:
        raise PodServerError(f"cannot listen on control socket {path}: {e.strerror or e}") from None


def _clear_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise PodServerError(f"control path {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)             # left behind by a killed server
            return
    raise PodServerError(f"control socket {path} is in use by another server")


def remove_own_socket(path: str, inode: int) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def write_ready(path: str, content: dict[str, Any]) -> None:
    """Write the ready file atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(content) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        remove_file(tmp)
        raise PodServerError(f"cannot write ready file {path}: {e.strerror or e}") from None


def remove_file(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def raise_fd_limit() -> None:
    """Allow many sockets (two per pod plus connections) by raising the soft fd limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


# --- main ------------------------------------------------------------------------------

async def serve(args: argparse.Namespace, node: str, raw_pods: list[Any]) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = PodServer(node, args.address, args.idle_timeout, args.max_connections)
    remove_file(args.ready_file)
    control, inode = await open_control(args.control, server.control_client)
    try:
        errors = await server.add_all(raw_pods)
        if args.ready_file:
            write_ready(args.ready_file, {"pid": os.getpid(), "node": node,
                                          "pods": len(server.pods), "errors": errors})
        log(f"node {node or '?'}: serving {len(server.pods)} pods"
            + (f", {len(errors)} failed" if errors else ""))
        await stop.wait()
    finally:
        control.close()
        remove_own_socket(args.control, inode)
        server.close_all()
        remove_file(args.ready_file)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m netsim.agents.podserver",
        description="Serve the container ports of every pod of one node from one process.")
    parser.add_argument("--spec", required=True, help="JSON file: {node, pods: [...]}")
    parser.add_argument("--control", required=True, help="path of the control Unix socket")
    parser.add_argument("--ready-file", help="written (atomically) once the spec pods are served")
    parser.add_argument("--address", default="0.0.0.0",
                        help="address to bind in each pod's namespace (default 0.0.0.0)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                        help="close TCP connections idle this many seconds (default 30)")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help="open TCP connections, all pods together (default 4096)")
    args = parser.parse_args(argv)
    if args.idle_timeout <= 0 or args.max_connections <= 0:
        parser.error("--idle-timeout and --max-connections must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        node, raw_pods = load_spec(args.spec)
        raise_fd_limit()
        return asyncio.run(serve(args, node, raw_pods))
    except PodServerError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:           # SIGINT before the handlers were installed
        return 0


if __name__ == "__main__":
    sys.exit(main())
