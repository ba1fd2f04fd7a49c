"""Overlay convergence benchmark: how long until every peer has programmed a joining (or
leaving) node, for labs of 3 and 10 nodes.

    .venv/bin/python benchmarks/overlay_convergence.py [--nodes 3 10] [--rounds 5]
        [--registry embedded|etcd] [--overlay vxlan|host-gw] [--quick] [--out FILE]

For each lab size the lab is brought up with ``netsim up`` (one pod per node), then each
round adds a node with ``netsim.apply.nodes.add_node`` (what ``netsim node add`` runs) and
removes it again with ``remove_node`` (distinct node names per round), so every round
measures a lab of N nodes plus the joining one. Figures per round:

- ``add``: ``NodeChange.convergence_s`` — from the new node's lease claim (its agent's
  ``acquired_at``, taken just before the claim) to the last of: every peer's
  ``programmed_at`` of the new subnet, and the new node's ``programmed_at`` of every peer
  (status files); each peer's signed offset is kept in ``add_peer_offsets``;
- ``add_reverse``: from the same ``acquired_at`` to the new node having programmed every
  existing peer (its own status file) — the other half of two-way reachability;
- ``remove``: ``NodeChange.convergence_s`` of ``remove_node`` — from the lease delete to
  the last peer's ``removed`` timestamp in its status file;
- ``remove_exact``: from the lease delete (timestamped here by wrapping the registry
  client ``remove_node`` opens) to the last peer's status-file write (its mtime), i.e. the
  same event without the polling quantum;
- ``add_wall``/``remove_wall``: the whole call, namespaces and agents included.

Medians, p90 and max in ms are reported; the target is convergence under 1 s at 10 nodes.
Runs as root; every lab is torn down (``netsim down``) in ``finally``.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NETSIM = [sys.executable, "-m", "netsim"]
TARGET_MS = 1000.0
METRICS = [("add", "add: peers programmed the new node (netsim's figure)"),
           ("add_reverse", "add: new node programmed every peer"),
           ("remove", "remove: netsim's figure (polled)"),
           ("remove_exact", "remove: last peer's status write"),
           ("add_wall", "add_node() call, wall"),
           ("remove_wall", "remove_node() call, wall")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def topology(tmp: Path, lab: str, nodes: int, registry: str, overlay: str) -> Path:
    node_list = "\n".join(f"  - name: n{i + 1}" for i in range(nodes))
    path = tmp / f"{lab}.yaml"
    path.write_text(f"""name: {lab}
cluster:
  registry: {registry}
  overlay: {overlay}
nodes:
{node_list}
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web}}
    spec:
      replicas: {nodes}
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec:
          containers:
            - name: web
              ports: [{{containerPort: 8080, name: http}}]
