"""The overlay's pure plan: what flannel programs per peer, its device and subnet.env."""
from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from netsim.plan.masq import flannel_chains, flannel_jumps, flannel_rules, jump_block
from netsim.plan.overlay import (Fdb, Neighbour, PeerRoute, on_link, parse_subnet_env, peer_plan,
                                 pod_mtu, subnet_env, vtep_mac, vxlan_device)
from netsim.topology import load_text
from netsim.plan.lab import plan_lab

REMOTE = IPv4Network("10.244.2.0/24")
MAC = "aa:76:63:e8:34:73"


def test_vxlan_peer_is_neighbour_fdb_route_in_flannels_order():
    p = peer_plan("vxlan", REMOTE, "192.168.100.3", MAC)
    assert p.neighbours == (Neighbour("flannel.1", "10.244.2.0", MAC),)
    assert p.fdb == (Fdb("flannel.1", MAC, "192.168.100.3"),)
    assert p.routes == (PeerRoute("10.244.2.0/24", "10.244.2.0", "flannel.1", onlink=True),)


def test_host_gw_and_direct_routing_are_plain_routes_via_the_peer():
    for p in (peer_plan("host-gw", REMOTE, "192.168.100.3"),
              peer_plan("vxlan", REMOTE, "192.168.100.3", MAC, direct=True)):
        assert p.neighbours == () and p.fdb == ()
        assert p.routes == (PeerRoute("10.244.2.0/24", "192.168.100.3", "eth0"),)


def test_vxlan_peer_needs_a_vtep_mac_and_a_known_backend():
    with pytest.raises(ValueError, match="VtepMAC"):
        peer_plan("vxlan", REMOTE, "192.168.100.3", None)
    with pytest.raises(ValueError, match="unsupported backend"):
        peer_plan("udp", REMOTE, "192.168.100.3", MAC)


def test_vni_names_the_device():
    p = peer_plan("vxlan", REMOTE, "192.168.100.3", MAC, vni=7)
    assert {n.dev for n in p.neighbours} | {f.dev for f in p.fdb} | {r.dev for r in p.routes} == {"flannel.7"}


def test_device_subnet_env_and_mtu():
    own = IPv4Network("10.244.1.0/24")
    dev = vxlan_device(own, "192.168.100.2", 1500)
    assert (dev.name, dev.vni, dev.port, dev.mtu, dev.address, dev.learning) == (
        "flannel.1", 1, 8472, 1450, "10.244.1.0/32", False)
    assert pod_mtu("vxlan", 1500) == 1450 and pod_mtu("host-gw", 1500) == 1500
    env = subnet_env(IPv4Network("10.244.0.0/16"), own, 1450)
    assert env == ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
                   "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    assert parse_subnet_env(env)["FLANNEL_SUBNET"] == "10.244.1.1/24"


def test_vtep_mac_is_locally_administered_unicast_and_stable():
    mac = vtep_mac("demo/node-1")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert mac == vtep_mac("demo/node-1") != vtep_mac("demo/node-2")


def test_on_link():
    assert on_link("192.168.100.3", IPv4Network("192.168.100.0/24"))
    assert not on_link("192.168.101.3", IPv4Network("192.168.100.0/24"))


def test_masq_rules_resync_without_duplicating_jumps():
    chains = flannel_chains(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"))
    assert ":FLANNEL-POSTRTG - [0:0]" in chains and ":FLANNEL-FWD - [0:0]" in chains
    assert "-A POSTROUTING" not in chains and "-A FORWARD" not in chains
    full = flannel_rules(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"))
    assert full == chains + "".join(jump_block(*j) for j in flannel_jumps())
    assert '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG' in full


def test_lab_plan_programs_every_other_node():
    topo = load_text("name: t\nnodes: [a, b, c]\n")
    plan = plan_lab(topo)
    for node, overlay in zip(plan.nodes, plan.overlay_state):
        others = [n for n in plan.nodes if n is not node]
        assert [p.subnet for p in overlay.peers] == [n.subnet for n in others]
        assert [p.fdb[0].mac for p in overlay.peers] == [n.vtep_mac for n in others]
    hostgw = plan_lab(load_text("name: t\ncluster: {overlay: host-gw}\nnodes: [a, b]\n"))
    assert hostgw.overlay_state[0].device is None
    assert hostgw.overlay_state[0].peers[0].routes[0].via == hostgw.nodes[1].address
