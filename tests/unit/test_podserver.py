"""The pod server on loopback: pods with ``netns: null`` bound to 127.0.0.1 (no root needed).

The server runs as a subprocess, as netsim launches it; tests poll for readiness (the
ready file) and for every other condition instead of sleeping.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netsim.agents.podserver import (
    HttpError, PodServerError, PodSpec, looks_like_http, parse_head, route)

TIMEOUT = 10.0


# --- helpers ---------------------------------------------------------------------------

def wait_for(condition, what: str, timeout: float = TIMEOUT, interval: float = 0.02):
    """Poll ``condition`` until it returns a truthy value; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


_TAKEN: set[int] = set()


def free_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1, below the ephemeral range (so no
    client connection can grab it between the check and the server's bind)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(20000, max(low, 20001))
        if port not in _TAKEN and _bindable(port):
            _TAKEN.add(port)
            return port
    raise RuntimeError("no free port found")


def pod(name: str, *ports: tuple[int, str], netns: str | None = None) -> dict:
    return {"name": name, "namespace": "default", "netns": netns,
            "ports": [{"port": p, "protocol": proto} for p, proto in ports]}


class Server:
    """A running pod server subprocess plus its files."""

    def __init__(self, tmp: Path, pods: list[dict], *extra: str):
        self.spec = tmp / "spec.json"
        self.control = tmp / "control.sock"
        self.ready = tmp / "ready.json"
        self.stderr = tmp / "stderr.log"
        self.spec.write_text(json.dumps({"node": "n1", "pods": pods}))
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "netsim.agents.podserver", "--spec", str(self.spec),
                 "--control", str(self.control), "--ready-file", str(self.ready),
                 "--address", "127.0.0.1", *extra],
                stdout=subprocess.DEVNULL, stderr=err)

    def wait_ready(self) -> dict:
        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"server exited {self.proc.returncode}: {self.stderr.read_text()}")
            return self.ready.exists()
        wait_for(ready, "the ready file")
        return json.loads(self.ready.read_text())

    def control_session(self) -> Control:
        return Control(self.control)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()                 # by PID, through Popen
                self.proc.wait()
        return self.proc.returncode


