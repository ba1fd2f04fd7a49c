"""A tiny client for UML's management console (the protocol uml_mconsole speaks).

One datagram per request on the guest's ``mconsole`` Unix socket: magic 0xcafebabe,
version 2, length and up to 512 bytes of command; the reply carries err, more, length and
data. netsim uses ``log <text>`` (the text lands in the guest's kernel log, where the
request server reads /dev/kmsg: a wake-up without polling) and ``halt``.
"""
from __future__ import annotations

import os
import secrets
import socket
import struct

MAGIC = 0xCAFEBABE
VERSION = 2
MAX_DATA = 512


class MconsoleError(OSError):
    pass


def encode(command: str) -> bytes:
    data = command.encode()
    if len(data) >= MAX_DATA:
        raise MconsoleError(f"mconsole command longer than {MAX_DATA - 1} bytes")
    return struct.pack(f"=III{MAX_DATA}s", MAGIC, VERSION, len(data), data)


def decode(reply: bytes) -> tuple[int, bool, str]:
    err, more, length = struct.unpack_from("=III", reply)
    return err, bool(more), reply[12:12 + length].decode(errors="replace")


def send(sock_path: str | os.PathLike, command: str, timeout: float = 5.0) -> str:
    """Send one command; return the reply text (raises MconsoleError on a guest error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(f"\0netsim-mconsole-{os.getpid()}-{secrets.token_hex(4)}")   # abstract: nothing to clean
        s.settimeout(timeout)
        s.sendto(encode(command), os.fspath(sock_path))
        text, more = "", True
        while more:
            err, more, chunk = decode(s.recv(12 + MAX_DATA))
            text += chunk
            if err:
                raise MconsoleError(f"mconsole {command!r}: {text.strip()}")
        return text
