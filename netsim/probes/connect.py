"""Plain-socket primitives run inside a namespace: the built-in server's second opinion.

Every pod (and external host) runs netsim's server: over TCP, HTTP ``/hostname`` and
``/clientip``; over UDP the datagrams ``hostname`` and ``clientip``. ``ask`` puts both
questions on ONE connection (two pipelined HTTP/1.1 requests) or one UDP socket, so
the name and the source address come from the same backend even behind a Service.
Sockets are created inside the namespace and keep it; nothing else changes there.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from ..apply import netns


@dataclass(frozen=True)
class Answer:
    hostname: str              # what the server says it is
    seen: str                  # "ip:port" the server saw as its peer
    local: str                 # "ip:port" of our socket


def ask(ns: str, ip: str, port: int, proto: str, timeout: float = 1.0, sport: int = 0) -> Answer:
    """Ask the server at ``ip:port`` for its name and the address it saw, over one flow."""
    if proto == "udp":
        with netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            if sport:
                s.bind(("0.0.0.0", sport))
            s.connect((ip, port))
            s.send(b"hostname")
            name = s.recv(65535).decode(errors="replace")
            s.send(b"clientip")
            seen = s.recv(65535).decode(errors="replace")
            local = "%s:%d" % s.getsockname()
        return Answer(name, seen, local)
    with netns.socket_in(ns, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", sport))
        s.connect((ip, port))
        local = "%s:%d" % s.getsockname()
        host = f"Host: {ip}\r\n"
        s.sendall(f"GET /hostname HTTP/1.1\r\n{host}\r\n"
                  f"GET /clientip HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    bodies = _http_bodies(data, ip, port)
    if len(bodies) != 2:
        raise OSError(f"expected two HTTP replies from {ip}:{port}, got {len(bodies)}")
    return Answer(bodies[0], bodies[1], local)


def _http_bodies(data: bytes, ip: str, port: int) -> list[str]:
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
            raise OSError(f"unexpected reply from {ip}:{port}: {head[:40]!r}")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value.strip())
        out.append(rest[:length].decode(errors="replace"))
        data = rest[length:]
    return out


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
    packet = header[:2] + struct.pack("!H", checksum(header + payload)) + header[4:] + payload
    with netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(packet, (ip, 0))
        while True:
            data, addr = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if addr[0] == ip and kind == 0 and rid == ident:
                return True


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF
