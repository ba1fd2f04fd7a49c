"""Overlay throughput benchmark: pod-to-pod iperf3 TCP throughput, compared with a raw veth.

    .venv/bin/python benchmarks/overlay_throughput.py [--repeat 5] [--seconds 5] [--quick] [--out FILE]

One run measures every path, so their ratios are comparable on a noisy, shared machine:

- ``raw-veth``:        two namespaces joined by one veth pair, made here by hand
                       (``bo-raw-a``/``bo-raw-b``): the limit of this kernel;
- ``same-node``:       two pods on one node's cni0 bridge (vxlan lab; br_netfilter is on);
- ``same-node-hostgw``: the same in the host-gw lab (pod MTU 1500 instead of 1450);
- ``vxlan``:           pods on two nodes of a ``cluster.overlay: vxlan`` lab;
- ``host-gw``:         pods on two nodes of a ``cluster.overlay: host-gw`` lab.

Each sample is a single TCP stream, ``iperf3 -t SECONDS --omit 1 -J``, against a
one-off server (``iperf3 -s -1``) started in the server's namespace with
``ip netns exec``; the server's readiness is read from its own ``/proc/PID/net/tcp``
(a LISTEN socket on the port), never slept for. The repetitions are interleaved
(round r measures every path once) so that noise from other load is spread over all
paths; medians, min and max are reported, and each path's ratio to raw veth (the ratio
of medians, and the median of the per-round ratios). Runs as root; both labs are torn
down and the raw namespaces deleted, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from netsim.bench.tools import RawVeth, Reaper, iperf as bench_iperf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NETSIM = [sys.executable, "-m", "netsim"]
PORT = 5201                     # pods serve their declared port (8080); iperf3 uses another
RAW_A, RAW_B = "bo-raw-a", "bo-raw-b"
RAW_IP_A, RAW_IP_B = "10.199.0.1", "10.199.0.2"
LABS = {"vxlan": "bothr-vxlan", "host-gw": "bothr-hostgw"}

PATHS = [  # name, description, lab overlay (None: raw veth), server pod, client pod
    ("raw-veth", "raw veth between two namespaces (the limit)", None, None, None),
    ("same-node", "two pods on one node (bridge, vxlan lab)", "vxlan", "srv", "near"),
    ("same-node-hostgw", "two pods on one node (bridge, host-gw lab)", "host-gw", "srv", "near"),
    ("vxlan", "pods on two nodes, vxlan", "vxlan", "srv", "far"),
    ("host-gw", "pods on two nodes, host-gw", "host-gw", "srv", "far"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def topology(tmp: Path, lab: str, overlay: str) -> Path:
    pod = """  - apiVersion: v1
    kind: Pod
    metadata: {{name: {name}}}
    spec:
      nodeName: {node}
      containers: [{{name: c, image: busybox, ports: [{{containerPort: 8080}}]}}]
"""
    path = tmp / f"{lab}.yaml"
    path.write_text(f"""name: {lab}
cluster:
  overlay: {overlay}
nodes:
  - name: n1
  - name: n2
manifests:
""" + pod.format(name="srv", node="n1") + pod.format(name="near", node="n1")
                    + pod.format(name="far", node="n2"))
    return path


RAW = RawVeth(RAW_A, RAW_B, RAW_IP_A, RAW_IP_B)


def iperf(server_ns: str, server_ip: str, client_ns: str, seconds: int, reaper: Reaper) -> dict:
    return bench_iperf(server_ns, server_ip, client_ns, seconds, reaper, omit=1, port=PORT)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


# -- the run -----------------------------------------------------------------------------

def endpoints(status: dict, server: str, client: str) -> tuple[str, str, str]:
    pods = {p["name"]: p for p in status["pods"]}
    return pods[server]["netns"], pods[server]["ip"], pods[client]["netns"]


def summary(values: list[float]) -> dict:
    a = np.array(values, dtype=float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="samples per path (default 5)")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t, after a 1 s omitted warm-up (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 samples of 2 s per path")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overlay_throughput.json"))
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.seconds = 2, 2
    if os.geteuid() != 0:
        sys.exit("overlay_throughput: needs root (namespaces, veths, labs)")

    samples: dict[str, list[dict]] = {name: [] for name, *_ in PATHS}
    servers = Reaper()
    up: list[str] = []
    load_before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log(f"creating {RAW_A}/{RAW_B} (raw veth)")
            RAW.up()
            status = {}
            for overlay, lab in LABS.items():
                log(f"netsim up {lab} (overlay {overlay})")
                up.append(lab)
                subprocess.run(NETSIM + ["up", str(topology(Path(tmp), lab, overlay)), "--timeout", "120"],
                               check=True, stdout=subprocess.DEVNULL, cwd=REPO)
                status[overlay] = json.loads(subprocess.run(NETSIM + ["status", lab, "-o", "json"], check=True,
                                                            capture_output=True, text=True, cwd=REPO).stdout)
            for r in range(args.repeat):
                for name, _, overlay, srv, cli in PATHS:
                    if overlay is None:
                        ends = (RAW_A, RAW_IP_A, RAW_B)
                    else:
                        ends = endpoints(status[overlay], srv, cli)
                    s = iperf(*ends, args.seconds, servers)
                    samples[name].append(s)
                    log(f"round {r + 1}/{args.repeat} {name:17s} {s['gbit_s']:6.2f} Gbit/s  "
                        f"retransmits {s['retransmits']}")
    finally:
        servers.reap()
        for lab in up:
            log(f"netsim down {lab}")
            subprocess.run(NETSIM + ["down", lab], stdout=subprocess.DEVNULL, cwd=REPO)
        log(f"deleting {RAW_A}/{RAW_B}")
        RAW.down()

    raw = [s["gbit_s"] for s in samples["raw-veth"]]
    rows = []
    for name, desc, overlay, _, _ in PATHS:
        g = [s["gbit_s"] for s in samples[name]]
        per_round = [x / y for x, y in zip(g, raw)]
        rows.append({"path": name, "description": desc, "overlay": overlay,
                     "gbit_s": summary(g),
                     "ratio_to_raw_veth": float(np.median(g) / np.median(raw)),
                     "ratio_to_raw_veth_per_round": summary(per_round),
                     "retransmits_median": float(np.median([s["retransmits"] or 0 for s in samples[name]])),
                     "mss": samples[name][0]["mss"],
                     "samples": samples[name]})
    result = {"benchmark": "overlay_throughput", "kernel": platform.release(), "cores": os.cpu_count(),
              "python": platform.python_version(),
              "iperf3": sh("iperf3", "--version", check=False).stdout.splitlines()[0],
              "repeat": args.repeat, "seconds": args.seconds, "omit": 1, "streams": 1,
              "loadavg_before": load_before, "loadavg_after": loadavg(),
              "date": started, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print()
    print(f"iperf3, 1 TCP stream, {args.seconds} s (+1 s omitted), medians of {args.repeat}; "
          f"kernel {result['kernel']}, {result['cores']} cores, {started}")
    print()
    print("| path | Gbit/s median (min–max) | ratio to raw veth | per-round ratio (min–max) | retransmits (median) |")
    print("|---|---|---|---|---|")
    for row in rows:
        g, pr = row["gbit_s"], row["ratio_to_raw_veth_per_round"]
        print(f"| {row['description']} | {g['median']:.1f} ({g['min']:.1f}–{g['max']:.1f}) | "
              f"{row['ratio_to_raw_veth']:.2f} | {pr['median']:.2f} ({pr['min']:.2f}–{pr['max']:.2f}) | "
              f"{row['retransmits_median']:.0f} |")
    print(f"\nresults in {args.out}")


if __name__ == "__main__":
    main()
