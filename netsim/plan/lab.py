"""The planner: a validated ``Topology`` in, the lab's desired kernel state out. Pure, no root.

    underlay netns:  br-underlay ── <node>-eth0 ══ eth0 (node netns, underlay IP)
    node netns:      cni0 (<subnet>.1) ── vethXXXXXXXX ══ eth0 (pod netns, <subnet>.N)
"""
from __future__ import annotations

from ipaddress import IPv4Address as _addr, IPv4Network as _net

from .. import naming
from ..topology.model import Topology
from .ipam import HostLocal, node_subnet, underlay_addresses
from .masq import flannel_rules
from .scheduler import pod_key, schedule
from .state import (Address, ExternalPlan, LabPlan, Link, Namespace, NodePlan, PodPlan,
                    PortPlan, Route)

VXLAN_OVERHEAD = 50
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


def plan_lab(topo: Topology, previous: LabPlan | None = None) -> LabPlan:
    """Desired state for ``topo``. With ``previous``, placements and pod IPs already
    handed out are kept (host-local never moves a running pod's address)."""
    c = topo.cluster
    lab = topo.name
    mtu = c.underlay_mtu - VXLAN_OVERHEAD if c.overlay == "vxlan" else c.underlay_mtu
    prefix = c.underlay_cidr.prefixlen
    node_ips, ext_ips = underlay_addresses(c.underlay_cidr, [n.address for n in topo.nodes],
                                           [e.address for e in topo.externals])
    nodes = tuple(
        NodePlan(n.name, naming.node_netns(lab, n.name), str(ip),
                 str(sub := node_subnet(c.pod_cidr, c.node_subnet_length, i)),
                 str(sub.network_address + 1), mtu, dict(n.labels))
        for i, (n, ip) in enumerate(zip(topo.nodes, node_ips)))
    externals = tuple(ExternalPlan(e.name, naming.external_netns(lab, e.name), str(ip), EXTERNAL_PORTS)
                      for e, ip in zip(topo.externals, ext_ips))

    prev_pods = {p.key: p for p in previous.pods} if previous else {}
    placed, _ = schedule(topo.pods, topo.nodes, {k: p.node for k, p in prev_pods.items()})
    ipam = {n.name: HostLocal(_net(n.subnet)) for n in nodes}
    for key, pod in prev_pods.items():
        if pod.node in ipam:
            ipam[pod.node].in_use[key] = _addr(pod.ip)
            ipam[pod.node].last = _addr(pod.ip)
    pods = []
    for pod in topo.pods:
        key = pod_key(pod)
        node = placed[key]
        ip = ipam[node].allocate(key)
        pods.append(PodPlan(pod.name, pod.namespace, node, naming.pod_netns(lab, pod.namespace, pod.name),
                            str(ip), naming.pod_host_veth(lab, pod.namespace, pod.name), dict(pod.labels),
                            tuple(PortPlan(p.port, p.protocol, p.name) for p in pod.ports), pod.owner))

    underlay_ns = naming.underlay_netns(lab)
    spaces = [Namespace(
        underlay_ns, "underlay", "underlay",
        links=(Link(naming.UNDERLAY_BRIDGE, "bridge", c.underlay_mtu),) + tuple(
            Link(naming.underlay_port(m.name), "veth", c.underlay_mtu, master=naming.UNDERLAY_BRIDGE,
                 peer=naming.UPLINK, peer_netns=m.netns, peer_mtu=c.underlay_mtu)
            for m in nodes + externals),
        sysctls=SWITCH_SYSCTLS)]
    for n in nodes:
        node_pods = [p for p in pods if p.node == n.name]
        spaces.append(Namespace(
            n.netns, "node", n.name,
            links=(Link(c.bridge, "bridge", mtu),) + tuple(
                Link(p.host_veth, "veth", mtu, master=c.bridge, hairpin=True,
                     peer=naming.POD_IFACE, peer_netns=p.netns, peer_mtu=mtu) for p in node_pods),
            addresses=(Address(naming.UPLINK, f"{n.address}/{prefix}"),
                       Address(c.bridge, f"{n.gateway}/{c.node_subnet_length}")),
            sysctls=NODE_SYSCTLS,
            iptables=flannel_rules(c.pod_cidr, _net(n.subnet))))
    for e in externals:
        spaces.append(Namespace(e.netns, "external", e.name,
                                addresses=(Address(naming.UPLINK, f"{e.address}/{prefix}"),)))
    gateways = {n.name: n.gateway for n in nodes}
    for p in pods:
        gw = gateways[p.node]
        # As the flannel CNI plugin configures a pod: default route plus the cluster network.
        spaces.append(Namespace(p.netns, "pod", p.key,
                                addresses=(Address(naming.POD_IFACE, f"{p.ip}/{c.node_subnet_length}"),),
                                routes=(Route("default", naming.POD_IFACE, gw),
                                        Route(str(c.pod_cidr), naming.POD_IFACE, gw))))
    return LabPlan(lab, str(c.pod_cidr), str(c.service_cidr), str(c.underlay_cidr), c.overlay,
                   c.proxy_mode, c.iptables_backend, underlay_ns, nodes, externals, tuple(pods),
                   tuple(spaces))
