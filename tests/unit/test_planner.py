"""The pure planner: a Topology in, the lab's desired kernel state (LabPlan) out.

The demo plan is compared with tests/golden/plans/demo.yaml. After an intended change
to the planner, regenerate it with

    NETSIM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_planner.py

and review the diff (``git diff tests/golden/plans``) before committing it.
"""
from __future__ import annotations

import json
import os
import shutil
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml

from netsim import naming
from netsim.plan.lab import plan_lab
from netsim.plan.masq import flannel_rules
from netsim.plan.state import LabPlan
from netsim.topology import load, load_text

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "topologies" / "demo.yaml"
GOLDEN = REPO / "tests" / "golden" / "plans" / "demo.yaml"
UPDATE = os.environ.get("NETSIM_UPDATE_GOLDEN") == "1"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (iptables-restore text) as literal blocks, for readable goldens."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def plain(plan: LabPlan) -> dict:
    """``to_dict()`` with tuples as lists, as it would be stored as JSON or YAML."""
    return json.loads(json.dumps(plan.to_dict()))


@pytest.fixture(scope="module")
def demo() -> LabPlan:
    return plan_lab(load(DEMO))


def small_yaml(overlay: str = "vxlan", mtu: int = 1500, replicas: int = 2) -> str:
    return f"""
name: small
cluster: {{overlay: {overlay}, underlayMTU: {mtu}, dns: false}}
nodes: [n1, n2]
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web}}
    spec:
      replicas: {replicas}
      selector: {{matchLabels: {{app: web}}}}
      template: {{metadata: {{labels: {{app: web}}}}, spec: {{containers: [{{name: c}}]}}}}
"""


def small(overlay: str = "vxlan", mtu: int = 1500, replicas: int = 2) -> LabPlan:
    return plan_lab(load_text(small_yaml(overlay, mtu, replicas)))


# -- golden ----------------------------------------------------------------------

def test_demo_plan_matches_golden(demo):
    data = plain(demo)
    if UPDATE:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("# plan_lab(load('topologies/demo.yaml')).to_dict(); regenerate with "
                          "NETSIM_UPDATE_GOLDEN=1\n" + yaml.dump(data, Dumper=_Dumper, sort_keys=False))
    assert GOLDEN.exists(), "no golden plan: run with NETSIM_UPDATE_GOLDEN=1 and review it"
    assert yaml.safe_load(GOLDEN.read_text()) == data


# -- addressing ------------------------------------------------------------------

def test_node_subnets_start_after_flannels_subnet_min(demo):
    assert [(n.name, n.subnet, n.gateway) for n in demo.nodes] == [
        ("node-1", "10.244.1.0/24", "10.244.1.1"),
        ("node-2", "10.244.2.0/24", "10.244.2.1"),
        ("node-3", "10.244.3.0/24", "10.244.3.1"),
    ]


def test_underlay_addresses(demo):
    assert [n.address for n in demo.nodes] == ["192.168.100.2", "192.168.100.3", "192.168.100.4"]
    assert [e.address for e in demo.externals] == ["192.168.100.254"]


def test_bridge_gets_the_first_address_of_the_node_subnet(demo):
    for node in demo.nodes:
        entries = _entries(demo, node.netns)
        assert {(a.dev, a.cidr) for ns in entries for a in ns.addresses} == {
            ("eth0", f"{node.address}/24"), ("cni0", f"{node.gateway}/24")}
        assert [(link.name, link.kind) for ns in entries for link in ns.links if link.kind == "bridge"] == [
            ("cni0", "bridge")]


def test_pod_addresses_start_at_dot_2_and_stay_in_their_node_subnet(demo):
    for node in demo.nodes:
        ips = [IPv4Address(p.ip) for p in demo.pods if p.node == node.name]
        subnet = IPv4Network(node.subnet)
        assert ips[0] == subnet.network_address + 2
        assert ips == [subnet.network_address + 2 + i for i in range(len(ips))]   # in order, no gaps
        assert all(ip in subnet and str(ip) != node.gateway for ip in ips)
    all_ips = [p.ip for p in demo.pods]
    assert len(all_ips) == len(set(all_ips)) == 14       # 12 + the two cluster DNS replicas


def test_pod_namespace_has_its_address_and_flannel_cni_routes(demo):
    for pod in demo.pods:
        gw = demo.node(pod.node).gateway
        (ns,) = _entries(demo, pod.netns)
        assert (ns.role, ns.owner) == ("pod", pod.key)
        assert [(a.dev, a.cidr) for a in ns.addresses] == [("eth0", f"{pod.ip}/24")]
        assert [(r.dst, r.dev, r.via) for r in ns.routes] == [
            ("default", "eth0", gw), ("10.244.0.0/16", "eth0", gw)]


