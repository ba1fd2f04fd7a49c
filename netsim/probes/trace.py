"""``netsim trace FROM TARGET``: one crafted probe, followed hop by hop in both directions.

While the probe (a scapy SYN, UDP datagram or ICMP echo with a known IP ID) runs:

* every interface it may cross is captured (``capture``): the source's and the
  candidate backends' eth0 and host-side veth, every node's bridge, flannel.1 and
  uplink, the underlay switch ports, external hosts;
* every node traces the netfilter rules its packets match (``nftrace``).

Afterwards: the frames of the probe's flow in time order with the 5-tuple at each hop
and the VXLAN outer header on the underlay (``walk``), where DNAT and SNAT happened,
the rules that matched per node, the conntrack entries (``conntrack``), and a pcapng
with one interface per hop (``pcapng``). Everything set up is taken down in ``finally``.
"""
from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..plan.state import LabPlan
from . import conntrack, nftrace, pcapng, scapyprobe, walk
from .capture import Capture, hops_for
from .targets import ProbeError, Source, Target


@dataclass
class TraceResult:
    source: Source
    target: Target
    ip_id: int
    crafted: scapyprobe.Crafted
    steps: list[walk.Step]
    nat: list[dict]
    rules: list[nftrace.TracedPacket]
    conntrack: list[conntrack.Entry]
    ipvs: dict[str, list[conntrack.IPVSConn]] = field(default_factory=dict)
    pcap: str | None = None
    hops_captured: int = 0
    notes: list[str] = field(default_factory=list)
    path: dict = field(default_factory=dict)
    dns: "TraceResult | None" = None        # the DNS query that named the target (a DNS name TARGET)
    hops: list = field(default_factory=list, repr=False)
    frames: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {
            "from": self.source.name, "sourceIP": self.crafted.src, "to": self.target.label,
            "proto": self.target.proto, "address": self.target.address, "ipId": self.ip_id,
            "reached": self.crafted.reached, "verdict": self.crafted.verdict,
            "steps": [s.to_dict() for s in self.steps], "nat": self.nat,
            "rules": [{"node": p.node, "packet": p.summary(), "rules": p.rules} for p in self.rules],
            "conntrack": [{"node": e.node, "entry": e.line, "nat": e.nat} for e in self.conntrack],
            "ipvs": {node: [c.to_dict() for c in conns] for node, conns in self.ipvs.items()}, "pcapng": self.pcap, "interfacesCaptured": self.hops_captured,
            "notes": self.notes, "path": self.path,
            **({"dns": dict(self.target.extra.get("dns") or {}, trace=self.dns.to_dict())} if self.dns else {}),
        }


def run_named(plan: LabPlan, src: Source, query: Target, payload: bytes, target_of, pcap: str | None,
              timeout: float = 1.0) -> TraceResult:
    """A DNS name TARGET: trace the query (``payload``, UDP to the nameserver ``query``),
    then the connection to the address in its answer (``target_of(answer bytes)`` gives
    that target); one pcapng holds both, the query first."""
    first = run(plan, src, query, None, timeout, payload=payload)
    if not first.crafted.reached:
        raise ProbeError(f"the DNS query to {query.address} got no answer ({first.crafted.verdict})")
    second = run(plan, src, target_of(first.crafted.raw), None, timeout)
    second.dns = first
    if pcap:
        write_pcap_many(pcap, [(first.hops, first.frames, first.steps), (second.hops, second.frames, second.steps)])
        second.pcap = pcap
    return second


