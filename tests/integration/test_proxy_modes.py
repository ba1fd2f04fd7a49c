"""Kernel tests for kube-proxy's nftables mode and for switching modes on a running lab.

A copy of the demo lab runs with ``proxyMode: nftables``; ``netsim selftest`` sends real
traffic through every Service path (ClusterIP TCP and UDP from pods on every node,
NodePort with eTP=Cluster and eTP=Local from the external host, the LoadBalancer IP).
The lab is then switched to iptables mode and back with ``netsim proxy mode``: after each
switch every node holds the new mode's state and nothing of the old one, and the traffic
checks pass again. The nftables backend's incremental syncs are checked on their own in a
throw-away namespace: a partial sync must leave the kernel exactly as a full sync does.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labs import demo_copy, machine_snapshot, netsim, status

pytestmark = pytest.mark.root

PREFIX = os.environ.get("NETSIM_TEST_LAB_PREFIX", "t")
NODES = ("node-1", "node-2", "node-3")


def root_has_kube_proxy_table() -> bool:
    return "kube-proxy" in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    name = f"{PREFIX}{os.getpid() % 10000}md"
    before = machine_snapshot(name)
    path = demo_copy(tmp_path_factory.mktemp("modes"), name)
    path.write_text(path.read_text().replace("proxyMode: iptables", "proxyMode: nftables"))
    netsim("up", str(path), "--timeout", "60")
    try:
        yield name
    finally:
        netsim("down", name, check=False)
    assert machine_snapshot(name) == before
    assert not root_has_kube_proxy_table()


def node_sh(lab: str, node: str, script: str) -> str:
    return netsim("exec", "--lab", lab, node, "--", "sh", "-c", script).stdout


def kernel_state(lab: str, node: str) -> dict:
    """What each mode leaves on a node: nft tables, KUBE chains and jumps, route_localnet."""
    out = node_sh(lab, node, "nft list tables; echo ---; iptables-nft-save; echo ---; "
                             "iptables-legacy-save; echo ---; sysctl -n net.ipv4.conf.all.route_localnet")
    tables, nft_save, legacy_save, localnet = out.split("---\n")
    return {"nft_table": "table ip kube-proxy" in tables,
            "kube_chains": len(re.findall(r"^:KUBE-", nft_save + legacy_save, re.M)),
            "kube_jumps": len(re.findall(r"^-A (?:INPUT|FORWARD|OUTPUT|PREROUTING|POSTROUTING) .*-j KUBE-",
                                         nft_save + legacy_save, re.M)),
            "route_localnet": localnet.strip()}


def selftest_ok(lab: str) -> list[dict]:
    checks = json.loads(netsim("selftest", lab, "-o", "json").stdout)
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    return checks


def test_selftest_passes_in_nftables_mode(lab):
    checks = selftest_ok(lab)
    names = [c["name"] for c in checks]
    assert names.count("pod→ClusterIP (UDP)") >= len(NODES) and names.count("pod→ClusterIP (TCP)") >= len(NODES)
    assert {"external→NodePort, eTP=Cluster", "external→NodePort, eTP=Local", "external→LoadBalancer IP"} <= set(names)
    local = [c for c in checks if c["name"] == "external→NodePort, eTP=Local"]
    assert local and all("192.168.100.254" in c["got"] for c in local)          # the client's own address
    snat = [c for c in checks if c["name"] == "external→NodePort, eTP=Cluster"]
    assert snat and not any("192.168.100.254" in c["got"] for c in snat)


def test_nodes_hold_only_the_nftables_table(lab):
    assert status(lab)["proxyMode"] == "nftables"
    for node in NODES:
        assert kernel_state(lab, node) == {"nft_table": True, "kube_chains": 0, "kube_jumps": 0,
                                           "route_localnet": "0"}
        agent = json.loads(open(f"/run/netsim/{lab}/kube-proxy/{node}.json").read())
        assert agent["mode"] == "nftables" and agent["last_sync_full"] is True


def test_unused_port_of_a_clusterip_is_rejected_and_unallocated_address_dropped(lab):
    svc = json.loads(open(f"/run/netsim/{lab}/services.json").read())["cluster_ips"]["default/web"]
    pod = next(p["name"] for p in status(lab)["pods"] if p["name"] == "client")
    refused = netsim("exec", "--lab", lab, pod, "--", "curl", "-s", "--max-time", "3", f"http://{svc}:81/", check=False)
    assert refused.returncode == 7                                              # cluster-ips-check: reject
    dropped = netsim("exec", "--lab", lab, pod, "--", "curl", "-s", "--max-time", "1", "http://10.96.0.99:80/",
                     check=False)
    assert dropped.returncode == 28                                             # in the service CIDR: drop


def test_switching_modes_leaves_no_stale_state_and_traffic_keeps_working(lab):
    out = netsim("proxy", "mode", "iptables", "--lab", lab).stdout
    assert "from nftables to iptables" in out and "table ip kube-proxy" in out
    assert status(lab)["proxyMode"] == "iptables"
    for node in NODES:
        st = kernel_state(lab, node)
        assert not st["nft_table"] and st["kube_chains"] > 0 and st["kube_jumps"] > 0 and st["route_localnet"] == "1"
    selftest_ok(lab)

    out = netsim("proxy", "mode", "nftables", "--lab", lab).stdout
    assert "from iptables to nftables" in out and "KUBE chains" in out
    assert status(lab)["proxyMode"] == "nftables"
    for node in NODES:
        assert kernel_state(lab, node) == {"nft_table": True, "kube_chains": 0, "kube_jumps": 0,
                                           "route_localnet": "0"}
    selftest_ok(lab)
    again = netsim("proxy", "mode", "nftables", "--lab", lab).stdout
    assert "nothing to do" in again


def test_a_node_that_cannot_switch_puts_every_node_back(lab):
    netsim("proxy", "mode", "iptables", "--lab", lab)
    # a foreign table in node-2's way: nftables mode cannot create its set of IPv4 ClusterIPs
    node_sh(lab, "node-2", "nft add table ip kube-proxy && nft add set ip kube-proxy cluster-ips '{ type ipv6_addr ; }'")
    done = netsim("proxy", "mode", "nftables", "--lab", lab, "--timeout", "5", check=False)
    assert done.returncode == 1 and "kube-proxy on node-2" in done.stderr and "Traceback" not in done.stderr
    assert status(lab)["proxyMode"] == "iptables"
    for node in NODES:
        st = kernel_state(lab, node)
        assert not st["nft_table"] and st["kube_chains"] > 0, (node, st)      # the foreign table went too
    selftest_ok(lab)
    netsim("proxy", "mode", "nftables", "--lab", lab)
    selftest_ok(lab)


def test_unknown_or_missing_mode_is_one_line_and_changes_nothing(lab):
    done = netsim("proxy", "mode", "userspace", "--lab", lab, check=False)
    assert done.returncode == 2 and "invalid choice" in done.stderr
    assert status(lab)["proxyMode"] == "nftables"


# -- the backend on its own ---------------------------------------------------------------------
@pytest.fixture
def netns():
    name = f"{PREFIX}{os.getpid() % 10000}-nftb"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_ns(ns: str, code: str) -> str:
    """Run python ``code`` inside ``ns`` (the backend talks to the namespace it runs in)."""
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    return done.stdout


BACKEND_SCRIPT = """
import json, subprocess, sys
sys.path.insert(0, "tests/unit")
from test_proxy_nftables import NODE, changed_scenario
from netsim.proxy.nftables_apply import Backend