def test_scheduling_in_the_demo(demo):
    placed = {p.name: p.node for p in demo.pods}
    assert placed["client"] == "node-1"                  # nodeName
    assert placed["tools"] == "node-3"                   # nodeSelector zone-b
    per_node = [sum(1 for p in demo.pods if p.node == n.name) for n in demo.nodes]
    assert per_node == [5, 5, 4]                         # replicas fill in evenly, then coredns


# -- links and MTU ------------------------------------------------------------------

def test_vxlan_mtu_is_underlay_minus_50(demo):
    assert {n.mtu for n in demo.nodes} == {1450}
    for ns in demo.namespaces:
        for link in ns.links:
            expected = 1500 if ns.role == "underlay" else 1450
            assert link.mtu == expected, (ns.name, link)
            if link.peer_mtu is not None:
                assert link.peer_mtu == expected, (ns.name, link)


@pytest.mark.parametrize("overlay, underlay_mtu, pod_mtu", [
    ("vxlan", 1500, 1450), ("host-gw", 1500, 1500), ("vxlan", 9000, 8950), ("host-gw", 9000, 9000)])
def test_pod_mtu_depends_on_overlay(overlay, underlay_mtu, pod_mtu):
    plan = small(overlay, underlay_mtu)
    assert plan.overlay == overlay
    assert {n.mtu for n in plan.nodes} == {pod_mtu}
    node_links = [link for ns in plan.namespaces if ns.role.startswith("node") for link in ns.links]
    assert {link.mtu for link in node_links} == {pod_mtu}
    devices = [o.device for o in plan.overlay_state]
    if overlay == "vxlan":
        assert [(d.name, d.mtu, d.local) for d in devices] == [
            ("flannel.1", pod_mtu, n.address) for n in plan.nodes]
    else:
        assert devices == [None, None]
    switch = next(ns for ns in plan.namespaces if ns.role == "underlay")
    assert {link.mtu for link in switch.links} == {underlay_mtu}


def test_every_interface_name_fits_ifnamsiz(demo):
    names = set()
    for ns in demo.namespaces:
        names.update(link.name for link in ns.links)
        names.update(link.peer for link in ns.links if link.peer)
        names.update(a.dev for a in ns.addresses)
        names.update(r.dev for r in ns.routes)
    names.update(p.host_veth for p in demo.pods)
    names.update(o.device.name for o in demo.overlay_state)
    assert names >= {"br-underlay", "cni0", "eth0", "flannel.1", "node-1-eth0", "ext-client-eth0"}
    for name in names:
        assert 0 < len(name.encode()) <= naming.IFNAMSIZ, name


def test_pod_veths_are_stable_and_distinct(demo):
    veths = [p.host_veth for p in demo.pods]
    assert len(set(veths)) == len(veths)
    assert all(v.startswith("veth") and len(v) == 12 for v in veths)
    assert veths == [naming.pod_host_veth("demo", p.namespace, p.name) for p in demo.pods]


def test_veth_pairs_join_the_right_namespaces(demo):
    (switch,) = _entries(demo, demo.underlay_netns)
    machines = {m.name: m.netns for m in demo.nodes + demo.externals}
    assert {(link.name, link.peer, link.peer_netns) for link in switch.links if link.kind == "veth"} == {
        (f"{name}-eth0", "eth0", netns) for name, netns in machines.items()}
    assert all(link.master == "br-underlay" for link in switch.links if link.kind == "veth")
    for pod in demo.pods:
        (link,) = [link for ns in _entries(demo, demo.node(pod.node).netns) for link in ns.links
                   if link.name == pod.host_veth]
        assert (link.peer, link.peer_netns, link.master, link.hairpin) == ("eth0", pod.netns, "cni0", True)


# -- names and order ----------------------------------------------------------------

def test_every_netns_carries_the_lab_marker(demo):
    marker = naming.lab_prefix("demo")
    assert marker == "netsim.demo."
    netns = [ns.name for ns in demo.namespaces]
    netns += [link.peer_netns for ns in demo.namespaces for link in ns.links if link.peer_netns]
    netns += [demo.underlay_netns] + [m.netns for m in demo.nodes + demo.externals + demo.pods]
    assert all(name.startswith(marker) for name in netns), [n for n in netns if not n.startswith(marker)]
    assert len({(ns.name, ns.role) for ns in demo.namespaces}) == len(demo.namespaces)
    assert [ns.owner for ns in _entries(demo, "netsim.demo.pod.default.client")] == ["default/client"]


