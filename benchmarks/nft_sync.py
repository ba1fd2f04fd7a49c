"""nftables-mode sync cost: one ``nft -f`` transaction for a full sync, and for one change.

    .venv/bin/python benchmarks/nft_sync.py [--services 1000 10000] [--repeat 5] [--out FILE]

For each size N, in a throw-away network namespace: N ClusterIP services with 2 endpoints
each (every tenth a NodePort), loaded by the nftables backend as kube-proxy loads them:

* full sync: render + transaction text (Python) and ``nft -f`` (kernel), measured apart;
* partial syncs, each of one service (median of ``--repeat``): an endpoint replaced, a
  service added, a service deleted. Only that service's chains and elements are written;
* for comparison, the same services as one ``iptables-nft-restore`` (iptables mode's
  full sync) and iptables mode's partial sync of one changed service.

Runs as root; the namespace is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from netsim.proxy.backend import port_key  # noqa: E402
from netsim.proxy.model import Endpoint, NodeContext, ServicePort  # noqa: E402

NODE = NodeContext("node-1", ("192.168.100.2",), "10.244.0.0/16", service_cidrs=("10.96.0.0/12",))


def services(n: int) -> list[ServicePort]:
    out = []
    for i in range(n):
        cip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
        eps = (Endpoint(f"10.244.{1 + i % 3}.{2 + i % 250}", 8080, f"node-{1 + i % 3}"),
               Endpoint(f"10.244.{1 + (i + 1) % 3}.{2 + i % 250}", 8080, f"node-{1 + (i + 1) % 3}"))
        out.append(ServicePort("bench", f"svc-{i}", "http", "TCP", 80, cip, endpoints=tuple(sorted(eps, key=lambda e: e.address)),
                               node_port=30000 + i % 2700 if i % 10 == 0 and i < 27000 else None))
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def nft_load(text: str) -> float:
    _, took = timed(lambda: subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True, capture_output=True))
    return took


def inside(n: int, repeat: int) -> dict:
    """Runs inside the namespace: the measurements for one size."""
    from netsim.proxy import nftables as nft
    from netsim.proxy.iptables_apply import Backend as IptBackend
    ports = services(n)
    state, t_render = timed(lambda: nft.render(ports, NODE))
    tx, t_tx = timed(lambda: nft.transaction(state, NODE))
    t_full = nft_load(tx.text)
    res = {"services": n, "chains": len(state.chains), "rules": state.rule_count,
           "full": {"python_s": round(t_render + t_tx, 3), "nft_s": round(t_full, 3),
                    "text_kib": round(len(tx.text) / 1024)}}
    # one change at a time, each against the state the kernel holds
    cases = {"endpoint replaced": [], "service added": [], "service deleted": []}
    for r in range(repeat):
        i = (r * 7919) % n
        changed_port = replace(ports[i], endpoints=(Endpoint(f"10.244.9.{r + 2}", 8080, "node-2"),) + ports[i].endpoints[1:])
        for case, new_ports, key in (
                ("endpoint replaced", ports[:i] + [changed_port] + ports[i + 1:], port_key(ports[i])),
                ("service added", ports + [replace(ports[i], name=f"extra-{r}", cluster_ip=f"10.111.0.{r + 1}",
                                                   node_port=None)], port_key(replace(ports[i], name=f"extra-{r}"))),
                ("service deleted", ports[:i] + ports[i + 1:], port_key(ports[i]))):
            t0 = time.perf_counter()
            new_state = nft.render(new_ports, NODE)
            ptx = nft.transaction(new_state, NODE, previous=state, changed={key})
            t_py = time.perf_counter() - t0
            t_nft = nft_load(ptx.text)
            cases[case].append((t_py, t_nft, ptx.rules_written + ptx.elements_written + len(ptx.stale_chains)))
            # back to the base state, so every case starts from N services
            nft_load(nft.transaction(state, NODE, previous=new_state, changed={key}).text)
    res["partial"] = {case: {"python_ms": round(statistics.median(v[0] for v in vals) * 1000, 1),
                             "nft_ms": round(statistics.median(v[1] for v in vals) * 1000, 1),
                             "objects_written": int(statistics.median(v[2] for v in vals))}
                      for case, vals in cases.items()}
    subprocess.run(["nft", "delete", "table", "ip", "kube-proxy"], check=True)
    # iptables mode, same services, for comparison
    ipt = IptBackend(NODE, "nft")
    full, t_ipt = timed(lambda: ipt.sync(ports, None))
    changed_port = replace(ports[0], endpoints=(Endpoint("10.244.9.1", 8080, "node-2"),) + ports[0].endpoints[1:])
    _, t_ipt_partial = timed(lambda: ipt.sync([changed_port] + ports[1:], {port_key(ports[0])}))
    res["iptables_nft_restore"] = {"full_s": round(t_ipt, 3), "one_service_ms": round(t_ipt_partial * 1000, 1),
                                   "rules": full.rules}
    ipt.cleanup()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, nargs="+", default=[1000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--inside", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside is not None:
        print(json.dumps(inside(args.inside, args.repeat)))
        return 0
    ns = f"nf-bench-{__import__('os').getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    results = []
    try:
        for n in args.services:
            done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", str(n),
                                   "--repeat", str(args.repeat)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"size {n} failed: {done.stderr.strip().splitlines()[-1:]}")
            results.append(json.loads(done.stdout))
            r = results[-1]
            print(f"{n:>6} services, {r['chains']} chains: full sync python {r['full']['python_s']} s + "
                  f"nft -f {r['full']['nft_s']} s ({r['full']['text_kib']} KiB); iptables-nft-restore "
                  f"{r['iptables_nft_restore']['full_s']} s", flush=True)
            for case, v in r["partial"].items():
                print(f"        one service, {case}: python {v['python_ms']} ms + nft -f {v['nft_ms']} ms "
                      f"({v['objects_written']} objects)", flush=True)
            print(f"        one service, iptables mode partial restore: {r['iptables_nft_restore']['one_service_ms']} ms")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"kernel": platform.release(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
