"""Traffic tools shared by the benchmarks: a raw veth pair, iperf3 runs, listening checks.

Everything here sends only between namespaces the caller created; every process started
is registered with a ``Reaper`` so that an interrupted run ends it by its PID.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NetsimError

IPERF_PORT = 5201


class BenchError(NetsimError):
    """A benchmark step failed; the message names the step."""


@dataclass
class Reaper:
    """The processes a benchmark started, to be ended by PID whatever happens."""

    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def reap(self) -> None:
        """SIGTERM first (a UML runner then stops its guest), SIGKILL after 10 s."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done


# -- a raw veth pair between two namespaces: the limit of this kernel -------------------

@dataclass(frozen=True)
class RawVeth:
    ns_a: str
    ns_b: str
    ip_a: str = "10.199.0.1"
    ip_b: str = "10.199.0.2"

    def down(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            if Path(f"/run/netns/{ns}").exists():
                sh("ip", "netns", "del", ns, check=False)     # the veth pair goes with them

    def up(self) -> None:
        self.down()                                             # leftovers of an earlier run
        sh("ip", "netns", "add", self.ns_a)
        sh("ip", "netns", "add", self.ns_b)
        sh("ip", "-n", self.ns_a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", self.ns_b)
        for ns, ip in ((self.ns_a, self.ip_a), (self.ns_b, self.ip_b)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")


# -- listening sockets ------------------------------------------------------------------

def listening(pid: int, port: int) -> bool:
    """True once process ``pid``'s namespace has a TCP socket listening on ``port``
    (/proc/PID/net/tcp shows the sockets of that process's network namespace)."""
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_listening(server: subprocess.Popen, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    interval = 0.002
    while not listening(server.pid, port):
        if server.poll() is not None:
            raise BenchError(f"iperf3 server exited {server.returncode} before listening: "
                             f"{server.stderr.read().strip() if server.stderr else ''}")
        if time.monotonic() > deadline:
            raise BenchError(f"iperf3 server (pid {server.pid}) not listening on {port} after {timeout}s")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


# -- one iperf3 sample ------------------------------------------------------------------

def iperf(server_ns: str, bind_ip: str, client_ns: str, seconds: float, reaper: Reaper, *,
          connect_ip: str | None = None, streams: int = 1, omit: int = 1, port: int = IPERF_PORT) -> dict:
    """One iperf3 TCP run from ``client_ns`` to ``connect_ip`` (default ``bind_ip``; a
    ClusterIP DNATs to the server) against a one-off server bound to ``bind_ip`` in
    ``server_ns``. Bounded: ``-t seconds`` and a hard timeout on the client."""
    # `ip netns exec` execs iperf3 in place, so the Popen pid is iperf3's own.
    server = reaper.popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", str(port),
                           "-B", bind_ip], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    out: dict = {}
    try:
        wait_listening(server, port)
        budget = seconds + omit + 20                          # run + omit + connect and report slack
        argv = ["ip", "netns", "exec", client_ns, "iperf3", "-c", connect_ip or bind_ip, "-p", str(port),
                "-t", f"{seconds:g}", "-J", "--connect-timeout", "3000", "-P", str(streams)]
        if omit:
            argv += ["--omit", str(omit)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=budget)
        out = json.loads(done.stdout) if done.stdout.strip() else {}
        if done.returncode != 0 or "error" in out:
            raise BenchError(f"iperf3 client in {client_ns} -> {connect_ip or bind_ip} failed: "
                             f"{out.get('error') or done.stderr.strip()}")
        try:
            server.wait(timeout=10)                           # one-off: exits after its test
        except subprocess.TimeoutExpired:
            pass                                              # killed below
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    end = out["end"]
    return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
            "sender_gbit_s": end["sum_sent"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits"),
            "cpu_sender_pct": end.get("cpu_utilization_percent", {}).get("host_total"),
            "cpu_receiver_pct": end.get("cpu_utilization_percent", {}).get("remote_total"),
            "mss": out.get("start", {}).get("tcp_mss_default")}
