"""Address allocation, host-local style.

``HostLocal`` mirrors the CNI host-local plugin: the range is every host address of the
subnet except the gateway (the first one); allocation continues after the last address
handed out and wraps around, so a released address is not reused straight away; an
address is never handed out twice while it is in use.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network


class PoolExhausted(Exception):
    pass


class HostLocal:
    """One node's pod subnet."""

    def __init__(self, subnet: IPv4Network, in_use: dict[str, IPv4Address] | None = None,
                 last: IPv4Address | None = None):
        self.subnet = subnet
        self.gateway = subnet.network_address + 1
        self.first = self.gateway + 1
        self.last_host = subnet.broadcast_address - 1
        self.in_use: dict[str, IPv4Address] = dict(in_use or {})
        self.last = last

    @property
    def capacity(self) -> int:
        return int(self.last_host) - int(self.first) + 1

    def allocate(self, key: str) -> IPv4Address:
        """The address for ``key``; the same one if ``key`` already holds one."""
        if key in self.in_use:
            return self.in_use[key]
        taken = set(self.in_use.values())
        start = self.first if self.last is None or self.last >= self.last_host else self.last + 1
        size = self.capacity
        for i in range(size):
            ip = IPv4Address(int(self.first) + (int(start) - int(self.first) + i) % size)
            if ip not in taken:
                self.in_use[key] = ip
                self.last = ip
                return ip
        raise PoolExhausted(f"no free address left in {self.subnet} ({size} in use)")

    def release(self, key: str) -> None:
        self.in_use.pop(key, None)


def node_subnet(pod_cidr: IPv4Network, length: int, index: int) -> IPv4Network:
    """The ``index``-th node subnet, skipping the first one as flannel's SubnetMin does."""
    size = 2 ** (32 - length)
    return IPv4Network((int(pod_cidr.network_address) + (index + 1) * size, length))


def underlay_addresses(cidr: IPv4Network, nodes: list[IPv4Address | None],
                       externals: list[IPv4Address | None]) -> tuple[list[IPv4Address], list[IPv4Address]]:
    """Nodes count up from the second host (the first is kept for a gateway), externals
    count down from the last one; explicit addresses are kept and skipped."""
    taken = {a for a in nodes + externals if a is not None}
    def fill(wanted: list[IPv4Address | None], candidates) -> list[IPv4Address]:
        out = []
        it = iter(candidates)
        for addr in wanted:
            if addr is None:
                addr = next(a for a in it if a not in taken)
                taken.add(addr)
            out.append(addr)
        return out
    first = int(cidr.network_address) + 2
    last = int(cidr.broadcast_address) - 1
    return (fill(nodes, (IPv4Address(i) for i in range(first, last + 1))),
            fill(externals, (IPv4Address(i) for i in range(last, first - 1, -1))))
