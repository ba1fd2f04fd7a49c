"""A bounded new-connection loop, run inside a pod's (or a raw) network namespace.

    ip netns exec NS python -m netsim.bench.connect IP PORT --count 2000 --seconds 2 [--warmup 100]
    ip netns exec NS python -m netsim.bench.connect --serve IP PORT --seconds 600

Each iteration opens a TCP socket, times ``connect()`` (the handshake: SYN out, SYN-ACK
back, so the first packet's trip through the node's NAT rules is inside it) with
``perf_counter_ns``, and closes with SO_LINGER 0 (a RST: no TIME_WAIT, so ports and
conntrack entries do not pile up). The server only has to listen. The loop stops after
``count`` connections or ``seconds``, whichever comes first; ``warmup`` connections
before it are not recorded. Prints one JSON object: latencies (ns), the measured
seconds, and errors. ``--serve`` is the listener for namespaces without a pod server (the
raw veth): it accepts and closes, for at most ``--seconds``.
"""
from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

LINGER_RST = struct.pack("ii", 1, 0)
MAX_COUNT = 100_000
MAX_SECONDS = 60.0


def one(addr: tuple[str, int], timeout: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        s.settimeout(timeout)
        t0 = time.perf_counter_ns()
        s.connect(addr)
        return time.perf_counter_ns() - t0
    finally:
        s.close()


def loop(addr: tuple[str, int], count: int, seconds: float, warmup: int = 0, timeout: float = 1.0) -> dict:
    count, seconds = min(count, MAX_COUNT), min(seconds, MAX_SECONDS)
    errors = 0
    for _ in range(warmup):
        try:
            one(addr, timeout)
        except OSError:
            errors += 1
    lat: list[int] = []
    failed = 0
    start = time.perf_counter()
    deadline = start + seconds
    while len(lat) + failed < count and time.perf_counter() < deadline:
        try:
            lat.append(one(addr, timeout))
        except OSError:
            failed += 1
            if failed > max(10, count // 10):
                break                     # the path is broken: stop early, report errors
    return {"latencies_ns": lat, "seconds": time.perf_counter() - start, "errors": failed,
            "warmup_errors": errors}


def serve(addr: tuple[str, int], seconds: float) -> None:
    """Accept and close connections on ``addr`` until ``seconds`` have passed."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(4096)
    deadline = time.monotonic() + seconds
    s.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            c, _ = s.accept()
        except (socket.timeout, OSError):
            continue
        c.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsim.bench.connect", description=__doc__.splitlines()[0])
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--serve", action="store_true", help="be the listener instead")
    a = p.parse_args(argv)
    if a.serve:
        serve((a.ip, a.port), a.seconds)
        return 0
    json.dump(loop((a.ip, a.port), a.count, a.seconds, a.warmup), sys.stdout, separators=(",", ":"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
