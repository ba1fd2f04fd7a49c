"""A hand-built node for IPVS-mode kernel tests: namespaces, pod servers, clients.

One "node" namespace with two routed pods (``/32`` veths, as a routed CNI does) and an
external host on the node's uplink. Pod servers and clients are threads of the test
process whose sockets are created inside the namespaces (``pyroute2.netns.pushns``), so a
request costs no process start (which matters inside user-mode Linux).
"""
from __future__ import annotations

import socket
import struct
import subprocess
import threading
from contextlib import contextmanager

from pyroute2 import netns

from netsim.kernel.features import probe_script, run_probes


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


@contextmanager
def inside(ns: str):
    """Run the block in network namespace ``ns`` (this thread only)."""
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


def iptables_backend() -> str:
    """legacy inside user-mode Linux (no nf_tables there), else what the host has."""
    try:
        out = run_probes(probe_script(["nf_tables"]))
    except (OSError, subprocess.SubprocessError):
        return "legacy"
    return "nft" if "nf_tables 0" in out else "legacy"


class PodServer:
    """TCP and UDP servers in a pod: every line / datagram is answered with "<name> <peer IP>"."""

    def __init__(self, ns: str, name: str, tcp_port: int, udp_port: int):
        self.name = name
        with inside(ns):
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", tcp_port))
        self.tcp.listen(64)
        self.udp.bind(("0.0.0.0", udp_port))
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._datagrams, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer[0]), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        with conn, conn.makefile("rb") as lines:
            try:
                for _ in lines:
                    conn.sendall(f"{self.name} {peer}\n".encode())
            except ConnectionResetError:         # the client closed with RST (SO_LINGER 0)
                pass

    def _datagrams(self) -> None:
        while True:
            try:
                _, peer = self.udp.recvfrom(512)
                if peer is None:                  # shut down
                    return
                self.udp.sendto(f"{self.name} {peer[0]}".encode(), peer)
            except OSError:
                return

    def close(self) -> None:
        for s in (self.tcp, self.udp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class Conn:
    """A TCP connection from namespace ``ns`` that stays open: ``ask()`` per request."""

    def __init__(self, ns: str, ip: str, port: int, timeout: float = 3.0):
        with inside(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((ip, port))
        self.lines = self.sock.makefile("rb")

    def ask(self) -> tuple[str, str]:
        self.sock.sendall(b"who\n")
        name, peer = self.lines.readline().decode().split()
        return name, peer

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def ask(ns: str, ip: str, port: int, proto: str = "tcp", timeout: float = 3.0) -> tuple[str, str]:
    """One request from ``ns``: (pod name, the client IP the pod saw)."""
    if proto == "tcp":
        c = Conn(ns, ip, port, timeout)
        try:
            return c.ask()
        finally:
            c.close()
    with inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(timeout)
        s.sendto(b"who", (ip, port))
        name, peer = s.recv(512).decode().split()
        return name, peer


TCPI_TOTAL_RETRANS = 100          # offset of tcpi_total_retrans in struct tcp_info


def from_port(ns: str, ip: str, port: int, sport: int, timeout: float = 3.0) -> tuple[str | None, int]:
    """One request from ``ns`` with the fixed source port ``sport``, closed with an RST
    (SO_LINGER 0: no TIME_WAIT here, so the next call may reuse the port at once):
    (pod name, or None when the connection was not answered; segments retransmitted)."""
    with inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.bind(("0.0.0.0", sport))
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
            s.sendall(b"who\n")
            name = s.recv(512).decode().split()[0]
        except OSError:
            name = None
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return name, struct.unpack_from("<I", info, TCPI_TOTAL_RETRANS)[0]
