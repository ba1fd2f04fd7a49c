"""Netfilter rule tracing in a node, for one probe: which rules its packets matched.

For the trace only, a table ``ip netsim_trace_<IP ID>`` is added in each node's namespace
(its own name, so traces running side by side never touch each other's). Its
chains run right after conntrack (priority -180, before mangle and nat): a packet with
the probe's IP ID gets ``ct mark`` 0x6e73<IP ID> on its connection, and every packet of a
connection so marked — the reply too — gets ``meta nftrace set 1``. ``nft monitor
trace`` in that namespace then prints each rule those packets match, in every table:
kube-proxy's iptables-nft rules (KUBE-SERVICES → KUBE-SVC-… → KUBE-SEP-… DNAT,
KUBE-POSTROUTING MASQUERADE), flannel's, and the nftables mode's own. The monitor counts
as listening once it has printed the trace of a marker datagram (127.0.0.1:9) sent in
the namespace after it started. The table is deleted and the monitor ended (by PID)
afterwards. The legacy iptables backend has no such tracing (its TRACE target logs to
the kernel log), so there the walk shows only captures and conntrack.
"""
from __future__ import annotations

import re
import socket
import subprocess
import threading
from dataclasses import dataclass, field

from ..apply import netns
from ..runtime.wait import wait_for

TABLE = "netsim_trace"
CT_MARK = 0x6E730000            # "ns" + the probe's 16-bit IP ID: one mark per trace
MARKER_PORT = 9                 # discard


def ct_mark(ip_id: int) -> int:
    return CT_MARK | (ip_id & 0xFFFF)


def table(ip_id: int) -> str:
    return f"{TABLE}_{ip_id}"


def ruleset(ip_id: int) -> str:
    mark = f"0x{ct_mark(ip_id):08x}"
    chains = []
    for chain, hook in (("pre", "prerouting"), ("out", "output")):
        rules = [f"ip id {ip_id} ct mark set {mark}",
                 f"ct mark {mark} meta nftrace set 1"]
        if chain == "out":
            rules.append(f"ip daddr 127.0.0.1 udp dport {MARKER_PORT} meta nftrace set 1")
        body = "\n".join(f"    {r}" for r in rules)
        chains.append(f"  chain {chain} {{\n    type filter hook {hook} priority -180; policy accept;\n{body}\n  }}")
    return f"table ip {table(ip_id)} {{\n" + "\n".join(chains) + "\n}\n"


@dataclass
class Monitor:
    node: str
    ns: str
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    table_added: str = ""

    def start(self, ip_id: int, timeout: float = 5.0) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=ruleset(ip_id),
                       text=True, check=True, capture_output=True)
        self.table_added = table(ip_id)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "nft", "monitor", "trace"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

        def listening() -> bool:
            self._marker()
            return any(f"udp dport {MARKER_PORT}" in l for l in self.lines)
        wait_for(listening, f"nft monitor trace to listen in {self.node}", timeout, interval=0.01)

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _marker(self) -> None:
        with netns.socket_in(self.ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"netsim-trace-marker", ("127.0.0.1", MARKER_PORT))

    def stop(self) -> list[str]:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.reader:
                self.reader.join(timeout=3)
            self.proc = None
        if self.table_added:
            subprocess.run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "ip", self.table_added],
                           capture_output=True)
            self.table_added = ""
        return self.lines


LINE = re.compile(r"^trace id (?P<id>[0-9a-f]+) (?P<family>\S+) (?P<table>\S+) (?P<chain>\S+) (?P<rest>.*)$")


@dataclass
class TracedPacket:
    node: str
    trace_id: str
    packet: str                                  # the "packet:" header nft printed first
    rules: list[dict] = field(default_factory=list)   # {table, chain, rule, verdict}

    def summary(self) -> str:
        m = re.search(r"ip saddr (\S+) ip daddr (\S+)", self.packet)
        ports = re.search(r"(tcp|udp) sport (\d+) \S+ dport (\d+)", self.packet)
        icmp = re.search(r"icmp type (\S+)", self.packet)
        if not m:
            return self.packet[:80]
        if ports:
            return f"{ports.group(1)} {m.group(1)}:{ports.group(2)} → {m.group(2)}:{ports.group(3)}"
        return f"icmp {m.group(1)} → {m.group(2)}" + (f" {icmp.group(1)}" if icmp else "")


def parse(node: str, lines: list[str]) -> list[TracedPacket]:
    """Group ``nft monitor trace`` lines by trace id; drop the marker and our own table."""
    packets: dict[str, TracedPacket] = {}
    for line in lines:
        m = LINE.match(line.strip())
        if not m:
            continue
        rest, tid = m.group("rest"), m.group("id")
        if rest.startswith("packet:"):
            if tid not in packets:
                packets[tid] = TracedPacket(node, tid, rest[len("packet:"):].strip())
            continue
        pkt = packets.setdefault(tid, TracedPacket(node, tid, ""))
        if m.group("table").startswith(TABLE):
            continue
        rule, verdict = rest, ""
        v = re.search(r"\(verdict ([^)]*)\)\s*$", rest)
        if rest.startswith("rule "):
            rule = rest[5:]
            if v:
                verdict, rule = v.group(1), rule[:v.start() - 5].rstrip()
        elif rest.startswith("policy "):
            rule, verdict = "", rest.split()[1]
        elif rest.startswith("verdict "):
            rule, verdict = "", rest[len("verdict "):].strip()
        rule = " ".join(re.sub(r"\s*counter packets \d+ bytes \d+", "", rule).split())
        pkt.rules.append({"table": m.group("table"), "chain": m.group("chain"), "rule": rule, "verdict": verdict})
    return [p for p in packets.values() if f"udp dport {MARKER_PORT}" not in p.packet and p.packet]
