"""The packet walk, assembled from captured frames. Pure: frames in, hop records out.

A probe is recognised by its IP ID (the crafted packet's, kept by NAT and by VXLAN,
which carries the inner packet unchanged). Every 5-tuple a forward packet showed is a
forward tuple; a packet with the reverse of one is part of the reply (this is how the
reply is found after NAT rewrote it); ICMP errors match by the packet they quote.
Consecutive packets of one direction whose 5-tuple differs mark where NAT happened.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .capture import Frame, Hop

VXLAN_PORT = 8472
DNS_PORT = 53

Tuple5 = tuple[str, str, int, str, int]      # proto, src, sport, dst, dport


@dataclass
class Step:
    n: int                      # order in the walk
    ts_ns: int
    hop: str                    # "node-1 cni0"
    role: str
    direction: str              # in | out (as the interface saw it)
    leg: str                    # forward | reply
    proto: str
    src: str
    sport: int
    dst: str
    dport: int
    info: str = ""              # TCP flags, ICMP type, UDP payload
    outer: dict | None = None   # VXLAN: src, dst, sport, dport, vni
    nat: list[str] = field(default_factory=list)   # what changed since the previous step of this leg
    frame: int = -1             # index into the captured frames

    @property
    def tuple(self) -> Tuple5:
        return (self.proto, self.src, self.sport, self.dst, self.dport)

    def addr(self) -> str:
        if self.proto == "icmp":
            return f"{self.src} → {self.dst}"
        return f"{self.src}:{self.sport} → {self.dst}:{self.dport}"

    def to_dict(self) -> dict:
        from .probe import camel
        return camel(asdict(self))


def _scapy():
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import bind_layers
    bind_layers(UDP, VXLAN, dport=VXLAN_PORT)
    return Ether, IP, TCP, UDP, ICMP, VXLAN


def decode(data: bytes) -> tuple[dict | None, dict | None]:
    """(inner packet fields, VXLAN outer header or None) of an Ethernet frame."""
    Ether, IP, TCP, UDP, ICMP, VXLAN = _scapy()
    pkt = Ether(data)
    if IP not in pkt:
        return None, None
    outer = None
    ip = pkt[IP]
    if UDP in pkt and VXLAN in pkt and pkt[UDP].dport == VXLAN_PORT:
        outer = {"src": ip.src, "dst": ip.dst, "sport": pkt[UDP].sport, "dport": pkt[UDP].dport,
                 "vni": pkt[VXLAN].vni}
        inner = pkt[VXLAN].payload
        if IP not in inner:
            return None, outer
        ip = inner[IP]
    fields = {"src": ip.src, "dst": ip.dst, "id": ip.id, "ttl": ip.ttl, "sport": 0, "dport": 0,
              "proto": {6: "tcp", 17: "udp", 1: "icmp"}.get(ip.proto, str(ip.proto)), "info": "", "quoted": None}
    if ip.proto == 6 and TCP in ip:
        fields.update(sport=ip[TCP].sport, dport=ip[TCP].dport, info=str(ip[TCP].flags))
    elif ip.proto == 17 and UDP in ip:
        payload = bytes(ip[UDP].payload)
        fields.update(sport=ip[UDP].sport, dport=ip[UDP].dport, info=_udp_info(ip[UDP].sport, ip[UDP].dport, payload))
    elif ip.proto == 1 and ICMP in ip:
        icmp = ip[ICMP]
        if icmp.type in (0, 8):
            fields.update(sport=icmp.id, dport=icmp.id, info="echo reply" if icmp.type == 0 else "echo request")
        else:
            fields["info"] = f"ICMP type {icmp.type} code {icmp.code}"
            quoted = bytes(icmp.payload)
            if len(quoted) >= 28:
                q = IP(quoted)
                qs, qd = (q.sport, q.dport) if q.proto in (6, 17) and hasattr(q.payload, "sport") else (0, 0)
                fields["quoted"] = {"id": q.id, "tuple": ({6: "tcp", 17: "udp"}.get(q.proto, "icmp"), q.src, qs, q.dst, qd)}
    return fields, outer


def _udp_info(sport: int, dport: int, payload: bytes) -> str:
    """A DNS message (port 53) in one line, else the start of the payload."""
    if DNS_PORT in (sport, dport):
        from ..dns.query import describe
        try:
            return describe(payload)
        except Exception:            # not DNS after all: show the bytes
            pass
    return _printable(payload)


def _printable(payload: bytes) -> str:
    text = payload[:40].decode(errors="replace")
    return repr(text) if payload else ""


def reverse(t: Tuple5) -> Tuple5:
    return (t[0], t[3], t[4], t[1], t[2])


def assemble(frames: list[Frame], hops: list[Hop], ip_id: int, proto: str,
             sent: Tuple5 | None = None, sender: str | None = None) -> list[Step]:
    """The steps of the probe's flow, in time order, with NAT marked.

    ``sent`` is the 5-tuple the probe left its socket with; ``sender`` names a source no
    capture sees leave (a node's own stack): the walk then starts with that step."""
    decoded = []
    for i, f in enumerate(frames):
        fields, outer = decode(f.data)
        if fields is not None:
            decoded.append((i, f, fields, outer))
    forward: set[Tuple5] = set()
    for _, _, p, _ in decoded:
        if p["id"] == ip_id and p["proto"] == proto and not p["quoted"]:
            forward.add((p["proto"], p["src"], p["sport"], p["dst"], p["dport"]))
    if sent is not None:
        forward.add(sent)
    # Ends seen on the forward path; a packet with a forward source end and a forward
    # destination end is the probe even if it shows a mix never captured whole (a reply
    # to the bridge's own address is un-SNATed in PREROUTING, un-DNATed in POSTROUTING).
    src_ends = {(t[0], t[1], t[2]) for t in forward}
    dst_ends = {(t[0], t[3], t[4]) for t in forward}
    steps: list[Step] = []
    for i, f, p, outer in sorted(decoded, key=lambda d: (d[1].ts_ns, d[0])):
        t = (p["proto"], p["src"], p["sport"], p["dst"], p["dport"])
        a, b = (t[0], t[1], t[2]), (t[0], t[3], t[4])
        if a in src_ends and b in dst_ends:
            leg = "forward"
        elif a in dst_ends and b in src_ends:
            leg = "reply"
        elif p["quoted"] and (p["quoted"]["id"] == ip_id or p["quoted"]["tuple"] in forward):
            leg = "reply"
        else:
            continue
        hop = hops[f.hop]
        steps.append(Step(len(steps) + 1, f.ts_ns, hop.label, hop.role, "out" if f.outgoing else "in", leg,
                          *t, info=p["info"], outer=outer, frame=i))
    steps = causal_order(steps, hops, frames)
    if sent is not None and sender is not None:
        info = {"tcp": "S", "udp": steps[0].info if steps else "", "icmp": "echo request"}.get(proto, "")
        first_ts = steps[0].ts_ns - 1 if steps else 0
        steps.insert(0, Step(0, first_ts, f"{sender} (local stack)", "local", "out", "forward", *sent, info=info))
    for n, s in enumerate(steps, 1):
        s.n = n
    mark_nat(steps)
    return steps


# Within one machine, the order a packet meets its interfaces (kernel timestamps of a
# receive path and the device it decapsulates into can be a few µs out of order).
RANK = {("pod eth0", "out"): 0, ("host veth", "in"): 1, ("uplink", "in"): 1, ("underlay port", "in"): 1,
        ("external eth0", "out"): 0, ("vxlan", "in"): 2, ("bridge", "in"): 2, ("vxlan", "out"): 5,
        ("bridge", "out"): 5, ("host veth", "out"): 6, ("uplink", "out"): 6, ("underlay port", "out"): 6,
        ("pod eth0", "in"): 7, ("external eth0", "in"): 7}


def _role(hop: Hop) -> str:
    for key in ("host veth", "switch port"):
        if hop.role.startswith(key):
            return "underlay port" if key == "switch port" else key
    return hop.role


def causal_order(steps: list[Step], hops: list[Hop], frames: list[Frame], window_ns: int = 200_000) -> list[Step]:
    """Time order, with neighbours in one namespace put in the order a packet crosses
    interfaces there when their timestamps are closer than ``window_ns`` (a receive path
    stamps the uplink and the VXLAN device it decapsulates into nearly together)."""
    out = list(steps)
    for _ in range(len(out)):
        swapped = False
        for i in range(len(out) - 1):
            a, b = out[i], out[i + 1]
            ha, hb = hops[frames[a.frame].hop], hops[frames[b.frame].hop]
            if ha.netns != hb.netns or (a.leg, a.info) != (b.leg, b.info) or b.ts_ns - a.ts_ns > window_ns:
                continue
            if RANK.get((_role(ha), a.direction), 4) > RANK.get((_role(hb), b.direction), 4):
                out[i], out[i + 1] = b, a
                swapped = True
        if not swapped:
            break
    return out


def mark_nat(steps: list[Step]) -> None:
    """Note on each step what changed against the previous step of the same packet kind."""
    last: dict[tuple[str, str], Step] = {}
    for s in steps:
        key = (s.leg, s.info if s.proto != "tcp" else s.info)   # one packet (SYN, SYN-ACK, RST...) at a time
        prev = last.get(key)
        if prev is not None:
            if (prev.dst, prev.dport) != (s.dst, s.dport):
                s.nat.append(f"destination {prev.dst}:{prev.dport} → {s.dst}:{s.dport}"
                             if s.proto != "icmp" else f"destination {prev.dst} → {s.dst}")
            if (prev.src, prev.sport) != (s.src, s.sport):
                s.nat.append(f"source {prev.src}:{prev.sport} → {s.src}:{s.sport}"
                             if s.proto != "icmp" else f"source {prev.src} → {s.src}")
        last[key] = s


def nat_events(steps: list[Step]) -> list[dict]:
    """Where each rewrite was first seen: between which two hops, and what it was."""
    out = []
    prev_of: dict[tuple[str, str], Step] = {}
    for s in steps:
        key = (s.leg, s.info)
        prev = prev_of.get(key)
        if s.nat and prev is not None:
            kind = []
            for change in s.nat:
                if change.startswith("destination"):
                    kind.append("DNAT" if s.leg == "forward" else "reverse SNAT (conntrack)")
                else:
                    kind.append("SNAT" if s.leg == "forward" else "reverse DNAT (conntrack)")
            out.append({"leg": s.leg, "packet": s.info, "between": [prev.hop, s.hop], "kinds": kind,
                        "changes": list(s.nat), "step": s.n})
        prev_of[key] = s
    return out


def path_summary(steps: list[Step], destinations: set[str], pod_cidr: str | None = None) -> dict:
    """Did the first forward packet arrive at one of ``destinations`` (hop owners: pod keys,
    external or node names)? Where was it last seen, and what looks broken on the way?"""
    from ipaddress import IPv4Address, IPv4Network
    first = next((s for s in steps if s.leg == "forward"), None)
    if first is None:
        return {"delivered": False, "lastSeen": None, "problems": ["the probe was not seen on any interface"]}
    fwd = [s for s in steps if s.leg == "forward" and s.info == first.info]
    arrived = [s for s in fwd if s.direction == "in" and s.hop.rsplit(" ", 1)[0] in destinations]
    problems = []
    net = IPv4Network(pod_cidr) if pod_cidr else None
    for s in fwd:
        if (net is not None and s.role == "uplink" and s.direction == "out" and not s.outer
                and IPv4Address(s.dst) in net):
            node = s.hop.rsplit(" ", 1)[0]
            problems.append(f"{node} sent the packet for pod {s.dst} out of eth0 without VXLAN "
                            f"encapsulation: it has no route for that pod subnet via flannel.1")
    replies = [s for s in steps if s.leg == "reply"]
    return {"delivered": bool(arrived), "deliveredAt": arrived[0].hop if arrived else None,
            "lastSeen": fwd[-1].hop, "lastReply": replies[-1].hop if replies else None, "problems": problems}
