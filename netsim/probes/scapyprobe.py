"""A crafted probe: one TCP SYN, UDP datagram or ICMP echo sent with scapy from inside a namespace.

scapy's routing table and interface list describe the namespace scapy was imported in,
so nothing here relies on them: scapy builds and matches the packets, and the sockets
(raw IP sockets: one to send through the namespace's own routing and netfilter OUTPUT
path, one per protocol to listen) are created inside the source namespace, and the source address comes from that
namespace's routing table (pyroute2 ``route get``). The kernel of the source answers
a SYN-ACK it did not expect with a RST, which ends the half-open handshake cleanly.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from ..apply import netns

UDP_QUESTION = b"hostname"
ICMP_UNREACH = {0: "net unreachable", 1: "host unreachable", 3: "port unreachable",
                9: "net prohibited", 10: "host prohibited", 13: "administratively prohibited"}


@dataclass(frozen=True)
class Crafted:
    reached: bool
    verdict: str               # SYN-ACK | RST | UDP reply | echo reply | ICMP ... | no answer
    src: str                   # the source address used
    sport: int                 # TCP/UDP source port; the echo identifier for ICMP
    ip_id: int
    rtt_ms: float | None = None
    reply_from: str = ""       # the address the reply came from
    payload: str = ""          # UDP reply payload (the backend's name for 'hostname')
    raw: bytes = b""           # UDP reply payload as received (e.g. a DNS answer)


def source_address(ns: str, dst: str) -> str:
    """The address the kernel of ``ns`` would send from towards ``dst``."""
    ipr = netns.iproute(ns)
    try:
        for route in ipr.route("get", dst=dst):
            src = route.get_attr("RTA_PREFSRC")
            if src:
                return src
    finally:
        ipr.close()
    raise OSError(f"no route from {ns} to {dst}")


def build(src: str, dst: str, proto: str, dport: int | None, sport: int, ip_id: int,
          payload: bytes | None = None):
    """The probe packet (scapy) — a SYN, a 'hostname' datagram (or ``payload``, such as a
    DNS query) or an echo request."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    ip = IP(src=src, dst=dst, id=ip_id, ttl=64)
    if proto == "tcp":
        return ip / TCP(sport=sport, dport=dport, flags="S", seq=random.getrandbits(32),
                        options=[("MSS", 1400)])
    if proto == "udp":
        return ip / UDP(sport=sport, dport=dport) / (UDP_QUESTION if payload is None else payload)
    return ip / ICMP(type=8, id=sport & 0xFFFF, seq=1) / b"netsim-probe"


def send(ns: str, dst: str, proto: str, dport: int | None, timeout: float = 1.0,
         sport: int | None = None, ip_id: int | None = None, src: str | None = None,
         payload: bytes | None = None) -> Crafted:
    """Send one probe from ``ns`` and classify the first answer. A UDP ``payload`` (a DNS
    query) is sent from a port a socket holds, so the answer is taken, not refused."""
    src = src or source_address(ns, dst)
    sport = sport or random.randint(42000, 59999)
    ip_id = ip_id if ip_id is not None else random.randint(1, 0xFFFF)
    packet = build(src, dst, proto, dport, sport, ip_id, payload)
    t0 = time.monotonic()
    reply = exchange(ns, packet, timeout, hold=payload is not None and proto == "udp")
    rtt = (time.monotonic() - t0) * 1000
    verdict, reached, text = classify(reply)
    from scapy.layers.inet import UDP
    raw = bytes(reply[UDP].payload) if reply is not None and reply.haslayer(UDP) else b""
    return Crafted(reached, verdict, src, sport, ip_id,
                   round(rtt, 2) if reply is not None else None,
                   reply.src if reply is not None else "", text if payload is None else "", raw)


def exchange(ns: str, packet, timeout: float, hold: bool = False):
    """Send ``packet`` through the namespace's IP stack and return the first answer.

    Answers are read from raw IP sockets of the probe's protocol and of ICMP: they get
    a copy of every such packet the namespace delivers locally, *after* netfilter, so a
    reply is seen as the source sees it — with the NAT of a node's own connection to a
    ClusterIP undone (a packet socket would see it before conntrack reverses the NAT).
    ``hold``: a UDP socket is bound to the source port meanwhile, so the namespace
    takes the answer instead of refusing it with an ICMP port unreachable."""
    import select
    import socket
    from scapy.layers.inet import IP
    proto = packet[IP].proto
    with netns.entered(ns):
        out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        ins = [socket.socket(socket.AF_INET, socket.SOCK_RAW, p) for p in dict.fromkeys((proto, socket.IPPROTO_ICMP))]
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if hold else None
    try:
        if holder is not None:
            from scapy.layers.inet import UDP
            holder.bind((packet[IP].src, packet[UDP].sport))
        out.setsockopt(socket.SOL_IP, socket.IP_HDRINCL, 1)
        out.sendto(bytes(packet), (packet[IP].dst, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(ins, [], [], left)
            for s in ready:
                reply = IP(s.recv(65535))
                if reply.answers(packet):
                    return reply
        return None
    finally:
        out.close()
        for s in ins:
            s.close()
        if holder is not None:
            holder.close()


def classify(reply) -> tuple[str, bool, str]:
    """(verdict, reached, UDP payload) of a scapy answer (None: nothing came back)."""
    from scapy.layers.inet import ICMP, TCP, UDP
    if reply is None:
        return "no answer", False, ""
    if reply.haslayer(ICMP):
        icmp = reply[ICMP]
        if icmp.type == 0:
            return "echo reply", True, ""
        if icmp.type == 3:
            return f"ICMP {ICMP_UNREACH.get(icmp.code, f'unreachable code {icmp.code}')}", False, ""
        if icmp.type == 11:
            return "ICMP time exceeded", False, ""
        return f"ICMP type {icmp.type}", False, ""
    if reply.haslayer(TCP):
        flags = reply[TCP].flags
        if flags & 0x12 == 0x12:
            return "SYN-ACK", True, ""
        if flags & 0x04:
            return "RST", False, ""
        return f"TCP {flags}", False, ""
    if reply.haslayer(UDP):
        return "UDP reply", True, bytes(reply[UDP].payload).decode(errors="replace")
    return reply.summary(), False, ""
