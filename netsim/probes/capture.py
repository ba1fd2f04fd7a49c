"""Raw captures on every interface a probe may cross, all from this one process.

One ``AF_PACKET`` socket per interface, created inside the interface's namespace and
bound to it (a socket keeps the namespace it was made in). ``bind`` returns once the
kernel delivers that interface's frames to the socket, so a capture is listening when
``open_all`` returns — no process to start, nothing to wait for, nothing left behind:
closing the sockets ends the captures. The kernel stamps every frame
(``SO_TIMESTAMPNS``) and says its direction (``PACKET_OUTGOING``).
"""
from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass

from .. import naming
from ..apply import netns
from ..plan.state import LabPlan

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
RCVBUF = 4 << 20


@dataclass(frozen=True)
class Hop:
    netns: str
    owner: str          # node-1 | default/client | underlay | ext-client
    iface: str
    role: str           # pod eth0 | host veth | bridge | vxlan | uplink | underlay port | external eth0

    @property
    def label(self) -> str:
        return f"{self.owner} {self.iface}"


@dataclass(frozen=True)
class Frame:
    hop: int            # index into the hop list
    ts_ns: int
    outgoing: bool
    data: bytes


def hops_for(plan: LabPlan, pods: list[str], externals: list[str]) -> list[Hop]:
    """Every interface of every node, the underlay ports, and the named pods' and
    externals' own interfaces (each pod: eth0 and its host-side veth)."""
    hops: list[Hop] = []
    by_key = {p.key: p for p in plan.pods}
    for key in dict.fromkeys(pods):
        pod = by_key.get(key)
        if pod is not None:
            hops.append(Hop(pod.netns, pod.key, naming.POD_IFACE, "pod eth0"))
            hops.append(Hop(plan.node(pod.node).netns, pod.node, pod.host_veth, f"host veth of {pod.name}"))
    for node in plan.nodes:
        hops.append(Hop(node.netns, node.name, plan.bridge, "bridge"))
        if plan.overlay == "vxlan":
            hops.append(Hop(node.netns, node.name, naming.VXLAN_DEVICE, "vxlan"))
        hops.append(Hop(node.netns, node.name, naming.UPLINK, "uplink"))
        hops.append(Hop(plan.underlay_netns, "underlay", naming.underlay_port(node.name), f"switch port of {node.name}"))
    for ext in plan.externals:
        if ext.name in externals:
            hops.append(Hop(plan.underlay_netns, "underlay", naming.underlay_port(ext.name), f"switch port of {ext.name}"))
            hops.append(Hop(ext.netns, ext.name, naming.UPLINK, "external eth0"))
    return hops


class Capture:
    """Sockets on ``hops``; ``drain()`` collects what arrived. Use as a context manager."""

    def __init__(self, hops: list[Hop]):
        self.hops = hops
        self.socks: list[tuple[int, socket.socket]] = []

    def __enter__(self) -> "Capture":
        self.missing: list[str] = []           # hops whose namespace or interface is gone
        try:
            for i, hop in enumerate(self.hops):
                if not netns.exists(hop.netns):
                    self.missing.append(hop.label)
                    continue
                with netns.entered(hop.netns):
                    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                    s.bind((hop.iface, ETH_P_ALL))
                except OSError:
                    s.close()
                    self.missing.append(hop.label)
                    continue
                s.setblocking(False)
                self.socks.append((i, s))
        except BaseException:
            self.close()
            raise
        self.drain()                    # frames queued before bind narrowed the socket
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for _, s in self.socks:
            s.close()
        self.socks = []

    def drain(self) -> list[Frame]:
        out: list[Frame] = []
        for i, s in self.socks:
            while True:
                try:
                    data, anc, _, addr = s.recvmsg(65535, 64)
                except BlockingIOError:
                    break
                ts = time.time_ns()
                for level, kind, value in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", value[:16])
                        ts = sec * 1_000_000_000 + nsec
                out.append(Frame(i, ts, addr[2] == PACKET_OUTGOING, data))
        return out

    def until_quiet(self, quiet: float = 0.15, limit: float = 3.0) -> list[Frame]:
        """Collect until no socket has had a frame for ``quiet`` seconds (or ``limit``)."""
        frames = self.drain()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            ready, _, _ = select.select([s for _, s in self.socks], [], [], quiet)
            if not ready:
                break
            frames += self.drain()
        return frames
