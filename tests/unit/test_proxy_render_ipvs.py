"""``netsim proxy render --mode ipvs``: the demo's IPVS state per node, golden-checked, no root."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from netsim.cli import main

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "ipvs"


def render(capsys, node: str) -> str:
    assert main(["proxy", "render", str(REPO / "topologies" / "demo.yaml"), "--node", node, "--mode", "ipvs"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("node", ["node-1", "node-2"])
def test_demo_render_matches_golden_and_is_deterministic(capsys, node):
    first, second = render(capsys, node), render(capsys, node)
    assert first == second
    path = GOLDEN / f"demo-{node}.txt"
    if os.environ.get("NETSIM_UPDATE_GOLDEN"):
        path.write_text(first)
    assert first == path.read_text()
    assert "# --- ipvsadm -Sn ---" in first and "# --- ipset save ---" in first
    assert "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536" in first
    assert "-m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE" in first


@pytest.mark.parametrize("node, subnet", [("node-1", "10.244.1."), ("node-2", "10.244.2."), ("node-3", "10.244.3.")])
def test_demo_etp_local_lb_uses_only_the_nodes_own_endpoints(capsys, node, subnet):
    """The eTP=Local LoadBalancer's LB and NodePort virtual servers list only this node's
    endpoints; its ClusterIP virtual server lists them all."""
    out = render(capsys, node)
    lb_vs = next(l.split()[2] for l in out.splitlines() if l.startswith("add KUBE-LOAD-BALANCER-LOCAL"))
    lb_ip, port = lb_vs.split(",")[0], lb_vs.split(":")[1]
    reals = [l.split()[4] for l in out.splitlines() if l.startswith(f"-a -t {lb_ip}:{port} ")]
    assert reals and all(r.startswith(subnet) for r in reals)
    assert f"add KUBE-IPVS-IPS {lb_ip}" in out


def test_topology_scheduler_reaches_the_rendered_virtual_servers(capsys, tmp_path):
    topo = (REPO / "topologies" / "demo.yaml").read_text().replace("proxyMode: iptables",
                                                                  "proxyMode: ipvs\n  ipvsScheduler: sh")
    (tmp_path / "manifests").symlink_to(REPO / "topologies" / "manifests")
    (tmp_path / "demo.yaml").write_text(topo)
    assert main(["proxy", "render", str(tmp_path / "demo.yaml"), "--node", "node-1", "--mode", "ipvs"]) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith(("-A -t ", "-A -u "))]
    assert heads and all(" -s sh" in line for line in heads)
    assert "scheduler sh" in out.splitlines()[0]
