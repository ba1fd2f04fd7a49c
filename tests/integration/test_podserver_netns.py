"""The pod server with real network namespaces (root only).

Two namespaces ``nstest-ps-a`` (10.199.0.1) and ``nstest-ps-b`` (10.199.0.2) are joined
by a veth pair; the server binds a pod's ports inside ``nstest-ps-b`` and clients run in
``nstest-ps-a`` through ``ip netns exec``. A scale test serves 500 pods
(``nstest-ps-<i>``) and reports the server's RSS and start-up time.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                       reason="needs root and a Linux kernel (network namespaces)"),
]

NS_A, NS_B = "nstest-ps-a", "nstest-ps-b"
IP_A, IP_B = "10.199.0.1", "10.199.0.2"
PORT = 8080
TIMEOUT = 10.0
SCALE = 500

UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(sys.argv[3].encode())
print(s.recv(65535).decode(), s.getsockname()[1], sep="\\n", end="")
"""


# --- helpers ---------------------------------------------------------------------------

def ip(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True,
                          check=check, timeout=60)


def in_netns(ns: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=TIMEOUT)


def curl(ns: str, url: str) -> str:
    out = in_netns(ns, "curl", "-sS", "--max-time", "5", url)
    assert out.returncode == 0, out.stderr
    return out.stdout


def udp_ask(ns: str, host: str, port: int, message: str) -> tuple[str, int]:
    """Send one datagram from inside ``ns``; returns the reply and the client's port."""
    out = in_netns(ns, sys.executable, "-c", UDP_CLIENT, host, str(port), message)
    assert out.returncode == 0, out.stderr
    reply, client_port = out.stdout.rsplit("\n", 1)
    return reply, int(client_port)


def delete_netns(*names: str) -> None:
    existing = set(ip("netns", "list", check=False).stdout.split())
    gone = [n for n in names if n in existing]
    if gone:
        ip("-batch", "-", check=False, stdin="".join(f"netns del {n}\n" for n in gone))


