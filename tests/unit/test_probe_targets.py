"""FROM/TARGET parsing against the demo's plan and Service resolution (no root)."""
from __future__ import annotations


import pytest

from netsim.probes.targets import ProbeError, resolve_source, resolve_target



def web_pods(plan):
    return {p.key for p in plan.pods if p.labels.get("app") == "web"}


def test_sources_by_name_key_and_ip(demo):
    plan, _ = demo
    client = resolve_source("client", plan)
    assert (client.kind, client.name, client.node) == ("pod", "default/client", "node-1")
    assert resolve_source("default/client", plan) == client
    assert resolve_source(client.ip, plan) == client
    node = resolve_source("node-2", plan)
    assert (node.kind, node.ip) == ("node", plan.node("node-2").address)
    assert resolve_source("ext-client", plan).kind == "external"
    with pytest.raises(ProbeError, match="no pod, node or external named 'nobody'"):
        resolve_source("nobody", plan)


def test_service_by_name_is_its_clusterip_with_every_ready_endpoint(demo):
    plan, res = demo
    t = resolve_target("web", plan, res)
    sp = res.port("default", "web", "http")
    assert (t.kind, t.ip, t.port, t.proto) == ("clusterip", sp.cluster_ip, 80, "tcp")
    assert set(t.backends) == web_pods(plan)
    assert resolve_target("svc/default/web", plan, res) == t
    assert resolve_target(f"{sp.cluster_ip}:80", plan, res) == t


def test_service_port_chosen_by_protocol_or_name(demo):
    plan, res = demo
    udp = resolve_target("echo", plan, res, proto="udp")
    assert (udp.proto, udp.port, udp.port_name) == ("udp", 5000, "udp")
    assert resolve_target("echo", plan, res, port="udp").proto == "udp"
    assert resolve_target("echo", plan, res).proto == "tcp"          # TCP first when unspecified
    with pytest.raises(ProbeError, match="has no port 81"):
        resolve_target("web", plan, res, port=81)


def test_nodeport_by_ip_or_node_name_has_local_backends(demo):
    plan, res = demo
    lb = res.port("default", "web-lb", "http")
    node = plan.node("node-3")
    t = resolve_target(f"node-3:{lb.node_port}", plan, res)
    assert (t.kind, t.ip, t.port, t.node, t.external_policy_local) == ("nodeport", node.address, lb.node_port, "node-3", True)
    local = {p.key for p in plan.pods if p.node == "node-3" and p.labels.get("app") == "web"}
    assert set(t.local_backends) == local and local
    assert resolve_target(f"{node.address}:{lb.node_port}", plan, res) == t
    with pytest.raises(ProbeError, match="no Service has nodePort 31999"):
        resolve_target(f"{node.address}:31999", plan, res)


def test_loadbalancer_ip_pod_node_and_external(demo):
    plan, res = demo
    lb = res.port("default", "web-lb", "http")
    t = resolve_target(f"{lb.load_balancer_ips[0]}:80", plan, res)
    assert (t.kind, t.service) == ("loadbalancer", "default/web-lb")
    tools = next(p for p in plan.pods if p.name == "tools")
    pt = resolve_target("tools", plan, res)
    assert (pt.kind, pt.ip, pt.port, pt.backends) == ("pod", tools.ip, 8080, ("default/tools",))
    assert resolve_target(tools.ip, plan, res) == pt
    assert resolve_target("client", plan, res).proto == "icmp"      # no declared port
    assert resolve_target("node-1", plan, res).kind == "node"
    ext = resolve_target("ext-client", plan, res)
    assert (ext.kind, ext.port, ext.proto) == ("external", 8080, "tcp")


def test_bad_targets_say_what_is_known(demo):
    plan, res = demo
    with pytest.raises(ProbeError, match="no pod, Service, node or external named 'wbe'"):
        resolve_target("wbe", plan, res)
    with pytest.raises(ProbeError, match="port number"):
        resolve_target("web:http", plan, res)
    with pytest.raises(ProbeError, match="unknown protocol"):
        resolve_target("web", plan, res, proto="sctp")
    with pytest.raises(ProbeError, match="give a port"):
        resolve_target("10.244.200.9", plan, res, proto="tcp")
    with pytest.raises(ProbeError, match="203.0.113.9 is outside lab demo: probes only go to the lab's own"):
        resolve_target("203.0.113.9:80", plan, res)               # never aimed beyond the lab