def table():
    out = json.loads(subprocess.run(["nft", "-j", "list", "table", "ip", "kube-proxy"], capture_output=True,
                                    text=True, check=True).stdout)["nftables"]
    strip = lambda v: {k: x for k, x in v.items() if k != "handle"}
    return sorted(json.dumps({k: strip(v) for k, v in o.items()}, sort_keys=True) for o in out if "metainfo" not in o)

old, new, changed = changed_scenario()
b = Backend(NODE)
full_old = b.sync(old, None)
partial = b.sync(new, changed)
incremental = table()
restarted = Backend(NODE)                      # a new agent finds the table of the last one
restarted.sync(old, None)
after_restart = table()
fresh = Backend(NODE)
fresh.cleanup(); fresh.sync(new, None); clean_new = table()
fresh.cleanup(); fresh.sync(old, None); clean_old = table()
print(json.dumps({"incremental_same": incremental == clean_new, "restart_same": after_restart == clean_old,
                  "full": [full_old.full, partial.full], "written": [full_old.written, partial.written],
                  "cleanup": fresh.cleanup(),
                  "after": subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout}))
"""


def test_partial_and_restart_syncs_leave_the_kernel_as_a_fresh_full_sync_and_cleanup_removes_it(netns):
    result = json.loads(in_ns(netns, BACKEND_SCRIPT))
    assert result["incremental_same"], "a partial sync left the table unlike a full sync"
    assert result["restart_same"], "a restarted agent's full sync left stale objects"
    assert result["full"] == [True, False]
    assert 0 < result["written"][1] < result["written"][0]
    assert result["cleanup"] == "table ip kube-proxy" and result["after"] == ""
