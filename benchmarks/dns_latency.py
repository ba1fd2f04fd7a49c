"""Cluster DNS update latency: how long after a change every dnsmasq replica answers it.

    .venv/bin/python benchmarks/dns_latency.py [--repeat 5] [--out FILE]

On a 3-node lab (2 dnsmasq replicas), each round applies and deletes a Service three
ways and scales a Deployment behind a headless Service:

* ``a-only``: a Service without named ports: only A records change (the hosts file
  dnsmasq watches with inotify; no restart);
* ``with-srv``: a Service with a named port: its SRV record is a dnsmasq option, so the
  replicas restart one at a time;
* ``scale``: one more replica behind a headless Service with a named port (A, pod and
  SRV records);

The latency is the one ``netsim apply`` prints: zone files written → every replica gives
the new answer for every changed name (checked by querying each replica directly).
While the changes run, a client pod asks the kube-dns ClusterIP about 500 times a second
(one UDP try each, from a new source port, 0.5 s timeout); ``lost`` counts the queries that got no right answer, per kind of change.
Runs as root; the lab is torn down.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from netsim.apply import changes, labstate  # noqa: E402
from netsim.dns.query import query  # noqa: E402

LAB = "dn-bench-dns"
PACE = 0.002
TOPOLOGY = f"""
name: {LAB}
nodes: [n1, n2, n3]
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web}}
    spec:
      replicas: 3
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec: {{containers: [{{name: web, ports: [{{name: http, containerPort: 8080}}]}}]}}
  - {{apiVersion: v1, kind: Pod, metadata: {{name: client}}, spec: {{nodeName: n3, containers: [{{name: c}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: web-hl}},
     spec: {{clusterIP: None, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: http}}]}}}}
"""


def service(name: str, named: bool) -> dict:
    port = {"port": 80, "targetPort": 8080} | ({"name": "http"} if named else {})
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": "web"}, "ports": [port]}}


KINDS = ("idle", "a-only", "with-srv", "scale")


class Prober:
    """A separate process inside the client pod asking the cluster DNS for a stable name,
    counting queries and wrong answers per kind of change (a process, not a thread:
    entering namespaces is per thread and netsim's helpers are not thread-safe)."""

    def __init__(self, netns: str):
        ctx = multiprocessing.get_context("fork")
        self.kind = ctx.Value("i", 0)
        self.counts = ctx.Array("l", len(KINDS) * 4)      # per kind: sent, lost, refused, timed out
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=self._run, args=(netns,), daemon=True)

    def start(self) -> None:
        self.proc.start()

    def set(self, kind: str) -> None:
        self.kind.value = KINDS.index(kind)

    def join(self) -> None:
        self.stop.set()
        self.proc.join(10)

    def _run(self, netns: str) -> None:
        from pyroute2 import netns as pr_netns
        pr_netns.setns(netns)                               # this process lives in the pod
        while not self.stop.is_set():
            k = self.kind.value * 4
            why = 0
            try:
                if query("10.96.0.10", "kube-dns.kube-system.svc.cluster.local", timeout=0.5).values() != ["10.96.0.10"]:
                    why = 1
            except ConnectionRefusedError:
                why = 2
            except OSError:
                why = 3
            with self.counts.get_lock():
                self.counts[k] += 1
                self.counts[k + 1] += bool(why)
                if why >= 2:
                    self.counts[k + why] += 1
            self.stop.wait(PACE)           # load pacing (about 500 queries/s), not a readiness wait

    def result(self, kind: str) -> dict:
        k = KINDS.index(kind) * 4
        return {"queries": self.counts[k], "lost": self.counts[k + 1],
                "refused": self.counts[k + 2], "timed_out": self.counts[k + 3]}


def apply(objs: list[dict], delete: bool = False) -> changes.Change:
    doc, touched = changes.merge(changes.load_objects(LAB), objs, delete=delete)
    return changes.change(LAB, doc, touched)


def scale(replicas: int) -> changes.Change:
    doc, touched = changes.scale(changes.load_objects(LAB), "deployment/web", replicas)
    return changes.change(LAB, doc, touched)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dns_latency.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        topo = Path(tmp) / "lab.yaml"
        topo.write_text(TOPOLOGY)
        subprocess.run([sys.executable, "-m", "netsim", "up", str(topo)], check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    samples: dict[str, list[float]] = {"a-only": [], "with-srv": [], "scale": []}
    names: dict[str, list[int]] = {k: [] for k in samples}
    prober = None
    try:
        client = labstate.load_plan(LAB).find("client")
        prober = Prober(client.netns)
        prober.start()
        for i in range(args.repeat):
            for kind, named in (("a-only", False), ("with-srv", True)):
                prober.set(kind)
                for delete in (False, True):
                    ch = apply([service(f"s{i}-{kind}", named)], delete=delete)
                    samples[kind].append(ch.dns_s)
                    names[kind].append(ch.dns_names)
            prober.set("scale")
            ch = scale(4 + i)          # upwards only: re-adding a removed replica's name trips a pod-server issue
            samples["scale"].append(ch.dns_s)
            names["scale"].append(ch.dns_names)
            prober.set("idle")
    except BaseException:
        import traceback
        traceback.print_exc()
        raise
    finally:
        if prober:
            prober.join()                  # out of the lab's namespaces before it is torn down
        subprocess.run([sys.executable, "-m", "netsim", "down", LAB], check=False, stdout=subprocess.DEVNULL, cwd=REPO)
    result = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "lab": "3 nodes, 2 dnsmasq replicas, headless web Service over 3 pods",
        "what": "zone written -> every replica answers every changed name (ms); lost = client queries "
                "via the kube-dns ClusterIP without the right answer while that kind of change ran",
        "results": {k: {"changes": len(v), "median_ms": round(statistics.median(v) * 1000, 1),
                        "max_ms": round(max(v) * 1000, 1), "names_changed_median": statistics.median(names[k]),
                        **prober.result(k)}
                    for k, v in samples.items()},
        "between_changes": prober.result("idle"),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
