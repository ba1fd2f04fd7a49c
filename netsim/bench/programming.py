"""Rule programming time of one proxy mode's Backend, run inside a throw-away namespace.

    ip netns exec NS python -m netsim.bench.programming --mode M [--iptables-backend B] \\
        --services N [--repeat R] [--budget S] [--warmup 0|1]

This is exactly what a node's kube-proxy agent calls (``netsim.proxy.<mode>_apply.Backend``),
with the agent's registry and watch taken away, so repetitions are cheap and nothing else
shares the timing. Each repetition starts from an empty namespace (``cleanup()``, as
``kube-proxy --cleanup``, then a new Backend), times a full sync of N synthetic Services
(2 endpoints each), then times a partial sync in which one of them gained an endpoint.
Repetitions stop after ``repeat`` or once ``budget`` seconds are spent (at least one).
Prints one JSON object with the per-repetition seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from ..proxy.backend import backend_class, port_key
from ..proxy.model import NodeContext
from ..proxy.synthetic import synthetic_ports

NODE = NodeContext("bench-node", ("192.168.0.2",), "10.244.0.0/16", service_cidrs=("10.96.0.0/12",))


def one_changed(ports):
    """The same ports with one endpoint added to the Service in the middle of the list."""
    i = len(ports) // 2
    p = ports[i]
    extra = replace(p.endpoints[0], ip="10.191.0.1", node="node-2")
    changed = replace(p, endpoints=tuple(sorted(p.endpoints + (extra,), key=lambda e: e.address)))
    return ports[:i] + [changed] + ports[i + 1:], port_key(changed)


def repetition(mode: str, iptables_backend: str, ports) -> dict:
    cls = backend_class(mode)
    cls(NODE, iptables_backend).cleanup()
    backend = cls(NODE, iptables_backend)
    backend.setup()
    t0 = time.perf_counter()
    full = backend.sync(ports, None)
    t1 = time.perf_counter()
    ports2, key = one_changed(ports)
    partial = backend.sync(ports2, {key})
    t2 = time.perf_counter()
    return {"full_sync_s": t1 - t0, "one_changed_s": t2 - t1, "rules": full.rules,
            "written_full": full.written, "written_one_changed": partial.written}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsim.bench.programming", description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True)
    p.add_argument("--iptables-backend", default="nft", choices=("nft", "legacy"))
    p.add_argument("--services", type=int, required=True)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget", type=float, default=60.0, help="stop repeating after this many seconds")
    p.add_argument("--warmup", type=int, default=0, help="repetitions run first and not recorded")
    a = p.parse_args(argv)
    ports = synthetic_ports(max(a.services, 1), local_node=NODE.name, namespace="bench")
    for _ in range(a.warmup):
        repetition(a.mode, a.iptables_backend, ports)
    reps = []
    start = time.monotonic()
    while len(reps) < a.repeat and (not reps or time.monotonic() - start < a.budget):
        reps.append(repetition(a.mode, a.iptables_backend, ports))
    cls = backend_class(a.mode)
    cls(NODE, a.iptables_backend).cleanup()
    json.dump({"repetitions": reps}, sys.stdout, separators=(",", ":"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