def run(plan: LabPlan, src: Source, target: Target, pcap: str | None, timeout: float = 1.0,
        payload: bytes | None = None) -> TraceResult:
    ip_id = random.randint(1, 0xFFFF)
    pods = ([src.name] if src.kind == "pod" else []) + [b for b in target.backends if "/" in b]
    externals = [src.name] if src.kind == "external" else []
    externals += [b for b in target.backends if "/" not in b]
    hops = hops_for(plan, pods, externals)
    notes: list[str] = []
    traced = plan.iptables_backend == "nft" or plan.proxy_mode == "nftables"
    monitors = [nftrace.Monitor(n.name, n.netns) for n in plan.nodes] if traced else []
    if not traced:
        notes.append("rule tracing needs nf_tables (iptablesBackend: nft or proxyMode: nftables); "
                     "this lab uses iptables-legacy, so captures, conntrack" +
                     (" and IPVS entries" if plan.proxy_mode == "ipvs" else "") + " are shown, no rules")
    lines: dict[str, list[str]] = {}
    try:
        for m in list(monitors):
            try:
                m.start(ip_id)
            except subprocess.CalledProcessError as exc:      # e.g. a kernel without nf_tables
                m.stop()
                monitors.remove(m)
                notes.append(f"no rule tracing in {m.node}: {exc.stderr.strip().splitlines()[-1] if exc.stderr else exc}")
        with Capture(hops) as cap:
            crafted = scapyprobe.send(src.netns, target.ip, target.proto, target.port, timeout=timeout,
                                      ip_id=ip_id, payload=payload)
            frames = cap.until_quiet()
            if cap.missing:
                notes.append(f"not captured (gone): {', '.join(cap.missing)}")
    finally:
        for m in monitors:
            lines[m.node] = m.stop()
    port = crafted.sport or 0
    sent = (target.proto, crafted.src, port, target.ip, target.port or port)
    if target.proto == "icmp":
        sent = ("icmp", crafted.src, port, target.ip, port)
    steps = walk.assemble(frames, hops, ip_id, target.proto, sent, src.name if src.kind == "node" else None)
    forward = {s.tuple for s in steps if s.leg == "forward"}
    rules = [p for m in monitors for p in nftrace.parse(m.node, lines.get(m.node, []))]
    entries = [e for n in plan.nodes for e in conntrack.entries(n.name, n.netns, forward, ip_id if traced else None)]
    ipvs = {}
    if plan.proxy_mode == "ipvs":
        ipvs = {n.name: conns for n in plan.nodes if (conns := conntrack.ipvs_connections(n.netns, forward))}
        if ipvs:
            notes.append("IPVS mode: the DNAT is IPVS's (the virtual server forwards to the real server it "
                         "scheduled, in masquerade mode), not a netfilter rule; conntrack shows it because "
                         "kube-proxy sets net.ipv4.vs.conntrack=1")
    destinations = set(target.backends) or {_owner_of(plan, target.ip)}
    result = TraceResult(src, target, ip_id, crafted, steps, walk.nat_events(steps), rules, entries, ipvs,
                         hops_captured=len(hops), notes=notes,
                         path=walk.path_summary(steps, destinations, plan.pod_cidr if plan.overlay == "vxlan" else None),
                         hops=hops, frames=frames)
    if pcap:
        write_pcap(pcap, hops, frames, steps)
        result.pcap = pcap
    return result


def _owner_of(plan: LabPlan, ip: str) -> str:
    for group in (plan.nodes, plan.externals):
        for m in group:
            if m.address == ip:
                return m.name
    return ip


def write_pcap(path: str, hops, frames, steps: list[walk.Step]) -> None:
    write_pcap_many(path, [(hops, frames, steps)])


def write_pcap_many(path: str, walks: list[tuple[list, list, list[walk.Step]]]) -> None:
    """One pcapng for one or more walks (a DNS query, then the connection): one interface
    per hop label, the walks' packets one after the other, each with its step as comment."""
    interfaces: list[tuple[str, str]] = []
    index: dict[str, int] = {}
    packets = []
    for part, (hops, frames, steps) in enumerate(walks, 1):
        used = sorted({frames[s.frame].hop for s in steps if s.frame >= 0})
        for h in used:
            if hops[h].label not in index:
                index[hops[h].label] = len(interfaces)
                interfaces.append((hops[h].label, hops[h].role))
        for s in steps:
            if s.frame < 0:
                continue                  # the node's own stack: no frame was captured there
            f = frames[s.frame]
            step = f"step {s.n}" if len(walks) == 1 else f"part {part} step {s.n}"
            comment = f"{step} {s.leg} {s.direction} {s.hop}: {s.proto} {s.addr()} {s.info}".strip()
            if s.nat:
                comment += " | " + "; ".join(s.nat)
            packets.append((index[hops[f.hop].label], f.ts_ns, f.data, f.outgoing, comment))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pcapng.write(path, interfaces, packets)


# -- text for people ----------------------------------------------------------------------
def text(r: TraceResult, every_packet: bool = False) -> str:
    """The walk for people: the probe and its first answer (``every_packet``: also what
    followed, such as the source's RST to a SYN-ACK it did not expect). A DNS name
    TARGET shows the query's walk first, then the connection's."""
    if r.dns is None:
        return _walk_text(r, every_packet)
    found = r.target.extra.get("dns") or {}
    answer = ", ".join(found.get("addresses", []))
    tried = found.get("tried", [])
    out = [f"DNS: {r.source.name} asks its nameserver {found.get('server')} for {found.get('name')}: "
           f"{found.get('answeredAs')} A {answer}"]
    if len(tried) > 1:
        out.append("     search path: " + ", ".join(f"{t['name']} {t['rcode']}" for t in tried))
    out += ["", f"== 1. the DNS query (UDP to {r.dns.target.address}) ==",
            _walk_text(r.dns, every_packet, pcap_line=False),
            "", f"== 2. the connection to {answer.split(',')[0]} ==", _walk_text(r, every_packet, pcap_line=False)]
    if r.pcap:
        out += ["", f"pcapng: {r.pcap} ({len(r.dns.steps) + len(r.steps)} packets, the DNS query first; open in "
                    f"Wireshark, or tshark -r {r.pcap} -d udp.port==8472,vxlan)"]
    return "\n".join(out)