""")
    return path


class DeleteClock:
    """Wraps the registry client ``remove_node`` opens, to timestamp the lease delete."""

    def __init__(self, open_registry):
        self.open_registry = open_registry
        self.deleted_at: float | None = None

    def __call__(self, url):
        clock, reg = self, self.open_registry(url)

        class Timed:
            def __getattr__(self, name):
                return getattr(reg, name)

            def delete(self, *a, **kw):
                clock.deleted_at = time.time()
                return reg.delete(*a, **kw)
        return Timed()


def status_file(lab: str, node: str) -> Path:
    from netsim.apply.lab import flannel_dir
    return flannel_dir(lab, node) / "status.json"


def one_round(lab: str, name: str, clock: DeleteClock, timeout: float) -> dict:
    from netsim.apply import labstate, nodes
    peers = [n.name for n in labstate.load_plan(lab).nodes]
    t0 = time.perf_counter()
    change = nodes.add_node(lab, name, timeout=timeout)
    add_wall = time.perf_counter() - t0
    subnet = change.node.subnet
    mine = json.loads(status_file(lab, name).read_text())
    reverse = max(p["programmed_at"] for p in mine["peers"].values()) - mine["acquired_at"]
    # Each peer's programmed_at minus acquired_at, unclamped: netsim reports max(last, 0).
    offsets = sorted((json.loads(status_file(lab, p).read_text())["peers"][subnet]["programmed_at"]
                      - mine["acquired_at"]) * 1000 for p in peers)
    clock.deleted_at = None
    t0 = time.perf_counter()
    gone = nodes.remove_node(lab, name, timeout=timeout)
    remove_wall = time.perf_counter() - t0
    written = [status_file(lab, p).stat().st_mtime for p in peers]
    for p in peers:                                   # every peer really dropped it
        assert subnet not in json.loads(status_file(lab, p).read_text())["peers"], (p, subnet)
    return {"node": name, "subnet": subnet, "peers": len(peers),
            "add": change.convergence_s * 1000, "add_reverse": reverse * 1000,
            "add_peer_offsets": offsets, "add_clamped": offsets[-1] < 0,
            "peers_before_acquired_at": sum(o < 0 for o in offsets),
            "remove": gone.convergence_s * 1000,
            "remove_exact": (max(written) - clock.deleted_at) * 1000 if clock.deleted_at else None,
            "add_wall": add_wall * 1000, "remove_wall": remove_wall * 1000}


def stats(values: list[float]) -> dict:
    a = np.array([v for v in values if v is not None], dtype=float)
    if a.size == 0:
        return {}
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[3, 10], help="lab sizes (default 3 10)")
    ap.add_argument("--rounds", type=int, default=5, help="add+remove rounds per size (default 5)")
    ap.add_argument("--registry", choices=["embedded", "etcd"], default="embedded")
    ap.add_argument("--overlay", choices=["vxlan", "host-gw"], default="vxlan")
    ap.add_argument("--timeout", type=float, default=30.0, help="add_node/remove_node timeout, s")
    ap.add_argument("--quick", action="store_true", help="2 rounds per size")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/overlay_convergence.json "
                         "(overlay_convergence_etcd.json with --registry etcd)")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 2
    if os.geteuid() != 0:
        sys.exit("overlay_convergence: needs root (labs)")
    suffix = "" if args.registry == "embedded" else f"_{args.registry}"
    out = Path(args.out or REPO / "benchmarks" / "results" / f"overlay_convergence{suffix}.json")

    from netsim.apply import nodes
    clock = DeleteClock(nodes.open_registry)
    nodes.open_registry = clock                       # only remove_node calls it, for the delete

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.nodes:
            lab = f"bocv-{args.registry[:3]}-{args.overlay[:2]}-{size}"
            topo = topology(Path(tmp), lab, size, args.registry, args.overlay)
            rounds = []
            try:
                log(f"netsim up {lab} ({size} nodes, registry {args.registry}, overlay {args.overlay})")
                t0 = time.perf_counter()
                subprocess.run(NETSIM + ["up", str(topo), "--timeout", "300"], check=True,
                               stdout=subprocess.DEVNULL, cwd=REPO)
                up_s = time.perf_counter() - t0
                for i in range(args.rounds):
                    r = one_round(lab, f"j{i + 1}", clock, args.timeout)
                    rounds.append(r)
                    log(f"{size:3d} nodes, round {i + 1}/{args.rounds}: add {r['add']:6.1f} ms "
                        f"(reverse {r['add_reverse']:6.1f}, call {r['add_wall']:6.0f})  "
                        f"remove {r['remove']:6.1f} ms (exact {r['remove_exact']:6.1f}, call {r['remove_wall']:6.0f})")
            finally:
                log(f"netsim down {lab}")
                subprocess.run(NETSIM + ["down", lab], stdout=subprocess.DEVNULL, cwd=REPO)
            rows.append({"nodes": size, "lab": lab, "up_s": up_s,
                         "ms": {m: stats([r[m] for r in rounds]) for m, _ in METRICS},
                         "peers_before_acquired_at": sum(r["peers_before_acquired_at"] for r in rounds),
                         "rounds_clamped_to_zero": sum(r["add_clamped"] for r in rounds),
                         "under_target": max(r["add"] for r in rounds) < TARGET_MS
                         and max(r["remove"] for r in rounds) < TARGET_MS,
                         "rounds": rounds})

    result = {"benchmark": "overlay_convergence", "kernel": platform.release(), "cores": os.cpu_count(),
              "python": platform.python_version(), "registry": args.registry, "overlay": args.overlay,
              "rounds": args.rounds, "target_ms": TARGET_MS, "date": started, "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    print()
    print(f"overlay convergence, registry {args.registry}, overlay {args.overlay}, {args.rounds} rounds "
          f"(add then remove a node); kernel {result['kernel']}, {result['cores']} cores, {started}")
    print()
    print("| nodes | figure | median ms | p90 ms | max ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        for m, desc in METRICS:
            s = row["ms"][m]
            if s:
                print(f"| {row['nodes']} | {desc} | {s['median']:.1f} | {s['p90']:.1f} | {s['max']:.1f} |")
    for row in rows:
        verdict = "under" if row["under_target"] else "NOT under"
        print(f"{row['nodes']} nodes: convergence {verdict} the {TARGET_MS:.0f} ms target (worst add and remove); "
              f"{row['peers_before_acquired_at']} peer programmings came before the new node's acquired_at, "
              f"{row['rounds_clamped_to_zero']} rounds reported 0 ms")
    print(f"\nresults in {out}")


if __name__ == "__main__":
    main()