class Control:
    """A JSON-lines client for the control socket."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")

    def send_raw(self, line: bytes) -> dict:
        self.file.write(line + b"\n")
        self.file.flush()
        return json.loads(self.file.readline())

    def __call__(self, **request) -> dict:
        return self.send_raw(json.dumps(request).encode())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def ports():
    return {"tcp": free_port(), "udp": free_port(), "spare": free_port()}


@pytest.fixture
def server(tmp_path, ports):
    srv = Server(tmp_path, [pod("web-0", (ports["tcp"], "TCP"), (ports["udp"], "UDP"))])
    srv.wait_ready()
    yield srv
    srv.stop()


def http_get(port: int, path: str, method: str = "GET", **kw):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request(method, path, **kw)
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, body


def udp_ask(port: int, data: bytes) -> tuple[bytes, tuple]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(("127.0.0.1", port))
        s.send(data)
        return s.recv(65535), s.getsockname()


def tcp_connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


# --- pure functions --------------------------------------------------------------------

def test_looks_like_http():
    assert looks_like_http(b"GET / HTTP/1.1\r\n")
    assert looks_like_http(b"OPTIONS * HTTP/1.1\r\n")
    assert not looks_like_http(b"GETX / HTTP/1.1")
    assert not looks_like_http(b"hello")
    assert not looks_like_http(b"GET")


def test_parse_head():
    req = parse_head(b"POST /echo?msg=a HTTP/1.1\r\nHost: x\r\nContent-Length: 3")
    assert (req.method, req.target, req.keep_alive, req.body_length) == ("POST", "/echo?msg=a", True, 3)
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive
    assert not parse_head(b"GET / HTTP/1.0").keep_alive
    assert parse_head(b"GET / HTTP/1.0\nConnection: Keep-Alive").keep_alive
    for head, status in [(b"GET /", 400), (b"GET / HTTP/2.0", 505), (b"GET / HTTP/1.1\r\nbad", 400),
                         (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked", 501),
                         (b"GET / HTTP/1.1\r\nContent-Length: 99999999", 413),
                         (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", 400)]:
        with pytest.raises(HttpError) as err:
            parse_head(head)
        assert err.value.status == status, head


def test_route():
    assert route("/hostname", "web-0", "1.2.3.4:5") == (200, "web-0")
    assert route("/clientip", "web-0", "1.2.3.4:5") == (200, "1.2.3.4:5")
    assert route("/echo?msg=a%20b", "w", "") == (200, "a b")
    assert route("http://h:1/healthz", "w", "") == (200, "ok")
    assert route("/nope", "w", "")[0] == 404


@pytest.mark.parametrize("obj, message", [
    ({"namespace": "d"}, "pod.name"),
    ({"name": "p", "netns": "../x"}, "netns must be"),
    ({"name": "p", "ports": [{"port": 0}]}, "ports[0].port must be an integer 1-65535"),
    ({"name": "p", "ports": [{"port": 80, "protocol": "SCTP"}]}, "TCP or UDP only"),
    ({"name": "p", "ports": [{"port": 80}, {"port": 80, "protocol": "tcp"}]}, "declared twice"),
])
def test_podspec_errors(obj, message):
    with pytest.raises(PodServerError) as err:
        PodSpec.from_json(obj)
    assert message in str(err.value)


def test_podspec_defaults():
    spec = PodSpec.from_json({"name": "p", "ports": [{"containerPort": 53, "protocol": "udp"},
                                                     {"port": 80}]})
    assert spec.namespace == "default" and spec.netns is None
    assert [(p.port, p.protocol) for p in spec.ports] == [(53, "UDP"), (80, "TCP")]


# --- HTTP ------------------------------------------------------------------------------

def test_ready_file(server):
    ready = json.loads(server.ready.read_text())
    assert ready["pid"] == server.proc.pid
    assert ready["node"] == "n1" and ready["pods"] == 1 and ready["errors"] == []


def test_http_hostname(server, ports):
    assert http_get(ports["tcp"], "/hostname") == (200, "web-0")


def test_http_clientip_is_the_clients_address(server, ports):
    conn = http.client.HTTPConnection("127.0.0.1", ports["tcp"], timeout=TIMEOUT)
    conn.connect()
    ip, port = conn.sock.getsockname()
    conn.request("GET", "/clientip")
    resp = conn.getresponse()
    assert (resp.status, resp.read().decode()) == (200, f"{ip}:{port}")
    conn.close()


def test_http_echo_healthz_and_404(server, ports):
    assert http_get(ports["tcp"], "/echo?msg=hello%20world") == (200, "hello world")
    assert http_get(ports["tcp"], "/echo") == (200, "")
    assert http_get(ports["tcp"], "/healthz") == (200, "ok")
    status, _ = http_get(ports["tcp"], "/nope")
    assert status == 404


def test_http_head_has_length_but_no_body(server, ports):
    s = tcp_connect(ports["tcp"])
    s.sendall(b"HEAD /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = recv_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 5\r\n" in reply and reply.endswith(b"\r\n\r\n")


def test_http_keep_alive_and_post_body(server, ports):
    conn = http.client.HTTPConnection("127.0.0.1", ports["tcp"], timeout=TIMEOUT)
    conn.request("POST", "/echo?msg=one", body=b"x" * 5000)
    first = conn.getresponse().read()
    sock = conn.sock
    conn.request("GET", "/hostname")
    second = conn.getresponse().read()
    assert (first, second) == (b"one", b"web-0")
    assert conn.sock is sock                      # the same connection was reused
    conn.close()


def test_http_pipelined_requests_answered_in_order(server, ports):
    s = tcp_connect(ports["tcp"])
    s.sendall(b"GET /echo?msg=a HTTP/1.1\r\n\r\nGET /echo?msg=b HTTP/1.1\r\n\r\n"
              b"GET /hostname HTTP/1.1\r\nConnection: close\r\n\r\n")
    reply = recv_all(s)
    s.close()
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in reply.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"a", b"b", b"web-0"]


def test_http_header_too_large_is_refused(server, ports):
    s = tcp_connect(ports["tcp"])
    s.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000)
    reply = recv_all(s)                           # the server closes the connection
    s.close()
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_curl(server, ports):
    curl = "/usr/bin/curl"
    if not os.path.exists(curl):
        pytest.skip("curl not installed")
    out = subprocess.run([curl, "-s", "--max-time", "5", f"http://127.0.0.1:{ports['tcp']}/hostname",
                          f"http://127.0.0.1:{ports['tcp']}/echo?msg=x"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.stdout == "web-0x"


# --- raw TCP echo ----------------------------------------------------------------------

def test_tcp_echo(server, ports):
    s = tcp_connect(ports["tcp"])
    s.sendall(b"hel")
    assert recv_exactly(s, 3) == b"hel"          # decided on the first chunk, no newline needed
    payload = bytes(range(256)) * 400
    s.sendall(payload)
    assert recv_exactly(s, len(payload)) == payload
    request = b"GET /hostname HTTP/1.1\r\n\r\n"
    s.sendall(request)                            # later chunks are echoed, not parsed
    assert recv_exactly(s, len(request)) == request
    s.shutdown(socket.SHUT_WR)
    assert s.recv(10) == b""                      # closed after the client closed
    s.close()


def test_idle_connection_is_closed(tmp_path, ports):
    srv = Server(tmp_path, [pod("web-0", (ports["tcp"], "TCP"))], "--idle-timeout", "0.3")
    try:
        srv.wait_ready()
        s = tcp_connect(ports["tcp"])
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        start = time.monotonic()
        assert s.recv(10) == b""                  # blocks until the server closes it
        assert time.monotonic() - start < 5
        s.close()
    finally:
        assert srv.stop() == 0


# --- UDP -------------------------------------------------------------------------------

def test_udp_hostname(server, ports):
    assert udp_ask(ports["udp"], b"hostname")[0] == b"web-0"
    assert udp_ask(ports["udp"], b"hostname\n")[0] == b"web-0"


def test_udp_clientip_is_the_senders_address(server, ports):
    reply, (ip, port) = udp_ask(ports["udp"], b"clientip\n")
    assert reply == f"{ip}:{port}".encode()


def test_udp_echo(server, ports):
    data = b"\x00some bytes\nhostname"
    assert udp_ask(ports["udp"], data)[0] == data


def test_udp_port_is_not_tcp(server, ports):
    with pytest.raises(ConnectionRefusedError):
        tcp_connect(ports["udp"])


# --- control socket ----------------------------------------------------------------------

def test_control_ping_list(server, ports):
    ctl = server.control_session()
    assert ctl(op="ping") == {"ok": True}
    listing = ctl(op="list")
    assert listing["ok"] and listing["node"] == "n1"
    assert listing["pods"] == [{"name": "web-0", "namespace": "default", "netns": None, "ports": [
        {"port": ports["tcp"], "protocol": "TCP", "name": None},
        {"port": ports["udp"], "protocol": "UDP", "name": None}]}]
    ctl.close()


def test_control_add_and_remove(server, ports):
    ctl = server.control_session()
    spare = ports["spare"]
    assert ctl(op="add", pod=pod("api-0", (spare, "TCP"), (spare, "UDP"))) == {"ok": True}
    assert http_get(spare, "/hostname") == (200, "api-0")
    assert udp_ask(spare, b"hostname")[0] == b"api-0"
    assert [p["name"] for p in ctl(op="list")["pods"]] == ["web-0", "api-0"]

    kept = tcp_connect(spare)                     # open connections are closed on remove
    kept.sendall(b"x")
    assert recv_exactly(kept, 1) == b"x"
    assert ctl(op="remove", name="api-0", namespace="default") == {"ok": True}
    assert kept.recv(10) == b""
    kept.close()
    with pytest.raises(ConnectionRefusedError):
        tcp_connect(spare)
    assert [p["name"] for p in ctl(op="list")["pods"]] == ["web-0"]
    ctl.close()


def test_control_errors_keep_the_server_running(server, ports):
    ctl = server.control_session()
    cases = [
        (dict(op="add", pod=pod("web-0")), "already served"),
        (dict(op="add", pod=pod("dup", (ports["tcp"], "TCP"))), "already in use"),
        (dict(op="add", pod=pod("gone", (ports["spare"], "TCP"), netns="nstest-ps-missing")),
         "not found"),
        (dict(op="add", pod={"name": "p", "ports": [{"port": "x"}]}), "must be an integer"),
        (dict(op="remove", name="nobody"), "not served"),
        (dict(op="frobnicate"), "unknown op"),
    ]
    for request, message in cases:
        reply = ctl(**request)
        assert reply["ok"] is False and message in reply["error"], (request, reply)
        assert "\n" not in reply["error"]
    assert ctl.send_raw(b"{not json")["ok"] is False
    assert ctl.send_raw(b"[1, 2]")["ok"] is False
    # a failed add keeps nothing: the spare port is still free, web-0 still serves
    assert _bindable(ports["spare"])
    assert ctl(op="ping") == {"ok": True}
    assert http_get(ports["tcp"], "/hostname") == (200, "web-0")
    ctl.close()


def test_pod_without_ports_and_failed_spec_pods(tmp_path, ports):
    srv = Server(tmp_path, [pod("idle-0"),
                            pod("gone-0", (ports["spare"], "TCP"), netns="nstest-ps-missing"),
                            pod("web-0", (ports["tcp"], "TCP"))])
    try:
        ready = srv.wait_ready()
        assert ready["pods"] == 2
        assert [e["pod"] for e in ready["errors"]] == ["default/gone-0"]
        assert "nstest-ps-missing not found" in ready["errors"][0]["error"]
        ctl = srv.control_session()
        pods = {p["name"]: p["ports"] for p in ctl(op="list")["pods"]}
        assert pods == {"idle-0": [], "web-0": [{"port": ports["tcp"], "protocol": "TCP", "name": None}]}
        ctl.close()
        assert http_get(ports["tcp"], "/hostname") == (200, "web-0")
    finally:
        assert srv.stop() == 0
    err = srv.stderr.read_text()
    assert "Traceback" not in err and "nstest-ps-missing not found" in err


# --- lifecycle -------------------------------------------------------------------------

def test_sigterm_cleans_up(tmp_path, ports):
    srv = Server(tmp_path, [pod("web-0", (ports["tcp"], "TCP"), (ports["udp"], "UDP"))])
    srv.wait_ready()
    assert srv.control.exists()
    assert srv.stop() == 0
    assert not srv.control.exists() and not srv.ready.exists()
    assert _bindable(ports["tcp"]) and _bindable(ports["udp"])
    assert "Traceback" not in srv.stderr.read_text()


def test_sigint_exits_zero(tmp_path, ports):
    srv = Server(tmp_path, [pod("web-0", (ports["tcp"], "TCP"))])
    srv.wait_ready()
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(TIMEOUT) == 0
    assert not srv.control.exists()


def test_stale_control_socket_is_replaced(tmp_path, ports):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "control.sock"))    # bound but not listening: a dead server's
    stale.close()
    srv = Server(tmp_path, [pod("web-0", (ports["tcp"], "TCP"))])
    try:
        srv.wait_ready()
        ctl = srv.control_session()
        assert ctl(op="ping") == {"ok": True}
        ctl.close()
    finally:
        assert srv.stop() == 0


def test_bad_spec_exits_2_with_one_line(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("{oops")
    out = subprocess.run([sys.executable, "-m", "netsim.agents.podserver", "--spec", str(spec),
                          "--control", str(tmp_path / "c.sock")],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2
    assert "not valid JSON" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
