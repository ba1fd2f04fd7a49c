"""A small DNS client (RFC 1035, UDP with EDNS and TCP on truncation), standard library
only: one question, the answer section decoded for A, CNAME, SRV and PTR. netsim uses it to check that the
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


class Truncated(OSError):
    """The UDP reply did not fit: ask again over TCP."""


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


EDNS_SIZE = 4096


def build_query(name: str, qtype: str = "A", ident: int = 0) -> bytes:
    """A recursion-desired query for ``name``, with an EDNS(0) OPT record offering 4096-byte
    replies (as dig does), so that a headless Service with many endpoints is not truncated."""
    opt = b"\0" + struct.pack("!HHIH", 41, EDNS_SIZE, 0, 0)
    return (struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 1) + encode_name(name)
            + struct.pack("!HH", TYPES[qtype], 1) + opt)


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
    if flags & 0x0200:
        raise Truncated("DNS reply truncated (TC set)")
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
    """Ask ``server`` once over UDP, from inside ``netns`` (or here), and over TCP if the
    reply was truncated, as a stub resolver does. Raises OSError on no reply."""
    try:
        return _ask(server, name, qtype, netns, timeout, port, tcp=False)
    except Truncated:
        return _ask(server, name, qtype, netns, timeout, port, tcp=True)


def _ask(server: str, name: str, qtype: str, netns: str | None, timeout: float, port: int, tcp: bool) -> Answer:
    from ..apply import netns as nsmod
    ident = int.from_bytes(os.urandom(2), "big")
    family, kind = socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    s = nsmod.socket_in(netns, family, kind) if netns else socket.socket(family, kind)
    with s:
        s.settimeout(timeout)
        s.connect((server, port))
        message = build_query(name, qtype, ident)
        if tcp:
            s.sendall(struct.pack("!H", len(message)) + message)
            return parse_response(_read_tcp(s), ident)
        s.send(message)
        while True:
            data = s.recv(65535)
            try:
                return parse_response(data, ident)
            except ValueError:
                continue                  # a stray reply: keep waiting for ours


def _read_tcp(s: socket.socket) -> bytes:
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
        chunk = s.recv(65535)
        if not chunk:
            raise OSError("DNS server closed the TCP connection early")
        data += chunk
    return data[2:2 + struct.unpack("!H", data[:2])[0]]


def describe(data: bytes) -> str:
    """One line for a DNS message, as a trace shows it: ``DNS query A web.default.svc.cluster.local``
    or ``DNS answer NOERROR A 10.96.1.2`` (``DNS answer NXDOMAIN``). Raises ValueError if
    ``data`` is not a DNS message."""
    if len(data) < 12:
        raise ValueError("too short for a DNS header")
    flags, qd = struct.unpack("!HH", data[2:6])
    qname, qtype = "", ""
    if qd:
        qname, off = _read_name(data, 12)
        qtype = NAMES.get(struct.unpack("!H", data[off:off + 2])[0], "?")
    if not flags & 0x8000:
        return f"DNS query {qtype} {qname}".rstrip()
    try:
        answer = parse_response(data)
    except Truncated:
        return "DNS answer truncated (TC)"
    values = ", ".join(f"{t} {v}" for _, t, v in answer.records)
    return f"DNS answer {answer.rcode}" + (f" {values}" if values else "")
