"""Kernel tests for probes, traces and verify on a real lab (demo topology, lab pb-*).

Every probe's result is compared with what kube-proxy and flannel promise: DNAT without
SNAT from a pod to a ClusterIP, SNAT to the entry node for NodePort eTP=Cluster, the
client address for eTP=Local, masquerade to the bridge on hairpin. The trace must show
DNAT at the right hop, VXLAN outer headers across nodes, the rules that matched, and a
pcapng tshark decodes. Then the cluster is broken on purpose and verify/trace must say
so at the right place. Nothing may be left behind.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from labs import REPO, demo_copy, lab_netns, netsim

pytestmark = pytest.mark.root


def j(*args: str, check: bool = True) -> dict:
    done = netsim(*args, "-o", "json", check=check)
    return json.loads(done.stdout)


def in_ns(ns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=True).stdout


def processes_in(lab: str) -> set[int]:
    inodes = {os.stat(f"/run/netns/{n}").st_ino for n in lab_netns(lab)}
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.add(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    name = f"pb-kt{os.getpid() % 10000}"
    topo = demo_copy(tmp_path_factory.mktemp("pb"), name)
    netsim("up", str(topo), "--timeout", "60")
    try:
        status = json.loads(netsim("status", name, "-o", "json").stdout)
        plan = json.loads(Path(f"/run/netsim/{name}/plan.json").read_text())
        yield {"lab": name, "topo": topo, "status": status, "plan": plan}
    finally:
        netsim("down", name, check=False)
    assert lab_netns(name) == []


def pods(d, app: str | None = None, node: str | None = None) -> list[dict]:
    return [p for p in d["plan"]["pods"] if (app is None or p["labels"].get("app") == app)
            and (node is None or p["node"] == node)]


def node(d, name: str) -> dict:
    return next(n for n in d["plan"]["nodes"] if n["name"] == name)


def node_addresses(n: dict) -> set[str]:
    return {n["address"], n["gateway"], n["subnet"].split("/")[0]}


def test_pod_to_clusterip_is_dnat_without_snat(demo):
    r = j("probe", "--lab", demo["lab"], "client", "web")
    client = pods(demo, "client")[0]
    assert r["reached"] and r["verdict"] == "SYN-ACK"
    assert r["backend"] in {p["namespace"] + "/" + p["name"] for p in pods(demo, "web")}
    assert (r["seenIP"], r["dnat"], r["snat"]) == (client["ip"], True, False)
    udp = j("probe", "--lab", demo["lab"], "client", "echo", "--proto", "udp")
    assert udp["reached"] and udp["backend"].startswith("default/echo-") and udp["seenIP"] == client["ip"]
    icmp = netsim("probe", "--lab", demo["lab"], "client", "web", "--proto", "icmp", "--timeout", "0.3", check=False)
    assert icmp.returncode == 1 and "NOT reached (no answer)" in icmp.stdout    # a ClusterIP is no host


def test_external_to_nodeport_snat_for_cluster_client_ip_for_local(demo):
    ext = demo["plan"]["externals"][0]["address"]
    n1 = node(demo, "node-1")
    cluster = j("probe", "--lab", demo["lab"], "ext-client", f"{n1['address']}:30080")
    assert cluster["reached"] and cluster["snat"] and cluster["seenIP"] in node_addresses(n1)
    svc = json.loads(Path(f"/run/netsim/{demo['lab']}/services.json").read_text())
    local_np = next(p["node_port"] for p in svc["ports"] if p["name"] == "web-lb")
    for n in demo["plan"]["nodes"]:
        local = {f"default/{p['name']}" for p in pods(demo, "web", n["name"])}
        done = netsim("probe", "--lab", demo["lab"], "ext-client", f"{n['name']}:{local_np}", "-o", "json",
                      "--timeout", "0.5", check=False)
        r = json.loads(done.stdout)
        if local:
            assert done.returncode == 0 and r["backend"] in local and r["seenIP"] == ext and not r["snat"]
        else:
            assert done.returncode == 1 and not r["reached"]


def test_trace_cross_node_clusterip_shows_dnat_vxlan_rules_conntrack_and_decodes(demo, tmp_path):
    before = processes_in(demo["lab"])
    pcap = tmp_path / "t.pcapng"
    backend = pods(demo, "web", "node-2")[0]
    target = f"{backend['ip']}:8080"
    # Through the ClusterIP, from node-1 to a pod on some node: DNAT where the pod's packet enters node-1.
    t = j("trace", "--lab", demo["lab"], "client", "web", "-w", str(pcap))
    assert t["reached"] and t["path"]["delivered"]
    (dnat,) = [e for e in t["nat"] if e["leg"] == "forward" and e["packet"] == "S"]
    assert dnat["kinds"] == ["DNAT"] and dnat["between"][1].startswith("node-1 ")
    rules = [r for p in t["rules"] if p["node"] == "node-1" for r in p["rules"]]
    chains = [r["chain"] for r in rules]
    assert "KUBE-SERVICES" in chains and any(c.startswith("KUBE-SVC-") for c in chains)
    assert any(r["chain"].startswith("KUBE-SEP-") and "dnat to" in r["rule"] for r in rules)
    assert any("DNAT" in n for e in t["conntrack"] if e["node"] == "node-1" for n in e["nat"])
    # Pod to a pod on node-2: VXLAN on the underlay, node-1 → node-2, UDP 8472, VNI 1.
    t2 = j("trace", "--lab", demo["lab"], "client", target, "-w", str(pcap))
    outer = [s["outer"] for s in t2["steps"] if s["outer"] and s["leg"] == "forward"]
    assert outer and all(o == {**o, "src": node(demo, "node-1")["address"], "dst": node(demo, "node-2")["address"],
                                    "dport": 8472, "vni": 1} for o in outer)
    assert not t2["nat"]                                                         # pod to pod: never NATed
    hops = [s["hop"] for s in t2["steps"] if s["leg"] == "forward" and s["info"] == "S"]
    assert hops[0] == "default/client eth0" and hops[-1] == f"default/{backend['name']} eth0"
    assert {"node-1 flannel.1", "node-1 eth0", "underlay node-1-eth0", "underlay node-2-eth0",
            "node-2 eth0", "node-2 flannel.1", "node-2 cni0"} <= set(hops)
    rows = subprocess.run(["tshark", "-r", str(pcap), "-d", "udp.port==8472,vxlan", "-T", "fields",
                           "-e", "frame.interface_name", "-e", "vxlan.vni", "-e", "ip.dst"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(rows) == len(t2["steps"])
    assert any(r.startswith("node-1 eth0\t1\t") for r in rows)
    # Nothing left: no trace table, no monitor, no process in the lab's namespaces.
    for n in demo["plan"]["nodes"]:
        assert "netsim_trace" not in in_ns(n["netns"], "nft", "list", "tables")
    assert processes_in(demo["lab"]) == before


def test_trace_nodeport_shows_masquerade(demo):
    n1 = node(demo, "node-1")
    t = j("trace", "--lab", demo["lab"], "ext-client", "node-1:30080", "-w", "/dev/null")
    (fwd,) = [e for e in t["nat"] if e["leg"] == "forward" and e["packet"] == "S"]
    assert fwd["kinds"] == ["DNAT", "SNAT"] and fwd["between"][0] == "node-1 eth0"
    rules = [r for p in t["rules"] if p["node"] == "node-1" for r in p["rules"]]
    assert any(r["chain"] == "KUBE-POSTROUTING" and "masquerade" in r["rule"] for r in rules)
    assert any(r["chain"] == "KUBE-NODEPORTS" for r in rules)
    snat = [s for s in t["steps"] if s["leg"] == "forward" and s["info"] == "S" and s["hop"].startswith("default/")]
    assert snat and snat[-1]["src"] in node_addresses(n1)


def test_verify_passes_on_the_demo_and_fails_on_a_wrong_expectation(demo, tmp_path):
    ok = netsim("verify", str(demo["topo"]))          # the demo's own verify: section and the matrix
    assert ok.returncode == 0 and ", 0 failed" in ok.stdout
    assert "pod-to-clusterip" in ok.stdout and "clusterip-does-not-ping" in ok.stdout
    wrong = tmp_path / "wrong.yaml"
    doc = yaml.safe_load(demo["topo"].read_text())
    doc["verify"] = {
        "right": {"from": "client", "to": "web", "source": "client", "nat": "dnat"},
        "wrong": {"description": "deliberately wrong, a pod reaching a ClusterIP is not SNATed",
                  "from": "client", "to": "web", "source": "node"}}
    wrong.write_text(yaml.safe_dump(doc, sort_keys=False))
    bad = netsim("verify", str(wrong), "--no-matrix", check=False)
    assert bad.returncode == 1
    lines = {l.split()[0]: l for l in bad.stdout.splitlines()[1:] if l.strip() and not l[0].isdigit()}
    assert lines["right"].endswith("ok") and "FAIL: source seen" in lines["wrong"]
    assert "1 passed, 1 failed" in bad.stdout


def test_hairpin_is_masqueraded_to_the_bridge(tmp_path):
    name = f"pb-hp{os.getpid() % 10000}"
    topo = tmp_path / "hairpin.yaml"
    topo.write_text((REPO / "topologies" / "hairpin.yaml").read_text().replace("name: hairpin", f"name: {name}"))
    netsim("up", str(topo))
    try:
        r = j("probe", "--lab", name, "solo", "svc/solo")
        assert (r["reached"], r["backend"], r["seenIP"], r["snat"]) == (True, "default/solo", "10.244.1.1", True)
        assert netsim("verify", str(topo)).returncode == 0
    finally:
        netsim("down", name, check=False)
    assert lab_netns(name) == []


# -- breakage: the verifier must catch it, at the right place ----------------------------

def test_deleted_masquerade_rule_fails_the_snat_expectation(tmp_path):
    """nodeport-etp: the web pod is on node-2. Without KUBE-POSTROUTING's MASQUERADE on
    node-2, NodePort traffic to its local pod keeps the client address (flannel's own
    masquerade covers only traffic to other nodes' subnets), and verify says so."""
    name = f"pb-np{os.getpid() % 10000}"
    topo = tmp_path / "np.yaml"
    topo.write_text((REPO / "topologies" / "nodeport-etp.yaml").read_text().replace("name: nodeport-etp", f"name: {name}"))
    netsim("up", str(topo))
    try:
        assert netsim("verify", str(topo)).returncode == 0
        ns = f"netsim.{name}.node.node-2"
        rule = next(l for l in in_ns(ns, "iptables-save", "-t", "nat").splitlines()
                    if l.startswith("-A KUBE-POSTROUTING") and "-j MASQUERADE" in l)
        spec = shlex.split(rule)[2:]
        in_ns(ns, "iptables", "-t", "nat", "-D", "KUBE-POSTROUTING", *spec)
        broken = netsim("verify", str(topo), "--no-matrix", check=False)
        assert broken.returncode == 1
        failed = [l for l in broken.stdout.splitlines() if "FAIL" in l]
        assert len(failed) == 1 and failed[0].startswith("cluster-via-node-2")
        assert "source seen 192.168.100.254" in failed[0]
        t = j("trace", "--lab", name, "outside", "node-2:30100", "-w", "/dev/null")
        assert [e["kinds"] for e in t["nat"] if e["leg"] == "forward" and e["packet"] == "S"] == [["DNAT"]]
        in_ns(ns, "iptables", "-t", "nat", "-A", "KUBE-POSTROUTING", *spec)
        assert netsim("verify", str(topo), "--no-matrix").returncode == 0
    finally:
        netsim("down", name, check=False)
    assert lab_netns(name) == []


def test_deleted_overlay_route_is_reported_at_flannel_on_that_node(demo):
    n1, n2 = node(demo, "node-1"), node(demo, "node-2")
    target = pods(demo, "web", "node-2")[0]
    route = [n2["subnet"], "via", n2["subnet"].split("/")[0], "dev", "flannel.1", "onlink"]
    in_ns(n1["netns"], "ip", "route", "del", n2["subnet"])
    try:
        done = netsim("trace", "--lab", demo["lab"], "client", f"{target['ip']}:8080", "-o", "json",
                      "--timeout", "0.5", "-w", "/dev/null", check=False)
        t = json.loads(done.stdout)
        assert done.returncode == 1 and not t["path"]["delivered"]
        assert not any(s["hop"].startswith("node-2") for s in t["steps"])
        assert any(p.startswith("node-1 sent the packet") and "flannel.1" in p for p in t["path"]["problems"])
    finally:
        in_ns(n1["netns"], "ip", "route", "add", *route)
    assert j("probe", "--lab", demo["lab"], "client", f"{target['ip']}:8080")["reached"]


def test_removed_backends_are_never_answered_by(demo):
    netsim("scale", "deployment/web", "--replicas", "2", "--lab", demo["lab"])
    plan = json.loads(Path(f"/run/netsim/{demo['lab']}/plan.json").read_text())
    left = {f"default/{p['name']}" for p in plan["pods"] if p["labels"].get("app") == "web"}
    assert len(left) == 2
    from netsim.apply.labstate import load_plan
    from netsim.apply.services import load_resolution
    from netsim.probes import probe, targets
    lab_plan, res = load_plan(demo["lab"]), load_resolution(demo["lab"])
    src, target = targets.resolve_source("client", lab_plan), targets.resolve_target("web", lab_plan, res)
    assert set(target.backends) == left
    results = [probe.run(lab_plan, src, target) for _ in range(12)]
    assert all(r.reached for r in results), [r.to_dict() for r in results if not r.reached]
    assert {r.backend for r in results} <= left
    out = j("verify", demo["lab"], "--matrix-only")
    assert out["failed"] == 0


def test_graph_draws_the_running_lab(demo, tmp_path):
    text = netsim("graph", demo["lab"]).stdout
    assert all(f"node {n['name']}  eth0 {n['address']}" in text for n in demo["plan"]["nodes"])
    svg = tmp_path / "lab.svg"
    netsim("graph", demo["lab"], "-o", "svg", "-w", str(svg))
    import xml.etree.ElementTree as ET
    texts = " ".join(t.text or "" for t in ET.parse(svg).getroot().iter() if t.tag.endswith("text"))
    assert "flannel.1" in texts and "default/web-lb" in texts and "underlay switch br-underlay" in texts