def _walk_text(r: TraceResult, every_packet: bool = False, pcap_line: bool = True) -> str:
    steps = r.steps
    if not every_packet and steps:
        first = {}
        for s in steps:
            first.setdefault(s.leg, s.info)
        steps = [s for s in steps if first.get(s.leg) == s.info]
    hidden = len(r.steps) - len(steps)
    out = [f"trace {r.source.name} ({r.crafted.src}) → {r.target.label}",
           f"probe: {r.target.proto.upper()}{' SYN' if r.target.proto == 'tcp' else ''}, IP ID {r.ip_id}; "
           f"{'reached' if r.crafted.reached else 'NOT reached'} ({r.crafted.verdict})", ""]
    if not r.steps:
        out.append("no packet of the probe was seen on any interface")
    width = max((len(s.hop) for s in steps), default=10)
    for s in steps:
        arrow = "→" if s.leg == "forward" else "←"
        line = f"{s.n:>3} {arrow} {s.hop:<{width}} {s.direction:<3} {s.proto} {s.addr()} {s.info}".rstrip()
        out.append(line)
        if s.outer:
            o = s.outer
            out.append(f"{'':>6}{'':<{width}}     VXLAN outer {o['src']}:{o['sport']} → {o['dst']}:{o['dport']} VNI {o['vni']}")
        for change in s.nat:
            out.append(f"{'':>6}{'':<{width}}     ** {change}")
    if hidden:
        later = sorted({s.info for s in r.steps if s not in steps})
        out.append(f"    (+{hidden} steps of later packets: {', '.join(later)}; --every-packet shows them)")
    p = r.path
    if p:
        out.append("")
        if p.get("delivered"):
            out.append(f"path: delivered at {p['deliveredAt']}" +
                       (f"; the reply came back to {p['lastReply']}" if p.get("lastReply") else "; no reply was seen"))
        else:
            out.append(f"path: NOT delivered; the probe was last seen at {p.get('lastSeen')}")
        for problem in p.get("problems", []):
            out.append(f"  !! {problem}")
    if r.nat:
        out += ["", "NAT (where the 5-tuple changed):"]
        seen = set()
        for e in r.nat:
            key = (e["leg"], tuple(e["kinds"]), tuple(e["between"]))
            if key in seen:
                continue
            seen.add(key)
            a, b = e["between"]
            where = f"between {a} and {b}" if a != b else f"inside {a.split()[0]}, in and out of {a.split()[-1]}"
            out.append(f"  {' + '.join(e['kinds'])} on the {e['leg']} path ({e['packet']}) {where}: "
                       f"{'; '.join(e['changes'])}")
    if r.rules:
        out += ["", "netfilter rules matched (nft monitor trace):"]
        for p in r.rules:
            interesting = [x for x in p.rules if x["rule"] or x["verdict"] not in ("accept", "continue")]
            if not interesting:
                continue
            out.append(f"  {p.node}: {p.summary()}")
            tw = max(7, *(len(x["table"]) for x in interesting))      # nftables chain names are long
            cw = max(28, *(len(x["chain"]) for x in interesting))
            for x in interesting:
                rule = x["rule"] or f"policy {x['verdict']}"
                shown = x["rule"] and x["verdict"] and not x["rule"].endswith(x["verdict"])
                verdict = f"  → {x['verdict']}" if shown else ""
                out.append(f"      {x['table']:<{tw}} {x['chain']:<{cw}} {rule}{verdict}")
    if r.conntrack:
        out += ["", "conntrack:"]
        for e in r.conntrack:
            out.append(f"  {e.node}: {e.line}")
            for n in e.nat:
                out.append(f"      {n}")
    if r.ipvs:
        out += ["", "IPVS connection entries (ipvsadm -Lnc):"]
        for node, conns in r.ipvs.items():
            out += [f"  {node}: {c.text()}" for c in conns]
    for note in r.notes:
        out += ["", f"note: {note}"]
    if r.pcap and pcap_line:
        out += ["", f"pcapng: {r.pcap} ({len(r.steps)} packets; open in Wireshark, or "
                    f"tshark -r {r.pcap} -d udp.port==8472,vxlan)"]
    return "\n".join(out)
