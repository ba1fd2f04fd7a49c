"""Kernel tests for lab bring-up: real namespaces, real traffic, nothing left behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from labs import REPO, demo_copy, lab_netns, machine_snapshot, netsim, scaled_topology, status

pytestmark = pytest.mark.root


@pytest.fixture
def demo_lab(tmp_path):
    """The demo topology up under a test-only name; torn down afterwards whatever happens."""
    lab = f"t{os.getpid() % 10000}demo"
    before = machine_snapshot(lab)
    topo = demo_copy(tmp_path, lab)
    netsim("up", str(topo), "--timeout", "60")
    try:
        yield lab
    finally:
        netsim("down", lab, check=False)
    assert machine_snapshot(lab) == before, "up + down must leave the machine as it was"


def test_demo_paths_with_real_traffic(demo_lab):
    data = json.loads(netsim("selftest", demo_lab, "-o", "json").stdout)
    results = {(c["name"], c["source"]): c for c in data}
    assert all(c["ok"] for c in data), [c for c in data if not c["ok"]]
    names = {c["name"] for c in data}
    assert {"same-node pod→pod ICMP", "same-node pod→pod TCP, no NAT", "same-node pod→pod UDP, no NAT",
            "pod→external, masqueraded", "external→node IP", "pod answers its node"} <= names
    # The masquerade check really saw the node's address, and the no-NAT check the pod's.
    st = status(demo_lab)
    node_ips = {n["address"] for n in st["nodes"]}
    masq = [c for c in data if c["name"] == "pod→external, masqueraded"]
    assert len(masq) == 3 and {c["got"].split()[-1] for c in masq} == node_ips
    assert len(results) > 0


def test_status_and_exec(demo_lab):
    st = status(demo_lab)
    assert st["status"] == "up"
    assert [n["podSubnet"] for n in st["nodes"]] == ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    assert len(st["pods"]) == 14 and all(p["present"] for p in st["pods"])   # 12 + 2 cluster DNS
    assert all(n["podServer"] for n in st["nodes"])
    client = next(p for p in st["pods"] if p["name"] == "client")
    out = netsim("exec", "--lab", demo_lab, "client", "--", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert f"{client['ip']}/24" in out
    route = netsim("exec", "--lab", demo_lab, "client", "--", "ip", "route").stdout
    assert "default via 10.244.1.1 dev eth0" in route
    bridge = netsim("exec", "--lab", demo_lab, "node-1", "--", "ip", "-d", "link", "show", "master", "cni0").stdout
    assert bridge.count("hairpin on") == 5            # one port per pod on node-1 (a coredns replica included)
    assert netsim("exec", "--lab", demo_lab, "node-1", "--", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    web = next(p for p in st["pods"] if p["node"] == "node-1" and p["name"].startswith("web-"))
    curl = netsim("exec", "--lab", demo_lab, "client", "--", "curl", "-s", "--max-time", "3",
                  f"http://{web['ip']}:8080/hostname").stdout
    assert curl == web["name"]
    missing = netsim("exec", "--lab", demo_lab, "nope", "--", "true", check=False)
    assert missing.returncode == 1 and "no node, external or pod named 'nope'" in missing.stderr


def test_two_labs_side_by_side(tmp_path):
    a, b = f"t{os.getpid() % 10000}a", f"t{os.getpid() % 10000}b"
    try:
        netsim("up", str(scaled_topology(tmp_path, a, 6, nodes=2)))
        netsim("up", str(scaled_topology(tmp_path, b, 6, nodes=2)))   # same CIDRs, separate namespaces
        for lab in (a, b):
            data = json.loads(netsim("selftest", lab, "-o", "json").stdout)
            assert data and all(c["ok"] for c in data)
    finally:
        netsim("down", a, check=False)
        netsim("down", b, check=False)
    assert not lab_netns(a) and not lab_netns(b)


BAD_INPUTS = {
    "nodePort outside the range": ("""
name: {lab}
nodes: [n1]
manifests:
  - {{apiVersion: v1, kind: Service, metadata: {{name: web}},
     spec: {{type: NodePort, ports: [{{port: 80, nodePort: 80}}]}}}}
""", "manifests[0] Service web: spec.ports[0].nodePort: must be 30000–32767, got 80"),
    "overlapping CIDRs": ("""