def test_namespaces_are_built_underlay_nodes_externals_bridges_pods(demo):
    roles = [ns.role for ns in demo.namespaces]
    assert roles == ["underlay"] + ["node"] * 3 + ["external"] + ["node-cni"] * 3 + ["pod"] * 14
    assert demo.namespaces[0].name == demo.underlay_netns == "netsim.demo.underlay"
    # A node's CNI part (cni0 and the pod veths) lives in the node's own netns.
    assert [ns.name for ns in demo.namespaces if ns.role == "node"] == [
        ns.name for ns in demo.namespaces if ns.role == "node-cni"]


def test_sysctls(demo):
    sysctls = [kv for ns in _entries(demo, "netsim.demo.node.node-1") for kv in ns.sysctls]
    assert ("net.ipv4.ip_forward", "1") in sysctls
    assert ("net.bridge.bridge-nf-call-iptables", "1") in sysctls
    (switch,) = _entries(demo, demo.underlay_netns)
    assert ("net.bridge.bridge-nf-call-iptables", "0") in switch.sysctls


# -- flannel rules -------------------------------------------------------------------

MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """iptables-restore text as (table, lines) blocks; every block must end in COMMIT."""
    blocks, table, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("*"):
            assert table is None, f"{line} inside an open *{table} block"
            table, lines = line[1:], []
        elif line == "COMMIT":
            blocks.append((table, lines))
            table = None
        elif line:
            assert table is not None, f"{line!r} outside a table block"
            lines.append(line)
    assert table is None, "last block has no COMMIT"
    return blocks


def _rules(text: str, table: str, chain: str) -> list[str]:
    return [line for t, lines in _blocks(text) if t == table for line in lines if line.startswith(f"-A {chain} ")]


def test_flannel_masquerade_and_forward_rules(demo):
    (node2,) = [o for o in demo.overlay_state if o.node == "node-2"]
    text = node2.iptables
    assert text.endswith("COMMIT\n")                  # iptables-restore wants the final newline
    assert _rules(text, "nat", "FLANNEL-POSTRTG") == [
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.2.0/24 -d 10.244.0.0/16 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.2.0/24 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.2.0/24 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {MASQ} -j MASQUERADE --random-fully",
    ]
    assert _rules(text, "filter", "FLANNEL-FWD") == [
        f"-A FLANNEL-FWD -s 10.244.0.0/16 {FWD} -j ACCEPT",
        f"-A FLANNEL-FWD -d 10.244.0.0/16 {FWD} -j ACCEPT",
    ]
    assert _rules(text, "nat", "POSTROUTING") == [f"-A POSTROUTING {MASQ} -j FLANNEL-POSTRTG"]
    assert _rules(text, "filter", "FORWARD") == [f"-A FORWARD {FWD} -j FLANNEL-FWD"]
    # The chains are declared (so that --noflush reloads flush them instead of piling up).
    declared = [line for _, lines in _blocks(text) for line in lines if line.startswith(":")]
    assert declared == [":FLANNEL-POSTRTG - [0:0]", ":FLANNEL-FWD - [0:0]"]


def test_flannel_rules_per_node_and_without_random_fully(demo):
    assert [o.node for o in demo.overlay_state] == [n.name for n in demo.nodes]
    for node, overlay in zip(demo.nodes, demo.overlay_state):
        assert overlay.iptables == flannel_rules(IPv4Network("10.244.0.0/16"), IPv4Network(node.subnet))
        assert f"-s {node.subnet} -d 10.244.0.0/16" in overlay.iptables
        assert f"FLANNEL_SUBNET={node.gateway}/24" in overlay.subnet_env.splitlines()
    text = flannel_rules(IPv4Network("10.0.0.0/8"), IPv4Network("10.1.0.0/16"), random_fully=False)
    assert "--random-fully" not in text
    assert f"-A FLANNEL-POSTRTG -s 10.0.0.0/8 ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE" in text.splitlines()


# -- determinism and state round trip -------------------------------------------------

def test_planning_is_deterministic(demo):
    assert plan_lab(load(DEMO)) == demo
    assert plain(plan_lab(load(DEMO))) == plain(demo)


def test_from_dict_round_trip(demo):
    assert LabPlan.from_dict(demo.to_dict()) == demo
    assert LabPlan.from_dict(plain(demo)) == demo          # after a JSON round trip (lists, not tuples)


def test_find(demo):
    assert demo.find("node-2").subnet == "10.244.2.0/24"
    assert demo.find("ext-client").address == "192.168.100.254"
    assert demo.find("client").ip == demo.find("default/client").ip == "10.244.1.2"
    assert demo.find("nope") is None


# -- re-planning with previous= ---------------------------------------------------------

def _demo_with_web_replicas(tmp_path: Path, replicas: int):
    root = tmp_path / f"r{replicas}"
    shutil.copytree(REPO / "topologies", root)
    apps = root / "manifests" / "demo-apps.yaml"
    text = apps.read_text()
    assert "  replicas: 6\n" in text
    apps.write_text(text.replace("  replicas: 6\n", f"  replicas: {replicas}\n", 1))
    return load(root / "demo.yaml")


