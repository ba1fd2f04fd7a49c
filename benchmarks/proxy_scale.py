"""kube-proxy iptables mode at scale: render time vs ``iptables-restore`` time, rule counts.

    .venv/bin/python benchmarks/proxy_scale.py [--services 1 100 1000 10000] [--repeat 3]

For each N (Services with 2 endpoints each, netsim.proxy.synthetic) and each iptables
back end (nft, legacy) this renders the full sync, loads it into a throw-away network
namespace with ``iptables-restore --noflush --counters`` (as the agent does), then
renders and loads a partial sync in which one Service changed. Medians over
``--repeat`` runs, each in a fresh namespace. The claim checked: rendering takes no
longer than the restore that loads it. Runs as root; namespaces are deleted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from netsim.bench.system import write_result  # noqa: E402
from netsim.proxy.iptables import port_key, render  # noqa: E402
from netsim.proxy.model import NodeContext  # noqa: E402
from netsim.proxy.synthetic import synthetic_ports  # noqa: E402

NODE = NodeContext("test-node", ("192.168.0.2",), "10.0.0.0/8")
RESTORE = {"nft": "iptables-nft-restore", "legacy": "iptables-legacy-restore"}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def restore(ns: str, backend: str, text: str) -> float:
    _, took = timed(lambda: subprocess.run(["ip", "netns", "exec", ns, RESTORE[backend], "--noflush", "--counters"],
                                           input=text, text=True, check=True, capture_output=True))
    return took


def once(n: int, backend: str, run: int) -> dict:
    ports = synthetic_ports(n)
    full, render_s = timed(lambda: render(ports, NODE))
    ns = f"nsbench-scale-{os.getpid()}-{run}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        restore_s = restore(ns, backend, full.text)
        # one Service gains an endpoint
        changed = replace(ports[0], endpoints=ports[0].endpoints + (replace(ports[0].endpoints[0], ip="10.191.0.1"),))
        ports2 = [changed] + ports[1:]
        partial, prender_s = timed(lambda: render(ports2, NODE, changed={port_key(changed)},
                                                  existing_chains=full.chains))
        prestore_s = restore(ns, backend, partial.text)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    return {"render_s": render_s, "restore_s": restore_s, "partial_render_s": prender_s,
            "partial_restore_s": prestore_s, "rules": full.rule_count, "bytes": len(full.text),
            "partial_rules_written": partial.rules_written}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, nargs="+", default=[1, 100, 1000, 10000])
    ap.add_argument("--backends", nargs="+", default=["legacy", "nft"], choices=sorted(RESTORE))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "proxy_scale.json"))
    args = ap.parse_args()
    rows = []
    for backend in args.backends:
        for n in args.services:
            samples = [once(n, backend, r) for r in range(args.repeat)]
            row = {"services": n, "backend": backend,
                   **{k: statistics.median(s[k] for s in samples) for k in samples[0]}, "samples": samples}
            row["render_not_slower"] = row["render_s"] <= row["restore_s"]
            rows.append(row)
            print(f"{backend:6s} {n:6d} Services: {row['rules']:6d} rules ({row['bytes'] / 1e6:.1f} MB); "
                  f"render {row['render_s'] * 1000:7.1f} ms, restore {row['restore_s'] * 1000:7.1f} ms; "
                  f"one changed: render {row['partial_render_s'] * 1000:6.1f} ms, "
                  f"restore {row['partial_restore_s'] * 1000:6.1f} ms", flush=True)
    write_result("proxy_scale", rows, args.out)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
