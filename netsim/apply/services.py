"""The lab's control plane for Services: resolve, allocate, elect L2 speakers, publish.

It plays the parts of the API server's allocators (ClusterIP, NodePort), the
EndpointSlice controller, and a MetalLB-style controller (LoadBalancer IPs from the pool,
one node answering ARP for each). The result goes to the registry, where every node's
kube-proxy agent picks it up.
"""
from __future__ import annotations

import hashlib
import json
import time

from ..plan.state import LabPlan
from ..proxy import state as proxy_state
from ..proxy.endpoints import categorize
from ..proxy.services import Resolution, resolve
from ..registry import open_registry
from ..runtime.wait import wait_for
from ..topology.model import Topology
from . import labstate
from .lab import registry_url


def resolution_path(lab: str):
    return labstate.lab_dir(lab) / "services.json"


def load_resolution(lab: str) -> Resolution | None:
    try:
        return Resolution.from_dict(json.loads(resolution_path(lab).read_text()))
    except FileNotFoundError:
        return None


def speakers(plan: LabPlan, res: Resolution) -> dict[str, str]:
    """LoadBalancer IP → the node that answers ARP for it (MetalLB L2 mode).

    Candidates are all nodes, or with externalTrafficPolicy Local only nodes with a ready
    local endpoint; the winner is the candidate with the lowest hash of (node, IP), so the
    choice is stable and spreads IPs over nodes.
    """
    out: dict[str, str] = {}
    for port in res.ports:
        for ip in port.load_balancer_ips:
            nodes = [n.name for n in plan.nodes]
            if port.external_policy_local:
                nodes = [n for n in nodes if categorize(port, n).local] or nodes
            if ip not in out:
                out[ip] = min(nodes, key=lambda n: hashlib.sha256(f"{n}#{ip}".encode()).hexdigest())
    return out


def publish(lab: str, topo: Topology, plan: LabPlan) -> tuple[Resolution, set[str], float]:
    """Resolve and publish; returns the resolution, the registry keys that changed and
    when they were written."""
    res = resolve(topo, plan, load_resolution(lab))
    reg = open_registry(registry_url(lab))
    try:
        written = time.time()
        touched = proxy_state.publish(reg, res.ports, speakers(plan, res))
    finally:
        reg.close()
    labstate.write_json(resolution_path(lab), res.to_dict())
    return res, touched, written


def proxy_status(lab: str, node: str) -> dict:
    try:
        return json.loads((labstate.lab_dir(lab) / "kube-proxy" / f"{node}.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_programmed(lab: str, plan: LabPlan, res: Resolution, keys: set[str], since: float,
                    timeout: float = 30.0) -> float:
    """Wait until every node's kube-proxy has programmed the Services in ``keys`` (written
    at or after ``since``, or deleted); return the network-programming latency: the slowest
    (write → rules in the kernel) over nodes and Services."""
    present = set(proxy_state.group(res.ports))

    def done(prog: dict, k: str) -> bool:
        if k in present:
            return k in prog and prog[k]["written_at"] >= since
        return k not in prog

    def synced() -> bool:
        return all(done(proxy_status(lab, n.name).get("programmed", {}), k) for n in plan.nodes for k in keys)

    wait_for(synced, f"every node's kube-proxy to program {len(keys)} changed Services", timeout)
    latencies = []
    for n in plan.nodes:
        st = proxy_status(lab, n.name)
        prog, removed = st.get("programmed", {}), st.get("removed", {})
        # a deleted Service counts from its deletion (``since``) to its rules leaving the kernel
        latencies += [prog[k]["programmed_at"] - prog[k]["written_at"] if k in prog else removed[k] - since
                      for k in keys if k in prog or k in removed]
    return max(latencies, default=0.0)
