"""A minimal pcapng writer: one interface block per hop, one packet block per frame.

Each interface carries its hop's name (``node-1 cni0``) and role as ``if_name`` and
``if_description``, nanosecond timestamps (``if_tsresol`` 9); each packet its direction
(``epb_flags``) and a comment saying where it is in the walk. Wireshark and tshark open
it as it is; VXLAN on flannel's port 8472 decodes with ``-d udp.port==8472,vxlan``.
"""
from __future__ import annotations

import struct

LINKTYPE_ETHERNET = 1


def _option(code: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def section_header(app: str = "netsim trace") -> bytes:
    body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
    body += _option(4, app.encode()) + _option(0, b"")           # shb_userappl, end
    return _block(0x0A0D0D0A, body)


def interface(name: str, description: str) -> bytes:
    body = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 0)
    body += _option(2, name.encode()) + _option(3, description.encode())
    body += _option(9, bytes([9])) + _option(0, b"")               # if_tsresol: nanoseconds
    return _block(0x00000001, body)


def packet(iface: int, ts_ns: int, data: bytes, outgoing: bool | None = None, comment: str = "") -> bytes:
    body = struct.pack("<IIIII", iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), len(data))
    body += data + b"\0" * ((-len(data)) % 4)
    opts = b""
    if comment:
        opts += _option(1, comment.encode())
    if outgoing is not None:
        opts += _option(2, struct.pack("<I", 2 if outgoing else 1))  # epb_flags: direction
    if opts:
        body += opts + _option(0, b"")
    return _block(0x00000006, body)


def write(path: str, interfaces: list[tuple[str, str]], packets: list[tuple[int, int, bytes, bool | None, str]]) -> None:
    """``interfaces``: (name, description); ``packets``: (iface index, ts_ns, frame, outgoing, comment)."""
    with open(path, "wb") as f:
        f.write(section_header())
        for name, desc in interfaces:
            f.write(interface(name, desc))
        for iface, ts, data, outgoing, comment in packets:
            f.write(packet(iface, ts, data, outgoing, comment))
