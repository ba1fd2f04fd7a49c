"""Does a pod answer? Asked from inside its node, the way a kubelet probe would.

TCP ports get ``GET /hostname`` and must return the pod's name; UDP ports get the
``hostname`` datagram; pods without ports must answer an ICMP echo.
"""
from __future__ import annotations

import os
import socket
import struct

from ..apply import netns
from ..plan.state import PodPlan


def answers(pod: PodPlan, node_netns: str, timeout: float = 0.5) -> bool:
    """One check, no retries. True when the pod replied with its own name (or to ping)."""
    try:
        tcp = [p for p in pod.ports if p.protocol == "TCP"]
        udp = [p for p in pod.ports if p.protocol == "UDP"]
        if tcp:
            return http_get(node_netns, pod.ip, tcp[0].port, "/hostname", timeout) == pod.name
        if udp:
            return udp_ask(node_netns, pod.ip, udp[0].port, b"hostname", timeout) == pod.name
        return ping(node_netns, pod.ip, timeout)
    except OSError:
        return False


def http_get(ns: str, ip: str, port: int, path: str, timeout: float = 2.0) -> str:
    """Body of ``GET path`` sent from inside namespace ``ns``."""
    with netns.socket_in(ns, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((ip, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
        raise OSError(f"unexpected reply from {ip}:{port}: {head[:40]!r}")
    return body.decode(errors="replace")


def udp_ask(ns: str, ip: str, port: int, message: bytes, timeout: float = 1.0) -> str:
    with netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(message, (ip, port))
        return s.recv(65535).decode(errors="replace")


def ping(ns: str, ip: str, timeout: float = 1.0) -> bool:
    """One ICMP echo over a raw socket; True on a matching echo reply."""
    ident = os.getpid() & 0xFFFF
    payload = b"netsim"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    packet = header[:2] + struct.pack("!H", _checksum(header + payload)) + header[4:] + payload
    with netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(packet, (ip, 0))
        while True:
            data, addr = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if addr[0] == ip and kind == 0 and rid == ident:
                return True


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF
