"""The benchmark's lab: two nodes, a client pod, a backend pod on each node, Services
published straight into the registry.

``netsim up`` builds the lab with no Services at all (the "no Services" baseline). The
benchmark then plays the lab's control plane for Services: it writes ServicePorts under
``/netsim/proxy/services/`` exactly as ``netsim.proxy.state.publish`` does, so every node's
real kube-proxy agent watches, renders and programs them in the lab's mode. N synthetic
Services (``netsim.proxy.synthetic``, 2 endpoints each on addresses that no pod holds)
only take up room in the rules; four target Services, one endpoint each, lead to the
backend pods:

* ``bench/aaa-near``, ``bench/aaa-far`` sort before every synthetic ``bench/svc<i>``,
* ``bench/zzz-near``, ``bench/zzz-far`` sort after them.

netsim orders KUBE-SERVICES by service-port name, so in iptables mode ``aaa-*`` are
matched first and ``zzz-*`` last (after walking all N). nftables (a verdict map) and IPVS
(a hash table of virtual servers behind one ipset match) look a Service up by address,
so there the two positions should cost the same.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..proxy import state
from ..proxy.model import Endpoint, ServicePort
from ..proxy.synthetic import synthetic_ports
from ..registry import open_registry
from ..registry.base import Put
from ..runtime.wait import wait_for
from .tools import IPERF_PORT, BenchError

NETSIM = [sys.executable, "-m", "netsim"]
NAMESPACE = "bench"
CONNECT_PORT = 80          # Service port → the pod server's 8080
POD_PORT = 8080
TARGET_IPS = {"aaa-near": "10.96.250.1", "aaa-far": "10.96.250.2",
              "zzz-near": "10.96.250.3", "zzz-far": "10.96.250.4"}
POSITIONS = {"first": "aaa", "last": "zzz"}


def topology(lab: str, mode: str, iptables_backend: str) -> str:
    pod = ("  - {{apiVersion: v1, kind: Pod, metadata: {{name: {name}}}, spec: {{nodeName: {node}, "
           "containers: [{{name: c, image: busybox, ports: [{{containerPort: %d}}]}}]}}}}\n" % POD_PORT)
    return (f"name: {lab}\n"
            f"cluster: {{proxyMode: {mode}, iptablesBackend: {iptables_backend}, minSyncPeriod: 0}}\n"
            "nodes: [{name: n1}, {name: n2}]\nmanifests:\n"
            + pod.format(name="client", node="n1") + pod.format(name="near", node="n1")
            + pod.format(name="far", node="n2"))


@dataclass
class Pod:
    name: str
    node: str
    ip: str
    netns: str


@dataclass
class BenchLab:
    name: str
    mode: str
    iptables_backend: str
    pods: dict[str, Pod]
    nodes: dict[str, str]                 # node → netns
    loaded: int = 0                       # synthetic Services in the registry

    # -- life cycle ---------------------------------------------------------------
    @classmethod
    def up(cls, name: str, mode: str, iptables_backend: str, workdir: Path, timeout: float = 120) -> BenchLab:
        topo = workdir / f"{name}.yaml"
        topo.write_text(topology(name, mode, iptables_backend))
        done = subprocess.run(NETSIM + ["up", str(topo), "--timeout", str(timeout), "-o", "json"],
                              capture_output=True, text=True, timeout=timeout + 60)
        if done.returncode != 0:
            raise BenchError(f"netsim up {name}: {done.stderr.strip()}")
        st = json.loads(done.stdout)
        pods = {p["name"]: Pod(p["name"], p["node"], p["ip"], p["netns"]) for p in st["pods"]}
        nodes = {n["name"]: n["netns"] for n in st["nodes"]}
        return cls(name, mode, iptables_backend, pods, nodes)

    @staticmethod
    def down(name: str) -> None:
        done = subprocess.run(NETSIM + ["down", name], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            subprocess.run(NETSIM + ["clean", name], capture_output=True, text=True, timeout=300)

    def state_dir(self) -> Path:
        return Path("/run/netsim") / self.name

    # -- Services ---------------------------------------------------------------------
    def target(self, position: str, where: str) -> str:
        """The ClusterIP of the target Service at ``position`` ("first"/"last") whose
        endpoint is on the client's node ("near") or the other node ("far")."""
        return TARGET_IPS[f"{POSITIONS[position]}-{where}"]

    def target_ports(self) -> list[ServicePort]:
        out = []
        for name, vip in TARGET_IPS.items():
            pod = self.pods[name.split("-")[1]]
            for pname, port, target in (("connect", CONNECT_PORT, POD_PORT), ("iperf", IPERF_PORT, IPERF_PORT)):
                ep = Endpoint(pod.ip, target, pod.node, pod=f"default/{pod.name}")
                out.append(ServicePort(NAMESPACE, name, pname, "TCP", port, vip, endpoints=(ep,)))
        return out

    def publish(self, ports: list[ServicePort], timeout: float) -> float:
        """Write these Services in one registry transaction and wait until every node's
        agent has them in the kernel; returns write → programmed on every node (seconds)."""
        since = time.time()
        groups = state.group(ports)
        ops = [Put(k, state.encode(v, written_at=since)) for k, v in groups.items()]
        reg = open_registry((self.state_dir() / "registry.url").read_text().strip())
        try:
            reg.txn([], ops)
        finally:
            reg.close()
        return self.wait_programmed(set(groups), since, timeout)

    def wait_programmed(self, keys: set[str], since: float, timeout: float) -> float:
        def statuses():
            out = []
            for node in self.nodes:
                try:
                    st = json.loads((self.state_dir() / "kube-proxy" / f"{node}.json").read_text())
                except (OSError, ValueError):
                    return None
                prog = st.get("programmed", {})
                if not all(k in prog and prog[k]["written_at"] >= since for k in keys):
                    return None
                out.append(max(prog[k]["programmed_at"] for k in keys))
            return out
        done = wait_for(statuses, f"{len(keys)} Services programmed on every node of {self.name}", timeout,
                        interval=0.01, max_interval=0.2)
        return max(done) - since

    def load_targets(self, timeout: float = 60) -> float:
        return self.publish(self.target_ports(), timeout)

    def load_synthetic(self, n: int, timeout: float) -> float:
        """Grow the synthetic Services to ``n`` (only the missing ones are written)."""
        if n <= self.loaded:
            return 0.0
        ports = synthetic_ports(n, local_node="n1", namespace=NAMESPACE)[self.loaded:]
        took = self.publish(ports, timeout)
        self.loaded = n
        return took

    def change_one(self, k: int, timeout: float = 60) -> float:
        """Network-programming latency of one Service changed: synthetic Service ``svc0``
        gains (even k) or loses (odd k) an endpoint."""
        p = synthetic_ports(1, local_node="n1", namespace=NAMESPACE)[0]
        if k % 2 == 0:
            extra = replace(p.endpoints[0], ip="10.191.0.1", node="n2")
            p = replace(p, endpoints=tuple(sorted(p.endpoints + (extra,), key=lambda e: e.address)))
        return self.publish([p], timeout)

    def sysctls(self, keys: list[str]) -> dict[str, str]:
        """Sysctls as seen from node n1's namespace (the network ones are per namespace)."""
        out = {}
        for k in keys:
            done = subprocess.run(["ip", "netns", "exec", self.nodes["n1"], "sysctl", "-n", k],
                                  capture_output=True, text=True)
            out[k] = done.stdout.strip() if done.returncode == 0 else None
        return out
