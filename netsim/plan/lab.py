"""The planner: a validated ``Topology`` in, the lab's desired kernel state out. Pure, no root.

    underlay netns:  br-underlay ── <node>-eth0 ══ eth0 (node netns, underlay IP)
    node netns:      flannel.1 (<subnet>.0/32, VNI 1, port 8472)
                     cni0 (<subnet>.1) ── vethXXXXXXXX ══ eth0 (pod netns, <subnet>.N)

Node subnets are what flannel leases. The planner expects node *i* to get the *i*-th
subnet from SubnetMin (netsim hands that to each agent as its "previous" subnet, which
flannel takes when it is free); if the registry gives a node another one, the applier
plans again with the leased ``subnets``.
"""
from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address as _addr, IPv4Network as _net

from .. import naming
from ..registry.flannel import BackendConfig, NetworkConfig
from ..topology.model import Topology
from .ipam import HostLocal, node_subnet, underlay_addresses
from .masq import flannel_rules
from .overlay import on_link, peer_plan, pod_mtu, subnet_env, vtep_mac, vxlan_device
from .scheduler import pod_key, schedule
from .state import (Address, ExternalPlan, LabPlan, Link, Namespace, NodeOverlay, NodePlan,
                    PodPlan, PortPlan, Route)

# What kubeadm asks of every node; the switch namespace must not filter bridged frames.
NODE_SYSCTLS = (("net.ipv4.ip_forward", "1"),
                ("net.bridge.bridge-nf-call-iptables", "1"),
                ("net.bridge.bridge-nf-call-ip6tables", "1"))
# External hosts run the built-in server too, so "what source did the outside see?"
# (masquerade) can be asked of them.
EXTERNAL_PORTS = (PortPlan(8080, "TCP", "http"), PortPlan(8080, "UDP", "udp"))
SWITCH_SYSCTLS = (("net.bridge.bridge-nf-call-iptables", "0"),
                  ("net.bridge.bridge-nf-call-ip6tables", "0"),
                  ("net.bridge.bridge-nf-call-arptables", "0"))


def network_config(topo: Topology) -> NetworkConfig:
    """flannel's network config for the cluster (the registry's ``/coreos.com/network/config``)."""
    c = topo.cluster
    return NetworkConfig.create(c.pod_cidr, c.node_subnet_length,
                                backend=BackendConfig(type=c.overlay, direct_routing=c.direct_routing))


def plan_lab(topo: Topology, previous: LabPlan | None = None,
             subnets: dict[str, _net] | None = None) -> LabPlan:
    """Desired state for ``topo``. ``previous`` keeps placements and pod IPs already handed
    out (host-local never moves a running pod's address); ``subnets`` are leased subnets."""
    c = topo.cluster
    lab = topo.name
    mtu = pod_mtu(c.overlay, c.underlay_mtu)
    prefix = c.underlay_cidr.prefixlen
    gateway = c.underlay_cidr.network_address + 1
    node_ips, ext_ips = underlay_addresses(c.underlay_cidr, [n.address for n in topo.nodes],
                                           [e.address for e in topo.externals])
    subnets = subnets or {}
    nodes = tuple(
        NodePlan(n.name, naming.node_netns(lab, n.name), str(ip),
                 str(sub := subnets.get(n.name) or node_subnet(c.pod_cidr, c.node_subnet_length, i)),
                 str(sub.network_address + 1), mtu, dict(n.labels),
                 vtep_mac(f"{lab}/{n.name}") if c.overlay == "vxlan" else "")
        for i, (n, ip) in enumerate(zip(topo.nodes, node_ips)))
    externals = tuple(ExternalPlan(e.name, naming.external_netns(lab, e.name), str(ip), EXTERNAL_PORTS)
                      for e, ip in zip(topo.externals, ext_ips))
    pods = _plan_pods(topo, nodes, previous)

    underlay_ns = naming.underlay_netns(lab)
    spaces = [Namespace(
        underlay_ns, "underlay", "underlay",
        links=(Link(naming.UNDERLAY_BRIDGE, "bridge", c.underlay_mtu),) + tuple(
            Link(naming.underlay_port(m.name), "veth", c.underlay_mtu, master=naming.UNDERLAY_BRIDGE,
                 peer=naming.UPLINK, peer_netns=m.netns, peer_mtu=c.underlay_mtu)
            for m in nodes + externals),
        # The reserved first address: the segment's gateway, as a real network has one
        # (nodes need a default route, e.g. for their own connections to ClusterIPs).
        addresses=(Address(naming.UNDERLAY_BRIDGE, f"{gateway}/{prefix}"),),
        sysctls=SWITCH_SYSCTLS)]
    per_node = [node_namespaces(n, pods, c.underlay_cidr, c.bridge) for n in nodes]
    spaces += [base for base, _ in per_node]
    spaces += [Namespace(e.netns, "external", e.name, addresses=(Address(naming.UPLINK, f"{e.address}/{prefix}"),),
                         routes=(Route("default", naming.UPLINK, str(gateway)),))
               for e in externals]
    # The pod side of each node (CNI's part) comes once the node holds its lease.
    spaces += [cni for _, cni in per_node]
    gateways = {n.name: n.gateway for n in nodes}
    for p in pods:
        gw = gateways[p.node]
        # As the flannel CNI plugin configures a pod: default route plus the cluster network.
        spaces.append(Namespace(p.netns, "pod", p.key,
                                addresses=(Address(naming.POD_IFACE, f"{p.ip}/{c.node_subnet_length}"),),
                                routes=(Route("default", naming.POD_IFACE, gw),
                                        Route(str(c.pod_cidr), naming.POD_IFACE, gw))))
    plan = LabPlan(lab, str(c.pod_cidr), str(c.service_cidr), str(c.underlay_cidr), c.overlay,
                   c.proxy_mode, c.iptables_backend, underlay_ns, nodes, externals, pods,
                   tuple(spaces), c.registry, network_config(topo).to_json(), c.lease_ttl,
                   c.renew_margin, c.underlay_mtu, c.direct_routing, c.bridge)
    return replace(plan, overlay_state=plan_overlay(plan), registry_endpoint=c.registry_endpoint or "",
                   min_sync_period=c.min_sync_period, ipvs_scheduler=c.ipvs_scheduler)


