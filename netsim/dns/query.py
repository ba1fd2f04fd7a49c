"""A small DNS client (RFC 1035 over UDP), standard library only: one question, the
answer section decoded for A, CNAME, SRV and PTR. netsim uses it to check that the
cluster DNS answers (readiness, record-update latency, selftest) from inside a namespace.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

TYPES = {"A": 1, "CNAME": 5, "PTR": 12, "SRV": 33, "AAAA": 28}
NAMES = {v: k for k, v in TYPES.items()}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


@dataclass(frozen=True)
class Answer:
    rcode: str
    records: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)   # (name, type, value)

    def values(self, rtype: str = "A") -> list[str]:
        return [v for _, t, v in self.records if t == rtype]


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def build_query(name: str, qtype: str = "A", ident: int = 0) -> bytes:
    """A recursion-desired query for ``name``."""
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", TYPES[qtype], 1)


def _read_name(data: bytes, off: int) -> tuple[str, int]:
    """A possibly compressed name at ``off``; returns it and the offset after it."""
    labels, end, jumps = [], None, 0
    while True:
        length = data[off]
        if length & 0xC0 == 0xC0:
            if end is None:
                end = off + 2
            off = ((length & 0x3F) << 8) | data[off + 1]
            jumps += 1
            if jumps > 64:
                raise ValueError("DNS name compression loop")
            continue
        off += 1
        if length == 0:
            break
        labels.append(data[off:off + length].decode(errors="replace"))
        off += length
    return ".".join(labels), end if end is not None else off


def parse_response(data: bytes, ident: int | None = None) -> Answer:
    ident_got, flags, qd, an, _, _ = struct.unpack("!HHHHHH", data[:12])
    if ident is not None and ident_got != ident:
        raise ValueError("DNS reply id does not match the query")
    off = 12
    for _ in range(qd):
        _, off = _read_name(data, off)
        off += 4
    records = []
    for _ in range(an):
        name, off = _read_name(data, off)
        rtype, _, _, rdlen = struct.unpack("!HHIH", data[off:off + 10])
        off += 10
        rdata = data[off:off + rdlen]
        if rtype == 1:
            value = socket.inet_ntoa(rdata)
        elif rtype in (5, 12):
            value = _read_name(data, off)[0]
        elif rtype == 33:
            prio, weight, port = struct.unpack("!HHH", rdata[:6])
            value = f"{prio} {weight} {port} {_read_name(data, off + 6)[0]}"
        else:
            value = rdata.hex()
        records.append((name, NAMES.get(rtype, str(rtype)), value))
        off += rdlen
    return Answer(RCODES.get(flags & 0xF, str(flags & 0xF)), tuple(records))


def query(server: str, name: str, qtype: str = "A", netns: str | None = None,
          timeout: float = 1.0, port: int = 53) -> Answer:
    """Ask ``server`` once, from inside ``netns`` (or here). Raises OSError on no reply."""
    from ..apply import netns as nsmod
    ident = int.from_bytes(os.urandom(2), "big")
    family, kind = socket.AF_INET, socket.SOCK_DGRAM
    s = nsmod.socket_in(netns, family, kind) if netns else socket.socket(family, kind)
    with s:
        s.settimeout(timeout)
        s.connect((server, port))
        s.send(build_query(name, qtype, ident))
        while True:
            data = s.recv(4096)
            try:
                return parse_response(data, ident)
            except ValueError:
                continue                  # a stray reply: keep waiting for ours
