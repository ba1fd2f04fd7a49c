"""Live node changes on a running lab: ``netsim node add`` and ``netsim node remove``.

Adding a node is what joining a cluster looks like to flannel: a new machine on the
underlay whose agent leases a subnet; every peer sees the lease through its watch and
programs it. Removing one is an administrator deleting the node: its agents stop, its
lease key is deleted (peers unprogram it at once), its namespaces go.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

from .. import naming
from ..errors import LabStateError, NetsimError
from ..plan.ipam import node_subnet
from ..plan.lab import node_namespaces, plan_overlay
from ..plan.overlay import pod_mtu, vtep_mac
from ..plan.state import Link, Namespace, NodePlan
from ..registry import open_registry
from ..registry.flannel import subnet_key
from ..runtime.wait import wait_for
from ..topology.check import Checker
from . import labstate, netns
from .lab import (build_namespace, flannel_dir, registry_url, start_flannel, start_kubeproxy,
                  start_podserver, stop_processes, wait_kubeproxies, wait_leases, wait_pods)
from .labstate import LabState


@dataclass
class NodeChange:
    node: NodePlan
    convergence_s: float        # from the lease write (or delete) to the last peer programmed


def add_node(lab: str, name: str, labels: dict[str, str] | None = None, timeout: float = 30.0) -> NodeChange:
    plan, st = labstate.load_plan(lab), LabState.load(lab)
    ck = Checker()
    ck.dns_label(name, "name", naming.HOST_NAME_MAX)
    if ck.problems:
        raise LabStateError(str(ck.problems[0]))
    if plan.find(name) is not None:
        raise LabStateError(f"lab {lab} already has a node, external or pod named {name!r}")
    underlay = IPv4Network(plan.underlay_cidr)
    used = {IPv4Address(m.address) for m in plan.nodes + plan.externals}
    address = next((a for a in underlay.hosts() if a != underlay.network_address + 1 and a not in used), None)
    if address is None:
        raise LabStateError(f"underlay {underlay} has no free address for node {name}")
    taken = {IPv4Network(n.subnet) for n in plan.nodes}
    pod_cidr = IPv4Network(plan.pod_cidr)
    length = IPv4Network(plan.nodes[0].subnet).prefixlen
    # Only a hint (the agent's "previous" subnet): the registry decides. With every subnet
    # planned, the agent still asks, and reports SubnetsExhausted if none is free.
    hint = next((s for i in range(2 ** (length - pod_cidr.prefixlen) - 1)
                 if (s := node_subnet(pod_cidr, length, i)) not in taken), node_subnet(pod_cidr, length, 0))
    node = NodePlan(name, naming.node_netns(lab, name), str(address), str(hint), str(hint.network_address + 1),
                    pod_mtu(plan.overlay, plan.underlay_mtu),
                    dict(labels or {}, **{"kubernetes.io/hostname": name}),
                    vtep_mac(f"{lab}/{name}") if plan.overlay == "vxlan" else "")
    st.netns.append(node.netns)                    # recorded before it exists
    st.save()
    try:
        return _join(lab, plan, st, node, underlay, timeout)
    except BaseException:
        _forget(lab, st, node)                     # leave the lab as it was
        raise


def _join(lab, plan, st, node: NodePlan, underlay: IPv4Network, timeout: float) -> NodeChange:
    name = node.name
    base, _ = node_namespaces(node, (), underlay, plan.bridge)
    port = Link(naming.underlay_port(name), "veth", plan.underlay_mtu, master=naming.UNDERLAY_BRIDGE,
                peer=naming.UPLINK, peer_netns=node.netns, peer_mtu=plan.underlay_mtu)
    netns.create(node.netns)
    build_namespace(Namespace(plan.underlay_netns, "underlay", "underlay", links=(port,)), plan.iptables_backend)
    build_namespace(base, plan.iptables_backend)
    grown = replace(plan, nodes=plan.nodes + (node,))
    grown = replace(grown, overlay_state=plan_overlay(grown))
    agent = start_flannel(grown, name, registry_url(lab), st)
    leased = IPv4Network(wait_leases(replace(grown, nodes=(node,)), timeout, {name: agent})[name])
    node = replace(node, subnet=str(leased), gateway=str(leased.network_address + 1))
    base, cni = node_namespaces(node, (), underlay, plan.bridge)
    build_namespace(cni, plan.iptables_backend)
    grown = replace(plan, nodes=plan.nodes + (node,),
                    namespaces=plan.namespaces + (base, cni))
    grown = replace(grown, overlay_state=plan_overlay(grown))
    labstate.save_plan(grown)
    start_podserver(grown, name, st)
    wait_pods(replace(grown, pods=(), externals=(), nodes=(node,)), timeout)
    proxy = start_kubeproxy(grown, name, registry_url(lab), st)
    wait_kubeproxies(grown, {name: proxy}, timeout)
    took = wait_converged(lab, grown, node, present=True, timeout=timeout)
    from .changes import load_objects
    doc = load_objects(lab)
    labels = {k: v for k, v in node.labels.items() if k != "kubernetes.io/hostname"}
    doc["nodes"] = list(doc.get("nodes") or []) + [dict({"name": name, "address": node.address},
                                                        **({"labels": labels} if labels else {}))]
    from .changes import change
    change(lab, doc, [f"Node {name}"], timeout)     # Services may now be announced from it
    return NodeChange(node, took)


def _forget(lab: str, st: LabState, node: NodePlan) -> None:
    """Undo a half-joined node: its processes, its namespace (and so its underlay port)."""
    mine = [p for p in st.processes if p.netns == node.netns]
    stop_processes(mine, [node.netns])
    netns.remove(node.netns)
    st.processes = [p for p in st.processes if p not in mine]
    st.netns = [n for n in st.netns if n != node.netns]
    st.save()
    d = flannel_dir(lab, node.name)
    if d.exists():
        for f in d.glob("*"):
            f.unlink()
        d.rmdir()


def remove_node(lab: str, name: str, timeout: float = 30.0) -> NodeChange:
    plan, st = labstate.load_plan(lab), LabState.load(lab)
    node = next((n for n in plan.nodes if n.name == name), None)
    if node is None:
        raise LabStateError(f"lab {lab} has no node {name!r} (nodes: {', '.join(n.name for n in plan.nodes)})")
    if len(plan.nodes) == 1:
        raise LabStateError(f"{name} is the last node of lab {lab}; use 'netsim down {lab}'")
    mine = [p for p in st.processes if p.netns == node.netns]
    stop_processes(mine)
    st.processes = [p for p in st.processes if p not in mine]
    reg = open_registry(registry_url(lab))
    try:
        t0 = time.time()
        reg.delete(subnet_key(IPv4Network(node.subnet)))
    finally:
        reg.close()
    rest = replace(plan, nodes=tuple(n for n in plan.nodes if n.name != name))
    took = wait_converged(lab, rest, node, present=False, timeout=timeout, since=t0)
    gone_pods = [p for p in plan.pods if p.node == name]
    names = [p.netns for p in gone_pods] + [node.netns]
    stop_processes([], netns_names=names)
    for ns_name in names[:-1]:
        netns.remove(ns_name)
    st.netns = [n for n in st.netns if n not in names[:-1]]
    st.save()
    rest = replace(rest, pods=tuple(p for p in plan.pods if p.node != name),
                   namespaces=tuple(ns for ns in plan.namespaces if ns.name not in names and not (
                       ns.role == "underlay")) )
    underlay = next(ns for ns in plan.namespaces if ns.role == "underlay")
    underlay = replace(underlay, links=tuple(l for l in underlay.links if l.peer_netns != node.netns))
    rest = replace(rest, namespaces=(underlay,) + rest.namespaces)
    rest = replace(rest, overlay_state=plan_overlay(rest))
    labstate.save_plan(rest)
    _forget(lab, st, node)
    # As the pod garbage collector would: pods bound to the node go; Deployments reschedule.
    from .changes import change, identity, load_objects
    doc = load_objects(lab)
    doc["nodes"] = [n for n in doc.get("nodes") or [] if (n.get("name") if isinstance(n, dict) else n) != name]
    doc["manifests"] = [o for o in doc.get("manifests") or []
                        if not (identity(o) and identity(o)[0] == "Pod"
                                and (o.get("spec") or {}).get("nodeName") == name)]
    change(lab, doc, [f"Node {name}"], timeout)
    return NodeChange(node, took)


def wait_converged(lab: str, plan, node: NodePlan, present: bool, timeout: float, since: float | None = None) -> float:
    """Wait until every other node has (or no longer has) ``node``'s subnet programmed, and
    return the time from the lease change to the last programming, as the agents recorded
    it: for a join, the later of "every peer programmed the new node" and "the new node
    programmed every peer"; for a removal, the last peer's removal."""
    subnet = node.subnet
    peers = [n for n in plan.nodes if n.name != node.name]

    def status(n: NodePlan) -> dict:
        try:
            return json.loads((flannel_dir(lab, n.name) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def done() -> bool:
        return all((subnet in status(n).get("peers", {})) == present for n in peers)

    wait_for(done, f"every node to {'program' if present else 'remove'} {node.name}'s subnet {subnet}", timeout)
    if not present:
        removed = [status(n).get("removed", {}).get(subnet) for n in peers]
        return max((t for t in removed if t), default=since or 0.0) - (since or 0.0)
    wait_for(lambda: all(n.subnet in status(node).get("peers", {}) for n in peers),
             f"{node.name} to program its peers", timeout)
    start = status(node)["acquired_at"]
    times = [status(n)["peers"][subnet]["programmed_at"] for n in peers]
    times += [status(node)["peers"][n.subnet]["programmed_at"] for n in peers]
    return max(max(times, default=start) - start, 0.0)
