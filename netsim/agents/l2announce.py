"""MetalLB-style layer-2 announcement of LoadBalancer IPs, from inside a node.

Like MetalLB's speaker, a responder thread listens for ARP requests on the uplink and
answers those for the IPs this node announces with the node's own MAC; the IPs are not
added to any interface (the kernel would otherwise treat them as local). When the node
takes an IP over it sends a gratuitous ARP, so clients update their caches at once.
"""
from __future__ import annotations

import socket
import struct
import threading

from pyroute2 import IPRoute

ETH_P_ARP = 0x0806
ARP_REQUEST, ARP_REPLY = 1, 2


class Announcer:
    def __init__(self, iface: str = "eth0"):
        self.iface = iface
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=iface)[0]
            self.mac = bytes.fromhex(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS").replace(":", ""))
        self.current: frozenset[str] = frozenset()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self._sock.bind((iface, ETH_P_ARP))
        self.answered = 0
        threading.Thread(target=self._respond, name="arp-responder", daemon=True).start()

    def ensure(self, ips: set[str]) -> tuple[set[str], set[str]]:
        """Announce exactly ``ips``; returns (taken over, given up)."""
        added, removed = set(ips) - self.current, self.current - set(ips)
        self.current = frozenset(ips)              # one assignment: the thread sees old or new
        for ip in sorted(added):
            self._send(ARP_REPLY, socket.inet_aton(ip), b"\xff" * 6, socket.inet_aton(ip), b"\xff" * 6)
        return added, removed

    def _respond(self) -> None:
        while True:
            frame = self._sock.recv(128)
            if len(frame) < 42:
                continue
            op, = struct.unpack("!H", frame[20:22])
            sender_mac, sender_ip, target_ip = frame[22:28], frame[28:32], frame[38:42]
            if op == ARP_REQUEST and socket.inet_ntoa(target_ip) in self.current:
                self._send(ARP_REPLY, target_ip, sender_mac, sender_ip, sender_mac)
                self.answered += 1

    def _send(self, op: int, sender_ip: bytes, target_mac: bytes, target_ip: bytes, dst: bytes) -> None:
        frame = (dst + self.mac + struct.pack("!H", ETH_P_ARP)
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
                 + self.mac + sender_ip + target_mac + target_ip)
        self._sock.send(frame)
