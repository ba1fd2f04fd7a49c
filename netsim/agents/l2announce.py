"""MetalLB-style layer-2 announcement of LoadBalancer IPs, from inside a node.

The node answers ARP for each IP it announces (a proxy neighbour entry on its uplink, so
the IP is not added to any interface) and sends a gratuitous ARP when it takes an IP
over, so clients on the segment update their caches at once, as MetalLB's speaker does.
"""
from __future__ import annotations

import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NTF_PROXY = 0x08
ETH_P_ARP = 0x0806


class Announcer:
    def __init__(self, iface: str = "eth0"):
        self.iface = iface
        self.ipr = IPRoute()
        self.index = self.ipr.link_lookup(ifname=iface)[0]
        self.mac = self.ipr.get_links(self.index)[0].get_attr("IFLA_ADDRESS")
        self.current: set[str] = set()

    def ensure(self, ips: set[str]) -> tuple[set[str], set[str]]:
        """Announce exactly ``ips``; returns (taken over, given up)."""
        added, removed = ips - self.current, self.current - ips
        for ip in sorted(added):
            try:
                self.ipr.neigh("replace", dst=ip, ifindex=self.index, flags=NTF_PROXY)
            except NetlinkError:
                self.ipr.neigh("add", dst=ip, ifindex=self.index, flags=NTF_PROXY)
            self.gratuitous_arp(ip)
        for ip in sorted(removed):
            try:
                self.ipr.neigh("del", dst=ip, ifindex=self.index, flags=NTF_PROXY)
            except NetlinkError:
                pass
        self.current = set(ips)
        return added, removed

    def gratuitous_arp(self, ip: str) -> None:
        """An ARP reply broadcast for ``ip`` with this node's MAC (what MetalLB sends)."""
        mac = bytes.fromhex(self.mac.replace(":", ""))
        addr = socket.inet_aton(ip)
        frame = (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + addr + b"\xff" * 6 + addr)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((self.iface, ETH_P_ARP))
            s.send(frame)
