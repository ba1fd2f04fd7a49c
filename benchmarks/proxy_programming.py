"""Network-programming latency: one Service changed on a running lab with N Services.

    .venv/bin/python benchmarks/proxy_programming.py [--services 1 1000] [--repeat 5] [--mode iptables]

For each N a 3-node lab is brought up with a 6-replica Deployment and N ClusterIP
Services selecting it (2 endpoints each after a one-port selector; each Service
has its own ClusterIP). Then, ``--repeat`` times, one Service is added with
``netsim apply -f`` and deleted again with ``netsim delete -f``; netsim reports the
latency kube-proxy's SLI measures: from the write of the changed Service to its rules
being in the kernel of *every* node (the slowest node counts). kube-proxy's
``--min-sync-period`` (1 s by default) rate-limits syncs, so a change that arrives
within 1 s of the previous sync waits for the rest of that second, as upstream does.
The benchmark runs with ``minSyncPeriod`` 0 (the agent's own cost: every change synced
at once) and 1 s (kube-proxy's default). Runs as root; every lab is torn down.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netsim.bench.system import write_result

REPO = Path(__file__).resolve().parents[1]
NETSIM = [sys.executable, "-m", "netsim"]


def topology(tmp: Path, lab: str, services: int, mode: str, min_sync: float) -> Path:
    svc = "\n".join(f"""  - apiVersion: v1
    kind: Service
    metadata: {{name: s{i}}}
    spec:
      selector: {{app: web}}
      ports: [{{port: 80, targetPort: 8080}}]""" for i in range(services))
    path = tmp / f"{lab}.yaml"
    path.write_text(f"""name: {lab}
cluster: {{proxyMode: {mode}, minSyncPeriod: {min_sync}}}
nodes: [{{name: n1}}, {{name: n2}}, {{name: n3}}]
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web}}
    spec:
      replicas: 2
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec:
          containers: [{{name: web, ports: [{{containerPort: 8080}}]}}]
{svc}
""")
    return path


def change_file(tmp: Path, k: int) -> Path:
    path = tmp / f"probe{k}.yaml"
    path.write_text(f"""apiVersion: v1
kind: Service
metadata: {{name: probe{k}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 81, targetPort: 8080}}]
""")
    return path


def netsim(*args: str) -> str:
    return subprocess.run(NETSIM + list(args), check=True, capture_output=True, text=True, cwd=REPO,
                          timeout=600).stdout


def programming_ms(output: str) -> float:
    m = re.search(r"reprogrammed on every node in (\d+) ms", output)
    if not m:
        raise RuntimeError(f"netsim did not report a programming time: {output!r}")
    return float(m.group(1))


def first_sync(lab: str) -> dict:
    out = {}
    for f in sorted(Path(f"/run/netsim/{lab}/kube-proxy").glob("*.json")):
        st = json.loads(f.read_text())
        out[st["node"]] = {"rules": st.get("rules"), "last_sync_seconds": st.get("last_sync_seconds")}
    return out


def measure(n: int, repeat: int, mode: str, min_sync: float, tmp: Path, prefix: str = "") -> dict:
    lab = f"{prefix}bpp{n}"
    topo = topology(tmp, lab, n, mode, min_sync)
    t0 = time.perf_counter()
    netsim("up", str(topo), "--timeout", "600")
    up_s = time.perf_counter() - t0
    adds, deletes = [], []
    try:
        nodes = first_sync(lab)
        for k in range(repeat):
            f = change_file(tmp, k)
            adds.append(programming_ms(netsim("apply", "-f", str(f), "--lab", lab)))
            deletes.append(programming_ms(netsim("delete", "-f", str(f), "--lab", lab)))
            print(f"  N={n}: add {adds[-1]:.0f} ms, delete {deletes[-1]:.0f} ms", flush=True)
    finally:
        netsim("down", lab)
    return {"services": n, "mode": mode, "min_sync_period_s": min_sync, "up_s": round(up_s, 2), "nodes": nodes,
            "add_ms": adds, "delete_ms": deletes,
            "add_ms_median": statistics.median(adds), "delete_ms_median": statistics.median(deletes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mode", default="iptables")
    ap.add_argument("--min-sync-period", type=float, nargs="+", default=[0.0, 1.0],
                    help="kube-proxy --min-sync-period values to run (0: every change synced at once)")
    ap.add_argument("--lab-prefix", default="", help="prefix of the labs' names")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "proxy_programming.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, ms in ((n, ms) for ms in args.min_sync_period for n in args.services):
            row = measure(n, args.repeat, args.mode, ms, Path(tmp), args.lab_prefix)
            rows.append(row)
            print(f"{n:5d} Services ({args.mode}, minSyncPeriod {ms:g} s): one Service added → every node programmed in "
                  f"{row['add_ms_median']:.0f} ms, deleted in {row['delete_ms_median']:.0f} ms (median of "
                  f"{args.repeat}); lab up in {row['up_s']:.1f} s", flush=True)
    write_result("proxy_programming", rows, args.out)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
