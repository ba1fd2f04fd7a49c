"""The topology's verify: section: accepted forms, every problem with its path and a hint,
and how a probe result is judged against an expectation (no root)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from netsim.errors import TopologyError
from netsim.probes.probe import ProbeResult
from netsim.probes.targets import resolve_source
from netsim.probes.verify import Expectation, default_matrix, from_tests, judge
from netsim.topology import load_text

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "topologies" / "demo.yaml"


def demo_with(verify) -> str:
    data = yaml.safe_load(DEMO.read_text())
    data["verify"] = verify
    return yaml.safe_dump(data, sort_keys=False)


def problems(verify) -> list[str]:
    with pytest.raises(TopologyError) as info:
        load_text(demo_with(verify), base_dir=DEMO.parent, source="t.yaml")
    return info.value.lines()


def test_a_full_test_loads():
    topo = load_text(demo_with({"web": {"from": "client", "to": "web", "proto": "tcp", "port": "http",
                                        "source": "client", "backend": ["web-*"], "nat": "dnat",
                                        "description": "ClusterIP"},
                                "vip-ping": {"from": "client", "to": "web", "proto": "icmp", "expect": "fail"}}),
                     base_dir=DEMO.parent)
    web, ping = topo.verify
    assert (web.name, web.source, web.target, web.port, web.backend, web.nat) == (
        "web", "client", "web", "http", ("web-*",), "dnat")
    assert ping.expect == "fail"
    cases = from_tests(topo.verify)
    assert cases[0].expect.backends == ("web-*",) and not cases[1].expect.reach


def test_every_problem_has_its_path_and_a_hint():
    got = problems({"t1": {"from": "clinet", "to": "wbe", "expct": "fail", "nat": "dant",
                           "source": "nod", "port": 70000},
                    "t2": {"from": "client", "to": "web", "expect": "fail", "backend": ["web-*"]},
                    "t3": "client to web"})
    assert got == [
        "verify.t1.expct: unknown field (hint: did you mean 'expect'?)",
        "verify.t1.from: 'clinet' is no pod, node or external of this topology (hint: did you mean 'client'?)",
        "verify.t1.to: 'wbe' is no pod, Service, node or external of this topology (hint: did you mean 'web'?)",
        "verify.t1.port: must be a port number 1–65535 or a port name, got 70000",
        "verify.t1.source: 'nod' is not client, not-client, node, a node's name or an IP (hint: did you mean 'node'?)",
        "verify.t1.nat: must be one of none, dnat, snat, both; got 'dant' (hint: did you mean 'dnat'?)",
        "verify.t2.backend: cannot be checked on a probe expected to fail (hint: remove it, or expect: reach)",
        "verify.t3: must be a mapping, got a string",
    ]


def test_required_fields_and_target_forms():
    assert problems({"t": {"description": "x"}}) == ["verify.t.from: is required", "verify.t.to: is required"]
    assert problems({"t": {"from": "client", "to": "web:http"}}) == [
        "verify.t.to: 'web:http': the part after ':' must be a port number (hint: or give the port with port:)"]
    topo = load_text(demo_with({"t": {"from": "ext-client", "to": "192.168.100.2:30080"},
                                "u": {"from": "node-1", "to": "svc/default/web"}}), base_dir=DEMO.parent)
    assert [t.target for t in topo.verify] == ["192.168.100.2:30080", "svc/default/web"]


def result(**kw) -> ProbeResult:
    base = dict(source="default/client", source_ip="10.244.1.2", target="t", kind="clusterip",
                address="10.96.0.20:80", proto="tcp", reached=True, verdict="SYN-ACK",
                backend="default/web-a", backend_ip="10.244.2.2", seen="10.244.1.2:40000", dnat=True, snat=False)
    base.update(kw)
    return ProbeResult(**base)


def test_judge_source_backend_nat_and_failure(demo):
    plan, _ = demo
    src = resolve_source("client", plan)
    assert judge(Expectation(backends=("web-*",), source="client", nat="dnat"), result(), src, plan) == []
    assert judge(Expectation(source="node"), result(), src, plan) == [
        "source seen 10.244.1.2, expected a node address (SNAT)"]
    snat = result(seen="10.244.1.0:1234", snat=True)          # node-1's flannel.1 address
    assert judge(Expectation(source="node-1", nat="both"), snat, src, plan) == []
    assert judge(Expectation(source="node-2"), snat, src, plan) == ["source seen 10.244.1.0, expected node-2"]
    assert judge(Expectation(backends=("echo-*",)), result(), src, plan) == [
        "backend default/web-a is not one of echo-*"]
    assert judge(Expectation(reach=False), result(reached=False, verdict="ICMP port unreachable"), src, plan) == []
    assert judge(Expectation(reach=False), result(), src, plan) == ["expected no answer, but default/web-a answered"]
    assert judge(Expectation(), result(reached=False, verdict="no answer"), src, plan) == ["not reached: no answer"]
    hairpin = result(backend="default/client", seen="10.244.1.1:999", snat=True)
    assert judge(Expectation(source="client", hairpin_source="10.244.1.1"), hairpin, src, plan) == []


def test_default_matrix_covers_every_access_path(demo):
    plan, res = demo
    cases = default_matrix(plan, res)
    cluster = [c for c in cases if c.name.startswith("pod→ClusterIP")]
    from netsim.dns.objects import is_dns_port
    probed = [p for p in res.ports if not is_dns_port(p)]      # dnsmasq's port 53 cannot name its backend
    assert len(probed) == len(res.ports) - 2
    assert len(cluster) == len(plan.pods) * len(probed)
    nodeport = [c for c in cases if "NodePort" in c.name]
    assert len(nodeport) == len(plan.nodes) * sum(1 for p in res.ports if p.node_port)
    local = [c for c in nodeport if "eTP=Local" in c.name]
    assert all(c.expect.source == "client" for c in local if c.expect.reach)
    cluster_np = [c for c in nodeport if "eTP=Cluster" in c.name]
    assert {c.expect.source for c in cluster_np} == {n.name for n in plan.nodes}
    assert sum("LoadBalancer" in c.name for c in cases) == sum(len(p.load_balancer_ips) for p in res.ports)


def test_a_dns_name_target_is_checked_when_verify_runs():
    topo = load_text(demo_with({"by-name": {"from": "client", "to": "dns:web:80"},
                                "by-fqdn": {"from": "client", "to": "web.default.svc.cluster.local"}}),
                     base_dir=DEMO.parent)
    assert [t.target for t in topo.verify] == ["dns:web:80", "web.default.svc.cluster.local"]
    lines = problems({"empty": {"from": "client", "to": "dns:"}, "port": {"from": "client", "to": "dns:web:http"}})
    assert any("verify.empty.to" in l and "'dns:' needs a name" in l for l in lines)
    assert any("verify.port.to" in l and "must be a port number" in l for l in lines)