def test_scaling_up_keeps_existing_pods_where_they_are(tmp_path, demo):
    before = plan_lab(_demo_with_web_replicas(tmp_path, 6))
    assert before == demo
    after = plan_lab(_demo_with_web_replicas(tmp_path, 9), previous=before)
    old = {p.key: p for p in before.pods}
    new = {p.key: p for p in after.pods}
    assert set(old) < set(new) and len(new) - len(old) == 3
    for key, pod in old.items():
        assert (new[key].node, new[key].ip, new[key].netns, new[key].host_veth) == (
            pod.node, pod.ip, pod.netns, pod.host_veth), key
    ips = [p.ip for p in after.pods]
    assert len(ips) == len(set(ips))
    added = [new[k] for k in new if k not in old]
    assert sorted(p.node for p in added) == ["node-1", "node-2", "node-3"]   # still spread evenly
    for pod in added:                                      # host-local: after the last one handed out
        assert IPv4Address(pod.ip) == IPv4Address(max(
            (p.ip for p in before.pods if p.node == pod.node), key=IPv4Address)) + 1


def test_replanning_without_changes_is_identity(demo):
    assert plan_lab(load(DEMO), previous=demo) == demo


def test_scaling_down_keeps_the_remaining_pods(tmp_path, demo):
    after = plan_lab(_demo_with_web_replicas(tmp_path, 2), previous=demo)
    old = {p.key: p for p in demo.pods}
    assert len(after.pods) == 10
    for pod in after.pods:
        assert (pod.node, pod.ip) == (old[pod.key].node, old[pod.key].ip)


def test_previous_placement_wins_over_a_new_spread():
    first = small(replicas=2)
    assert [p.node for p in first.pods] == ["n1", "n2"]
    # Scale to 4: the two existing pods stay; the new ones fill n1 and n2 evenly.
    again = small(replicas=4)
    replanned = plan_lab(load_text(small_yaml(replicas=4)), previous=first)
    assert [p.ip for p in replanned.pods[:2]] == [p.ip for p in first.pods]
    assert sorted(p.node for p in replanned.pods) == ["n1", "n1", "n2", "n2"]
    assert [p.name for p in replanned.pods] == [p.name for p in again.pods]


def _pods_yaml(names: list[str], node_subnet_length: int = 24, pinned: str | None = None) -> str:
    spec = f"nodeName: {pinned}, " if pinned else ""
    return (f"name: t\ncluster: {{nodeSubnetLength: {node_subnet_length}, dns: false}}\nnodes: [n1, n2]\nmanifests:\n" + "".join(
        f"  - {{apiVersion: v1, kind: Pod, metadata: {{name: {n}}}, spec: {{{spec}containers: [{{name: c}}]}}}}\n"
        for n in names))


def test_deleted_pods_do_not_skew_the_spread():
    before = plan_lab(load_text(_pods_yaml(["old1", "old2"], pinned="n1")))
    after = plan_lab(load_text(_pods_yaml(["new1", "new2"])), previous=before)
    assert [p.node for p in after.pods] == ["n1", "n2"]           # as without previous


def test_replacing_a_pod_on_a_full_node():
    # /28 node subnets hold 13 pods; n1 takes 13 pinned pods, then one is replaced by another.
    names = [f"p{i}" for i in range(13)]
    before = plan_lab(load_text(_pods_yaml(names, 28, pinned="n1")))
    after = plan_lab(load_text(_pods_yaml(names[:-1] + ["new"], 28, pinned="n1")), previous=before)
    assert after.find("new").ip == before.find("p12").ip          # the only free address


def test_leased_subnets_override_the_expected_ones(demo):
    plan = plan_lab(load(DEMO), subnets={"node-2": IPv4Network("10.244.7.0/24")})
    node2 = plan.node("node-2")
    assert (node2.subnet, node2.gateway) == ("10.244.7.0/24", "10.244.7.1")
    assert all(IPv4Address(p.ip) in IPv4Network("10.244.7.0/24") for p in plan.pods if p.node == "node-2")
    assert [n.subnet for n in plan.nodes if n.name != "node-2"] == ["10.244.1.0/24", "10.244.3.0/24"]
    # Pods on other nodes are unaffected.
    assert [p.ip for p in plan.pods if p.node != "node-2"] == [p.ip for p in demo.pods if p.node != "node-2"]


def _entries(plan: LabPlan, netns: str) -> list:
    """Every Namespace entry for ``netns`` (a node's netns is built in two steps)."""
    entries = [ns for ns in plan.namespaces if ns.name == netns]
    assert entries, f"no namespace {netns}"
    return entries
