"""The probe's connection as each node's conntrack (and IPVS) table holds it.

``conntrack -L`` inside the node namespace; an entry belongs to the probe when it carries
the trace's ct mark (which holds the probe's IP ID), or when its original direction is one of the forward 5-tuples the
captures saw. Its reply tuple is the NAT in one line: a reply source other than the
original destination is DNAT, a reply destination other than the original source SNAT.
In IPVS mode the connection is also in ``ipvsadm -Lnc``.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from .nftrace import ct_mark
from .walk import Tuple5

KV = re.compile(r"(\w+)=(\S+)")


@dataclass
class Entry:
    node: str
    line: str
    original: Tuple5
    reply: Tuple5

    @property
    def nat(self) -> list[str]:
        out = []
        if (self.reply[1], self.reply[2]) != (self.original[3], self.original[4]):
            out.append(f"DNAT {self.original[3]}:{self.original[4]} → {self.reply[1]}:{self.reply[2]}")
        if (self.reply[3], self.reply[4]) != (self.original[1], self.original[2]):
            out.append(f"SNAT {self.original[1]}:{self.original[2]} → {self.reply[3]}:{self.reply[4]}")
        return out


def parse_line(node: str, line: str) -> Entry | None:
    words = line.split()
    if len(words) < 3:
        return None
    proto = words[0]
    pairs = KV.findall(line)
    halves: list[dict] = [{}, {}]
    half = -1
    for k, v in pairs:
        if k == "src":
            half += 1
        if 0 <= half < 2:
            halves[half].setdefault(k, v)
    if half < 1:
        return None

    def tup(h: dict) -> Tuple5:
        if proto == "icmp":
            i = int(h.get("id", 0))
            return ("icmp", h["src"], i, h["dst"], i)
        return (proto, h["src"], int(h.get("sport", 0)), h["dst"], int(h.get("dport", 0)))
    return Entry(node, line.strip(), tup(halves[0]), tup(halves[1]))


def entries(node: str, ns: str, forward: set[Tuple5], ip_id: int | None = None) -> list[Entry]:
    try:
        done = subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-L"], capture_output=True, text=True)
    except FileNotFoundError:
        return []                                  # no iproute2 or conntrack-tools: nothing to show
    out = []
    for line in done.stdout.splitlines():
        e = parse_line(node, line)
        if e is None:
            continue
        marked = ip_id is not None and f"mark={ct_mark(ip_id)} " in line + " "
        if marked or e.original in forward:
            out.append(e)
    return out


@dataclass
class IPVSConn:
    """One ``ipvsadm -Lnc`` entry: the client, the virtual server it asked, the real server IPVS chose."""
    proto: str
    expires: str
    state: str
    client: str
    virtual: str
    real_server: str

    def to_dict(self) -> dict:
        return {"proto": self.proto, "state": self.state, "expires": self.expires, "client": self.client,
                "virtual": self.virtual, "realServer": self.real_server}

    def text(self) -> str:
        return (f"{self.proto} {self.client} → virtual server {self.virtual} → real server "
                f"{self.real_server}  {self.state}, expires in {self.expires}")


def parse_ipvs(text: str) -> list[IPVSConn]:
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 6 and words[0] in ("TCP", "UDP", "SCTP"):
            out.append(IPVSConn(*words))
    return out


def ipvs_connections(ns: str, flows: set[Tuple5]) -> list[IPVSConn]:
    """The ``ipvsadm -Lnc`` entries of ``flows`` (the probe's forward 5-tuples, IPVS mode):
    an entry's client and virtual server are a flow's source and destination before DNAT."""
    try:
        done = subprocess.run(["ip", "netns", "exec", ns, "ipvsadm", "-Lnc"], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    if done.returncode != 0:
        return []
    return of_flows(parse_ipvs(done.stdout), flows)


def of_flows(conns: list[IPVSConn], flows: set[Tuple5]) -> list[IPVSConn]:
    wanted = {(p.upper(), f"{s}:{sp}", f"{d}:{dp}") for p, s, sp, d, dp in flows}
    return [c for c in conns if (c.proto, c.client, c.virtual) in wanted]
