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

from labs import demo_copy, machine_snapshot, netsim, status
from netsim.proxy.ipvs import IPSET_NAMES
from netsim.runtime.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.ipvs]

PREFIX = os.environ.get("NETSIM_TEST_LAB_PREFIX", "t")
NODES = ("node-1", "node-2", "node-3")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    name = f"{PREFIX}{os.getpid() % 10000}iv"
    before = machine_snapshot(name)
    path = demo_copy(tmp_path_factory.mktemp("ipvs"), name)
    path.write_text(path.read_text().replace("proxyMode: iptables",
                                             "proxyMode: ipvs\n  ipvsScheduler: wrr\n  iptablesBackend: legacy"))
    netsim("up", str(path), "--timeout", "90", timeout=180)
    try:
        yield name
    finally:
        netsim("down", name, check=False)
    assert machine_snapshot(name) == before


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