def _plan_pods(topo: Topology, nodes: tuple[NodePlan, ...], previous: LabPlan | None) -> tuple[PodPlan, ...]:
    wanted = {pod_key(p) for p in topo.pods}
    # Pods deleted since the previous plan give their node slot and address back.
    prev_pods = {p.key: p for p in previous.pods if p.key in wanted} if previous else {}
    placed, _ = schedule(topo.pods, topo.nodes, {k: p.node for k, p in prev_pods.items()})
    ipam = {n.name: HostLocal(_net(n.subnet)) for n in nodes}
    for key, pod in prev_pods.items():
        if pod.node in ipam and _addr(pod.ip) in ipam[pod.node].subnet:
            ipam[pod.node].in_use[key] = _addr(pod.ip)
            ipam[pod.node].last = _addr(pod.ip)
    pods = []
    for pod in topo.pods:
        key = pod_key(pod)
        node = placed[key]
        ip = ipam[node].allocate(key)
        pods.append(PodPlan(pod.name, pod.namespace, node, naming.pod_netns(topo.name, pod.namespace, pod.name),
                            str(ip), naming.pod_host_veth(topo.name, pod.namespace, pod.name), dict(pod.labels),
                            tuple(PortPlan(p.port, p.protocol, p.name) for p in pod.ports), pod.owner))
    return tuple(pods)


def plan_overlay(plan: LabPlan) -> tuple[NodeOverlay, ...]:
    """What each node's flannel agent will program, given the nodes' (planned) leases."""
    out = []
    mtu = pod_mtu(plan.overlay, plan.underlay_mtu)
    underlay, cluster = _net(plan.underlay_cidr), _net(plan.pod_cidr)
    for node in plan.nodes:
        own = _net(node.subnet)
        device = vxlan_device(own, node.address, plan.underlay_mtu) if plan.overlay == "vxlan" else None
        peers = tuple(peer_plan(plan.overlay, _net(p.subnet), p.address, p.vtep_mac or None,
                                direct=plan.direct_routing and on_link(p.address, underlay))
                      for p in plan.nodes if p is not node)
        out.append(NodeOverlay(node.name, subnet_env(cluster, own, mtu), flannel_rules(cluster, own), device, peers))
    return tuple(out)


def node_namespaces(node: NodePlan, pods: tuple[PodPlan, ...], underlay: _net,
                    bridge: str) -> tuple[Namespace, Namespace]:
    """A node's two namespace plans: the machine (uplink, default route, sysctls) and its
    CNI part (cni0, pod ports)."""
    sublen = _net(node.subnet).prefixlen
    base = Namespace(node.netns, "node", node.name,
                     addresses=(Address(naming.UPLINK, f"{node.address}/{underlay.prefixlen}"),),
                     routes=(Route("default", naming.UPLINK, str(underlay.network_address + 1)),),
                     sysctls=NODE_SYSCTLS)
    cni = Namespace(node.netns, "node-cni", node.name,
                    links=(Link(bridge, "bridge", node.mtu),) + tuple(
                        Link(p.host_veth, "veth", node.mtu, master=bridge, hairpin=True,
                             peer=naming.POD_IFACE, peer_netns=p.netns, peer_mtu=node.mtu)
                        for p in pods if p.node == node.name),
                    addresses=(Address(bridge, f"{node.gateway}/{sublen}"),))
    return base, cni