name: {lab}
cluster: {{podCIDR: 10.0.0.0/8, serviceCIDR: 10.96.0.0/12}}
nodes: [n1]
""", "cluster.serviceCIDR: 10.96.0.0/12 overlaps cluster.podCIDR 10.0.0.0/8"),
    "node name too long for an interface": ("""
name: {lab}
nodes: [a-very-long-node]
""", "nodes[0].name: 'a-very-long-node' is 16 characters, at most 10 allowed"),
    "unknown field": ("""
name: {lab}
nodes: [n1]
clustr: {{}}
""", "clustr: unknown field (hint: did you mean 'cluster'?)"),
    "nodeName that does not exist": ("""
name: {lab}
nodes: [n1]
manifests:
  - {{apiVersion: v1, kind: Pod, metadata: {{name: p}}, spec: {{nodeName: n9, containers: [{{name: c}}]}}}}
""", "node 'n9' does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_creates_nothing(tmp_path, case):
    lab = f"t{os.getpid() % 10000}bad"
    text, message = BAD_INPUTS[case]
    topo = tmp_path / "bad.yaml"
    topo.write_text(text.format(lab=lab))
    before = machine_snapshot(lab)
    done = netsim("up", str(topo), check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert "nothing was created" in done.stderr
    assert machine_snapshot(lab) == before
    assert not os.path.exists(f"/run/netsim/{lab}")


def _wait_for_some_netns(lab: str, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(lab_netns(lab)) < count:
        assert proc.poll() is None, "up finished before it could be interrupted"
        assert time.monotonic() < deadline, f"no {count} namespaces of {lab} appeared"
        time.sleep(0.001)


def test_sigkill_of_controller_then_clean_leaves_nothing(tmp_path):
    lab = f"t{os.getpid() % 10000}kill"
    before = machine_snapshot(lab)
    topo = scaled_topology(tmp_path, lab, 150)
    proc = subprocess.Popen([sys.executable, "-m", "netsim", "up", str(topo)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_some_netns(lab, proc, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lab_netns(lab), "the kill should have left a half-built lab to clean"
    again = netsim("up", str(topo), check=False)
    assert again.returncode == 1 and "netsim clean" in again.stderr
    netsim("clean", lab)
    assert not lab_netns(lab)
    assert machine_snapshot(lab) == before


def test_sigterm_during_up_rolls_back(tmp_path):
    lab = f"t{os.getpid() % 10000}term"
    before = machine_snapshot(lab)
    topo = scaled_topology(tmp_path, lab, 150)
    proc = subprocess.Popen([sys.executable, "-m", "netsim", "up", str(topo)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_some_netns(lab, proc, 60)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert machine_snapshot(lab) == before


def test_clean_removes_every_lab(tmp_path):
    lab = f"t{os.getpid() % 10000}cln"
    before = machine_snapshot(lab)
    netsim("up", str(scaled_topology(tmp_path, lab, 3, nodes=1)))
    out = netsim("clean", lab).stdout
    assert lab in out
    assert machine_snapshot(lab) == before


def test_mininet_hosts_and_shell(demo_lab):
    from netsim.runtime.mnhost import attach
    net = attach(demo_lab)
    try:
        node = net["node-1"]
        assert "10.244.1.1/24" in node.cmd("ip -4 -br addr show cni0")
        web = next(p for p in net.plan.pods if p.node == "node-1" and p.name.startswith("web-"))
        assert net["client"].cmd(f"curl -s --max-time 3 {net[web.name].IP()}:8080/hostname") == web.name
    finally:
        net.stop()
    # The Mininet-style shell: names become IPs, 'py' reaches the Mininet hosts.
    script = (f"client curl -s --max-time 3 {web.name}:8080/clientip\n"
              "py net['node-1'].cmd('cat /proc/sys/net/bridge/bridge-nf-call-iptables')\nexit\n")
    done = subprocess.run([sys.executable, "-m", "netsim", "shell", demo_lab], input=script,
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    client_ip = next(p.ip for p in net.plan.pods if p.name == "client")
    assert f"{client_ip}:" in done.stdout
    assert re.search(r"(^|> )1\s*$", done.stdout, re.M), done.stdout