def wait_for(condition, what: str, timeout: float = TIMEOUT, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return value


def pod(name: str, netns: str | None, port: int = PORT) -> dict:
    return {"name": name, "namespace": "default", "netns": netns,
            "ports": [{"port": port, "protocol": "TCP", "name": "http"},
                      {"port": port, "protocol": "UDP", "name": "udp"}]}


class Server:
    """The pod server as a subprocess, optionally started inside a namespace."""

    def __init__(self, tmp: Path, pods: list[dict], netns: str | None = None):
        self.control = tmp / "control.sock"
        self.ready = tmp / "ready.json"
        self.stderr = tmp / "stderr.log"
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"node": "n1", "pods": pods}))
        cmd = [sys.executable, "-m", "netsim.agents.podserver", "--spec", str(spec),
               "--control", str(self.control), "--ready-file", str(self.ready)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]   # ip execs python: same PID
        self.started = time.monotonic()
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)

    def wait_ready(self, timeout: float = TIMEOUT) -> dict:
        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"server exited {self.proc.returncode}: {self.stderr.read_text()}")
            return self.ready.exists()
        wait_for(ready, "the pod server's ready file", timeout)
        return json.loads(self.ready.read_text())

    def request(self, **req) -> dict:
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(str(self.control))
            f = s.makefile("rwb")
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            return json.loads(f.readline())

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmRSS:")))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()                   # by PID, through Popen
                self.proc.wait()
        return self.proc.returncode


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture
def veth_pair():
    """nstest-ps-a (10.199.0.1/24) <-veth-> nstest-ps-b (10.199.0.2/24)."""
    delete_netns(NS_A, NS_B)
    try:
        ip("netns", "add", NS_A)
        ip("netns", "add", NS_B)
        ip("link", "add", "nstps-a", "netns", NS_A, "type", "veth",
           "peer", "name", "nstps-b", "netns", NS_B)
        for ns, dev, addr in ((NS_A, "nstps-a", IP_A), (NS_B, "nstps-b", IP_B)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        delete_netns(NS_A, NS_B)                   # deleting a namespace deletes its veth end


@pytest.fixture
def server_factory(tmp_path):
    servers: list[Server] = []

    def start(pods: list[dict], netns: str | None = None) -> Server:
        srv = Server(tmp_path, pods, netns)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


# --- tests -----------------------------------------------------------------------------

def test_pod_reached_across_veth_sees_client_ip(veth_pair, server_factory):
    srv = server_factory([pod("web-0", NS_B)])
    assert srv.wait_ready()["errors"] == []
    assert curl(NS_A, f"http://{IP_B}:{PORT}/hostname") == "web-0"
    assert curl(NS_A, f"http://{IP_B}:{PORT}/clientip").startswith(f"{IP_A}:")
    assert curl(NS_A, f"http://{IP_B}:{PORT}/echo?msg=hi") == "hi"
    reply, client_port = udp_ask(NS_A, IP_B, PORT, "clientip")
    assert reply == f"{IP_A}:{client_port}"
    assert udp_ask(NS_A, IP_B, PORT, "hostname\n")[0] == "web-0"
    assert udp_ask(NS_A, IP_B, PORT, "ping")[0] == "ping"
    # The listening socket lives in nstest-ps-b, not in nstest-ps-a.
    assert f":{PORT} " in in_netns(NS_B, "ss", "-Htln", f"sport = :{PORT}").stdout
    assert f":{PORT} " not in in_netns(NS_A, "ss", "-Htln", f"sport = :{PORT}").stdout
    assert srv.stop() == 0
    assert not srv.control.exists()


def test_server_returns_to_its_own_namespace(veth_pair, server_factory):
    """Started inside nstest-ps-a: a netns pod binds in b, a null-netns pod after it in a."""
    srv = server_factory([pod("in-b", NS_B), pod("in-a", None)], netns=NS_A)
    assert srv.wait_ready()["pods"] == 2
    assert curl(NS_A, f"http://{IP_B}:{PORT}/hostname") == "in-b"
    assert curl(NS_B, f"http://{IP_A}:{PORT}/hostname") == "in-a"
    assert curl(NS_B, f"http://{IP_A}:{PORT}/clientip").startswith(f"{IP_B}:")
    # pods added later over the control socket follow the same rule
    assert srv.request(op="add", pod=pod("late-b", NS_B, PORT + 1)) == {"ok": True}
    assert srv.request(op="add", pod=pod("late-a", None, PORT + 1)) == {"ok": True}
    assert curl(NS_A, f"http://{IP_B}:{PORT + 1}/hostname") == "late-b"
    assert curl(NS_B, f"http://{IP_A}:{PORT + 1}/hostname") == "late-a"
    assert srv.stop() == 0


def test_control_errors_for_namespaces(veth_pair, server_factory):
    srv = server_factory([pod("web-0", NS_B)])
    srv.wait_ready()
    reply = srv.request(op="add", pod=pod("gone", "nstest-ps-missing"))
    assert reply["ok"] is False and "netns nstest-ps-missing not found" in reply["error"]
    reply = srv.request(op="add", pod=pod("clash", NS_B))
    assert reply["ok"] is False and "already in use" in reply["error"]
    assert srv.request(op="remove", name="web-0") == {"ok": True}
    out = in_netns(NS_A, "curl", "-sS", "--max-time", "5", f"http://{IP_B}:{PORT}/hostname")
    assert out.returncode == 7                     # curl: could not connect (refused)
    assert srv.request(op="add", pod=pod("web-1", NS_B)) == {"ok": True}
    assert curl(NS_A, f"http://{IP_B}:{PORT}/hostname") == "web-1"
    assert srv.request(op="ping") == {"ok": True}
    assert srv.stop() == 0
    assert "Traceback" not in srv.stderr.read_text()


@pytest.fixture
def many_netns():
    names = [f"nstest-ps-{i}" for i in range(SCALE)]
    delete_netns(*names)
    try:
        ip("-batch", "-", stdin="".join(f"netns add {n}\n" for n in names))
        for n in names:
            ip("-n", n, "link", "set", "lo", "up")
        yield names
    finally:
        delete_netns(*names)


def test_500_pods_memory_and_startup(many_netns, server_factory):
    pods = [pod(f"p-{i}", ns) for i, ns in enumerate(many_netns)]
    srv = server_factory(pods)
    ready = srv.wait_ready(timeout=60)
    startup = time.monotonic() - srv.started
    assert ready["pods"] == SCALE and ready["errors"] == []
    for i in (0, SCALE // 2, SCALE - 1):
        assert curl(many_netns[i], f"http://127.0.0.1:{PORT}/hostname") == f"p-{i}"
        assert udp_ask(many_netns[i], "127.0.0.1", PORT, "hostname")[0] == f"p-{i}"
    rss = srv.rss_kib()
    fds = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
    print(f"\npodserver: {SCALE} pods x (1 TCP + 1 UDP): RSS {rss / 1024:.1f} MiB, "
          f"{fds} fds, ready in {startup:.2f}s")
    assert rss < 64 * 1024, f"RSS {rss} KiB for {SCALE} pods"
    assert startup < 30
    assert srv.stop() == 0
