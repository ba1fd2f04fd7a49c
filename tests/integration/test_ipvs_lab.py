"""Kernel tests: the demo lab in IPVS mode through the real agents, and switching modes.

A copy of the demo runs with ``proxyMode: ipvs`` (legacy iptables: the only backend inside
user-mode Linux). ``netsim selftest`` sends real traffic through every Service path; every
node holds kube-ipvs0, kube-proxy's ipsets and virtual servers; scaling a Deployment
reprograms the real servers; ``netsim proxy mode iptables`` and back leave nothing of the
other mode. Marked ``ipvs``: skipped without ip_vs, run in UML by scripts/test-uml.sh.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from labs import demo_copy, netsim, running_lab, status
from netsim.proxy.ipvs import IPSET_NAMES
from netsim.runtime.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.ipvs]

PREFIX = os.environ.get("NETSIM_TEST_LAB_PREFIX", "t")
NODES = ("node-1", "node-2", "node-3")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    name = f"{PREFIX}{os.getpid() % 10000}iv"
    path = demo_copy(tmp_path_factory.mktemp("ipvs"), name)
    path.write_text(path.read_text().replace("proxyMode: iptables",
                                             "proxyMode: ipvs\n  ipvsScheduler: wrr\n  iptablesBackend: legacy"))
    with running_lab(path, name, timeout=90) as lab:
        yield lab


def node_sh(lab: str, node: str, script: str) -> str:
    return netsim("exec", "--lab", lab, node, "--", "sh", "-c", script).stdout


def ipvs_state(lab: str, node: str) -> dict:
    out = node_sh(lab, node, "ipvsadm -Sn; echo ---; ip -o addr show dev kube-ipvs0 2>/dev/null; echo ---; "
                             "ipset list -n; echo ---; iptables-legacy-save")
    servers, addrs, sets, save = out.split("---\n")
    return {"virtual_servers": sum(1 for l in servers.splitlines() if l.startswith("-A ")),
            "real_servers": sum(1 for l in servers.splitlines() if l.startswith("-a ")),
            "kube_ipvs0": len(re.findall(r"inet ", addrs)),
            "ipsets": len(set(sets.split()) & set(IPSET_NAMES)),
            "svc_chains": len(re.findall(r"^:KUBE-SVC-", save, re.M)),
            "ipvs_filter": ":KUBE-IPVS-FILTER" in save}


def selftest_ok(lab: str) -> list[dict]:
    checks = json.loads(netsim("selftest", lab, "-o", "json", timeout=180).stdout)
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    return checks


def test_selftest_passes_in_ipvs_mode(lab):
    checks = selftest_ok(lab)
    names = {c["name"] for c in checks}
    assert {"pod→ClusterIP (TCP)", "pod→ClusterIP (UDP)", "external→NodePort, eTP=Cluster",
            "external→NodePort, eTP=Local", "external→LoadBalancer IP"} <= names
    local = [c for c in checks if c["name"] == "external→NodePort, eTP=Local"]
    assert all("192.168.100.254" in c["got"] for c in local)     # eTP=Local keeps the client address


def test_every_node_holds_ipvs_state_with_the_topology_scheduler(lab):
    assert status(lab)["proxyMode"] == "ipvs"
    n_services = len(json.loads(open(f"/run/netsim/{lab}/services.json").read())["cluster_ips"])
    for node in NODES:
        st = ipvs_state(lab, node)
        assert st["kube_ipvs0"] >= n_services and st["ipsets"] == len(IPSET_NAMES) and st["ipvs_filter"]
        assert st["virtual_servers"] > n_services and st["svc_chains"] == 0
        heads = [l for l in node_sh(lab, node, "ipvsadm -Sn").splitlines() if l.startswith("-A ")]
        assert all(" -s wrr" in l for l in heads)
        agent = json.loads(open(f"/run/netsim/{lab}/kube-proxy/{node}.json").read())
        assert agent["mode"] == "ipvs" and agent["rules"] == st["virtual_servers"] + st["real_servers"]


def test_scaling_reprograms_real_servers_on_every_node(lab):
    web = json.loads(open(f"/run/netsim/{lab}/services.json").read())["cluster_ips"]["default/web"]

    def weights(node: str) -> list[int]:
        """The weights of the real servers behind web (0: draining, kept while connections last)."""
        out = node_sh(lab, node, f"ipvsadm -Ln -t {web}:80")
        return [int(w) for w in re.findall(r"->\s+\S+\s+Masq\s+(\d+)", out)]

    def reals(node: str) -> int:
        return sum(1 for w in weights(node) if w > 0)

    before = reals("node-2")
    netsim("scale", "deployment/web", "--replicas", "2", "--lab", lab)
    try:
        for node in NODES:
            wait_for(lambda: reals(node) == 2, f"2 real servers behind {web}:80 on {node}", timeout=20)
        # the selftest's connections linger (TIME_WAIT): removed servers drain at weight 0
        assert all(w in (0, 1) for w in weights("node-1"))
    finally:
        netsim("scale", "deployment/web", "--replicas", str(before), "--lab", lab)
    for node in NODES:
        wait_for(lambda: reals(node) == before, f"{before} real servers behind {web}:80 on {node}", timeout=20)


def test_probe_trace_and_verify_in_ipvs_mode(lab, tmp_path):
    """probe, trace and verify on the IPVS lab (legacy iptables, so no rule tracing): the
    DNAT shows where the pod's packet enters node-1, and the trace names the probe's own
    IPVS connection entry, whose real server is the pod the probe reached."""
    plan = json.loads(open(f"/run/netsim/{lab}/plan.json").read())
    client = next(p for p in plan["pods"] if p["name"] == "client")
    web = json.loads(open(f"/run/netsim/{lab}/services.json").read())["cluster_ips"]["default/web"]
    r = json.loads(netsim("probe", "--lab", lab, "client", "web", "-o", "json").stdout)
    assert r["reached"] and r["backend"].startswith("default/web-") and (r["dnat"], r["snat"]) == (True, False)
    assert r["seenIP"] == client["ip"]

    pcap = tmp_path / "ipvs.pcapng"
    t = json.loads(netsim("trace", "--lab", lab, "client", "web", "-o", "json", "-w", str(pcap)).stdout)
    assert t["reached"] and t["path"]["delivered"] and pcap.stat().st_size > 0
    (dnat,) = [e for e in t["nat"] if e["leg"] == "forward" and e["packet"] == "S"]
    assert dnat["kinds"] == ["DNAT"] and dnat["between"][1].startswith("node-1 ")
    sport = t["steps"][0]["sport"]
    (entry,) = t["ipvs"]["node-1"]                          # the probe's own entry, nothing else
    backend = next(p for p in plan["pods"] if t["path"]["deliveredAt"] == f"{p['namespace']}/{p['name']} eth0")
    assert (entry["client"], entry["virtual"], entry["realServer"]) == (
        f"{client['ip']}:{sport}", f"{web}:80", f"{backend['ip']}:8080")
    assert any(f"DNAT {web}:80 → {backend['ip']}:8080" in n for e in t["conntrack"] if e["node"] == "node-1"
               for n in e["nat"])
    assert t["rules"] == [] and any("IPVS" in n for n in t["notes"])

    node1 = next(n for n in plan["nodes"] if n["name"] == "node-1")
    t = json.loads(netsim("trace", "--lab", lab, "ext-client", "node-1:30080", "-o", "json", "-w", "/dev/null").stdout)
    (fwd,) = [e for e in t["nat"] if e["leg"] == "forward" and e["packet"] == "S"]
    assert t["reached"] and fwd["kinds"] == ["DNAT", "SNAT"]
    assert [e["virtual"] for e in t["ipvs"]["node-1"]] == [f"{node1['address']}:30080"]

    # a DNS name: the query to the kube-dns ClusterIP is an IPVS UDP entry too
    t = json.loads(netsim("trace", "--lab", lab, "client", "dns:web", "-o", "json", "-w", "/dev/null").stdout)
    assert t["reached"] and t["address"] == f"{web}:80"
    assert [e["virtual"] for e in t["dns"]["trace"]["ipvs"]["node-1"]] == ["10.96.0.10:53"]

    done = netsim("verify", "--lab", lab, timeout=300)      # the demo's verify: section and the matrix
    assert ", 0 failed" in done.stdout and "clusterip-does-not-ping" in done.stdout


def test_switching_to_iptables_and_back_leaves_nothing_stale(lab):
    out = netsim("proxy", "mode", "iptables", "--lab", lab, "--timeout", "150", timeout=180).stdout
    assert "from ipvs to iptables" in out and "kube-ipvs0" in out
    for node in NODES:
        st = ipvs_state(lab, node)
        assert st == {"virtual_servers": 0, "real_servers": 0, "kube_ipvs0": 0, "ipsets": 0,
                      "svc_chains": st["svc_chains"], "ipvs_filter": False} and st["svc_chains"] > 0
    selftest_ok(lab)
    out = netsim("proxy", "mode", "ipvs", "--lab", lab, "--timeout", "150", timeout=180).stdout
    assert "from iptables to ipvs" in out
    for node in NODES:
        st = ipvs_state(lab, node)
        assert st["svc_chains"] == 0 and st["virtual_servers"] > 0 and st["ipvs_filter"]
    selftest_ok(lab)
