"""Service resolution: allocations (ClusterIP, nodePort, LoadBalancer IP), endpoints from
selectors and hand-written EndpointSlices, traffic-policy flags, warnings and errors."""
from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml

from netsim.errors import TopologyError
from netsim.plan.lab import plan_lab
from netsim.proxy.model import Endpoint
from netsim.proxy.services import Resolution, resolve
from netsim.topology import load, load_text
from netsim.topology.model import ServicePort as ManifestPort

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "topologies" / "demo.yaml"


# -- builders -------------------------------------------------------------------------

def service(name: str, ports=None, selector=None, namespace: str | None = None, **spec) -> dict:
    meta = {"name": name} | ({"namespace": namespace} if namespace else {})
    body = {"ports": ports if ports is not None else [{"port": 80, "targetPort": 8080}], **spec}
    if selector is not None:
        body["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def deployment(name: str, replicas: int, labels: dict, ports: list[dict], node: str | None = None,
               namespace: str | None = None) -> dict:
    meta = {"name": name} | ({"namespace": namespace} if namespace else {})
    pod = {"containers": [{"name": "c", "ports": ports}]} | ({"nodeName": node} if node else {})
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": pod}}}


def pod(name: str, labels: dict, ports: list[dict], node: str | None = None, namespace: str | None = None) -> dict:
    meta = {"name": name, "labels": labels} | ({"namespace": namespace} if namespace else {})
    spec = {"containers": [{"name": "c", "ports": ports}]} | ({"nodeName": node} if node else {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def eslice(name: str, svc: str, endpoints: list[dict], ports: list[dict], namespace: str | None = None) -> dict:
    meta = {"name": name, "labels": {"kubernetes.io/service-name": svc}} | ({"namespace": namespace} if namespace else {})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}


def lab(*objects, cluster: dict | None = None, nodes=("n1", "n2"), externals=()):
    """A small lab; without the cluster DNS unless ``cluster`` asks for it."""
    doc = {"name": "t", "cluster": {"dns": False} | (cluster or {}), "nodes": list(nodes), "externals": list(externals),
           "manifests": list(objects)}
    topo = load_text(yaml.safe_dump(doc, sort_keys=False))
    return topo, plan_lab(topo)


def with_service(topo, name: str, **changes):
    """A topology with one Service changed behind the loader's back (to reach resolve's own checks)."""
    return replace(topo, services=tuple(replace(s, **changes) if s.name == name else s for s in topo.services))


def problems(exc: pytest.ExceptionInfo) -> list[str]:
    return exc.value.lines()


WEB = deployment("web", 2, {"app": "web"}, [{"name": "http", "containerPort": 8080}])


# -- the demo -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    topo = load(DEMO)
    plan = plan_lab(topo)
    return topo, plan, resolve(topo, plan)


def test_demo_web_has_six_endpoints_on_the_named_target_port(demo):
    topo, plan, res = demo
    web = res.port("default", "web", "http", "TCP")
    pods = {p.key: p for p in plan.pods if p.labels.get("app") == "web"}
    assert len(web.endpoints) == 6
    assert {e.port for e in web.endpoints} == {8080}
    assert {e.pod for e in web.endpoints} == set(pods)
    for e in web.endpoints:
        assert (e.ip, e.node) == (pods[e.pod].ip, pods[e.pod].node)
        assert (e.ready, e.serving, e.terminating) == (True, True, False)
    assert web.port == 80 and web.node_port is None and web.spn == "default/web:http"
    assert [e.address for e in web.endpoints] == sorted(e.address for e in web.endpoints)


def test_demo_echo_tcp_and_udp_resolve_their_own_named_ports(demo):
    _, plan, res = demo
    echo_pods = {p.ip for p in plan.pods if p.labels.get("app") == "echo"}
    tcp = res.port("default", "echo", "tcp", "TCP")
    udp = res.port("default", "echo", "udp", "UDP")
    for p in (tcp, udp):
        assert {e.ip for e in p.endpoints} == echo_pods and len(p.endpoints) == 4
        assert {e.port for e in p.endpoints} == {5000}
    assert tcp.cluster_ip == udp.cluster_ip


def test_demo_nodeport_and_summary(demo):
    topo, _, res = demo
    np = res.port("default", "web-nodeport", "http", "TCP")
    assert np.node_port == 30080 and np.externally_accessible
    lb_port = res.node_ports[("default/web-lb", "http", "TCP")]              # allocated, dynamic band
    assert res.node_ports == {("default/web-nodeport", "http", "TCP"): 30080, ("default/web-lb", "http", "TCP"): lb_port}
    assert 30086 <= lb_port <= 32767
    assert [(p.name, p.port_name, p.protocol) for p in res.ports] == [
        ("echo", "tcp", "TCP"), ("echo", "udp", "UDP"), ("web", "http", "TCP"), ("web-lb", "http", "TCP"),
        ("web-nodeport", "http", "TCP"),
        ("kube-dns", "dns", "UDP"), ("kube-dns", "dns-tcp", "TCP"), ("kube-dns", "metrics", "TCP")]
    # MetalLB style: the first usable address of the pool (not its network address).
    assert res.lb_ips == {"default/web-lb": "192.168.100.241"} and res.warnings == ()
    assert res.port("default", "web-lb", "http", "TCP").external_policy_local
    cidr = topo.cluster.service_cidr
    ips = dict(res.cluster_ips)
    assert ips.pop("kube-system/kube-dns") == "10.96.0.10"                  # the cluster DNS
    for ip in ips.values():
        assert IPv4Address(ip) in cidr
        assert int(IPv4Address(ip)) - int(cidr.network_address) > 256      # dynamic band
    assert len(set(ips.values())) == 4


def test_resolve_is_deterministic(demo):
    topo, plan, res = demo
    assert resolve(topo, plan) == res
    assert resolve(load(DEMO), plan_lab(load(DEMO))) == res


# -- ClusterIPs -----------------------------------------------------------------------

def test_allocations_are_stable_when_a_service_is_added():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}, type="NodePort"),
                     service("b", selector={"app": "web"}, type="LoadBalancer"),
                     cluster={"loadBalancerPool": ["192.168.100.240/29"]})
    first = resolve(topo, plan)
    # Pretend the cluster had handed out other values (Kubernetes allocates randomly):
    prev = replace(first, cluster_ips={"default/a": "10.96.50.50", "default/b": "10.100.0.7"},
                   node_ports={("default/a", "", "TCP"): 31111, ("default/b", "", "TCP"): 30005},
                   lb_ips={"default/b": "192.168.100.245"})
    topo2, plan2 = lab(WEB, service("a", selector={"app": "web"}, type="NodePort"),
                       service("b", selector={"app": "web"}, type="LoadBalancer"),
                       service("aa", selector={"app": "web"}, type="LoadBalancer"),
                       cluster={"loadBalancerPool": ["192.168.100.240/29"]})
    second = resolve(topo2, plan2, previous=prev)
    assert second.cluster_ips["default/a"] == "10.96.50.50"
    assert second.cluster_ips["default/b"] == "10.100.0.7"
    assert second.node_ports[("default/a", "", "TCP")] == 31111
    assert second.node_ports[("default/b", "", "TCP")] == 30005
    assert second.lb_ips == {"default/aa": "192.168.100.241", "default/b": "192.168.100.245"}
    assert second.port("default", "b").load_balancer_ips == ("192.168.100.245",)
    # And without previous=, the hash-derived values come back for the old Services.
    third = resolve(topo2, plan2, previous=first)
    for key in ("default/a", "default/b"):
        assert third.cluster_ips[key] == first.cluster_ips[key]


def test_previous_allocation_beats_a_new_explicit_claim():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}))
    first = resolve(topo, plan)
    taken = first.cluster_ips["default/a"]
    topo2, plan2 = lab(WEB, service("a", selector={"app": "web"}),
                       service("b", selector={"app": "web"}, clusterIP=taken))
    with pytest.raises(TopologyError) as exc:
        resolve(topo2, plan2, previous=first)
    assert problems(exc) == [f"manifests[2] Service b: spec.clusterIP: {taken} is already allocated to "
                             f"Service default/a (hint: leave clusterIP unset to have a free one allocated)"]
    # Without the history, the explicit claim wins and a moves elsewhere.
    res = resolve(topo2, plan2)
    assert res.cluster_ips["default/b"] == taken and res.cluster_ips["default/a"] != taken


def test_removed_service_releases_its_address():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}))
    first = resolve(topo, plan)
    topo2, plan2 = lab(WEB, service("b", selector={"app": "web"}, clusterIP=first.cluster_ips["default/a"]))
    res = resolve(topo2, plan2, previous=first)
    assert res.cluster_ips == {"default/b": first.cluster_ips["default/a"]}


def test_explicit_cluster_ip_is_honoured_and_kept():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}, clusterIP="10.96.0.10"))
    res = resolve(topo, plan)
    assert res.cluster_ips == {"default/a": "10.96.0.10"}          # kube-dns asks for it: allowed
    assert res.port("default", "a").cluster_ip == "10.96.0.10"


def test_first_and_tenth_hosts_are_never_allocated():
    # /28: 14 usable addresses, no static band; .1 and .10 are reserved, 12 remain.
    svcs = [service(f"s{i:02d}", selector={"app": "web"}) for i in range(12)]
    topo, plan = lab(WEB, *svcs, cluster={"serviceCIDR": "10.96.0.0/28"})
    res = resolve(topo, plan)
    got = sorted(res.cluster_ips.values(), key=IPv4Address)
    assert got == [f"10.96.0.{i}" for i in (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)]
    # One more and the range is exhausted.
    topo, plan = lab(WEB, *svcs, service("s12", selector={"app": "web"}), cluster={"serviceCIDR": "10.96.0.0/28"})
    with pytest.raises(TopologyError) as exc:
        resolve(topo, plan)
    assert len(exc.value.problems) == 1
    assert "serviceCIDR 10.96.0.0/28 is exhausted" in problems(exc)[0]
    assert problems(exc)[0].startswith("manifests[")


def test_dynamic_band_first_then_static_band():
    # /27: 30 usable, static band 16 (.1-.16), dynamic .17-.30 (14 addresses).
    svcs = [service(f"s{i:02d}", selector={"app": "web"}) for i in range(16)]
    topo, plan = lab(WEB, *svcs[:14], cluster={"serviceCIDR": "10.96.0.0/27"})
    res = resolve(topo, plan)
    assert sorted(int(IPv4Address(ip)) & 0xff for ip in res.cluster_ips.values()) == list(range(17, 31))
    topo, plan = lab(WEB, *svcs, cluster={"serviceCIDR": "10.96.0.0/27"})
    res = resolve(topo, plan)
    assert sorted(int(IPv4Address(ip)) & 0xff for ip in res.cluster_ips.values()) == [2, 3] + list(range(17, 31))


def test_kubernetes_service_gets_the_first_host():
    topo, plan = lab(service("kubernetes", ports=[{"name": "https", "port": 443, "targetPort": 6443}]),
                     service("other", selector={"app": "x"}))
    res = resolve(topo, plan)
    assert res.cluster_ips["default/kubernetes"] == "10.96.0.1"
    assert res.cluster_ips["default/other"] != "10.96.0.1"


def test_explicit_cluster_ip_refusals_are_reported_together():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}, clusterIP="10.96.0.1"),
                     service("b", selector={"app": "web"}, clusterIP="10.100.0.5"),
                     service("c", selector={"app": "web"}),
                     service("d", selector={"app": "web"}))
    topo = with_service(topo, "c", cluster_ip="10.100.0.5")                 # duplicate of b
    topo = with_service(topo, "d", cluster_ip="10.111.255.255")             # broadcast of 10.96.0.0/12
    with pytest.raises(TopologyError) as exc:
        resolve(topo, plan)
    assert problems(exc) == [
        "manifests[1] Service a: spec.clusterIP: 10.96.0.1 is reserved for the kubernetes Service "
        "(default/kubernetes) (hint: leave clusterIP unset to have a free one allocated)",
        "manifests[3] Service c: spec.clusterIP: 10.100.0.5 is already allocated to Service default/b "
        "(hint: leave clusterIP unset to have a free one allocated)",
        "manifests[4] Service d: spec.clusterIP: 10.111.255.255 is not a usable address of serviceCIDR "
        "10.96.0.0/12 (network or broadcast address) (hint: leave clusterIP unset to have a free one allocated)",
    ]
    assert "nothing was created" in str(exc.value)


def test_explicit_cluster_ip_outside_service_cidr():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}))
    with pytest.raises(TopologyError) as exc:
        resolve(with_service(topo, "a", cluster_ip="10.95.0.1"), plan)
    assert problems(exc) == ["manifests[1] Service a: spec.clusterIP: 10.95.0.1 is not inside serviceCIDR "
                             "10.96.0.0/12 (hint: pick an address in serviceCIDR, or leave clusterIP unset "
                             "to have one allocated)"]


def test_headless_and_external_name_are_not_programmed():
    topo, plan = lab(WEB, service("headless", selector={"app": "web"}, clusterIP="None"),
                     service("alias", ports=[], type="ExternalName", externalName="example.com"),
                     service("web", selector={"app": "web"}))
    res = resolve(topo, plan)
    assert [p.name for p in res.ports] == ["web"]
    assert set(res.cluster_ips) == {"default/web"}
    assert res.service("default", "headless") == ()


def test_headless_nodeport_is_refused():
    topo, plan = lab(WEB, service("h", selector={"app": "web"}, clusterIP="None", type="NodePort"))
    with pytest.raises(TopologyError) as exc:
        resolve(topo, plan)
    assert "Service h: spec.clusterIP: may not be None (headless) for NodePort services" in problems(exc)[0]


# -- nodePorts ------------------------------------------------------------------------

def test_node_ports_are_allocated_in_the_dynamic_band_and_honour_explicit_ones():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}, type="NodePort"),
                     service("b", selector={"app": "web"}, type="NodePort",
                             ports=[{"name": "x", "port": 80, "targetPort": 8080, "nodePort": 30001},
                                    {"name": "y", "port": 81, "targetPort": 8080}]),
                     service("c", selector={"app": "web"}, type="ClusterIP"))
    res = resolve(topo, plan)
    assert res.node_ports[("default/b", "x", "TCP")] == 30001
    for key in (("default/a", "", "TCP"), ("default/b", "y", "TCP")):
        assert 30086 <= res.node_ports[key] <= 32767
    assert len(set(res.node_ports.values())) == 3
    assert res.port("default", "c").node_port is None
    assert res.port("default", "b", "y").node_port == res.node_ports[("default/b", "y", "TCP")]


def test_tcp_and_udp_of_one_port_share_the_node_port():
    topo, plan = lab(service("dns", selector={"app": "dns"}, type="NodePort",
                             ports=[{"name": "dns-tcp", "port": 53, "targetPort": 53, "protocol": "TCP"},
                                    {"name": "dns-udp", "port": 53, "targetPort": 53, "protocol": "UDP"},
                                    {"name": "metrics", "port": 9153, "targetPort": 9153}]))
    res = resolve(topo, plan)
    tcp, udp, metrics = (res.node_ports[("default/dns", n, p)]
                         for n, p in (("dns-tcp", "TCP"), ("dns-udp", "UDP"), ("metrics", "TCP")))
    assert tcp == udp != metrics


def test_node_port_taken_by_a_previous_allocation():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}, type="NodePort"))
    first = resolve(topo, plan)
    np = first.node_ports[("default/a", "", "TCP")]
    topo2, plan2 = lab(WEB, service("a", selector={"app": "web"}, type="NodePort"),
                       service("b", selector={"app": "web"}, type="NodePort",
                               ports=[{"port": 80, "targetPort": 8080, "nodePort": np}]))
    with pytest.raises(TopologyError) as exc:
        resolve(topo2, plan2, previous=first)
    assert problems(exc) == [f"manifests[2] Service b: spec.ports[0].nodePort: {np}/TCP is already used by "
                             f"Service default/a (hint: each nodePort can be allocated once; leave nodePort "
                             f"unset to have one allocated)"]
    # The same number for UDP is fine (uniqueness is per port and protocol).
    topo3, plan3 = lab(WEB, service("a", selector={"app": "web"}, type="NodePort"),
                       service("b", selector={"app": "web"}, type="NodePort",
                               ports=[{"port": 80, "targetPort": 8080, "nodePort": np, "protocol": "UDP"}]))
    assert resolve(topo3, plan3, previous=first).node_ports[("default/b", "", "UDP")] == np


def test_node_port_outside_range_and_exhaustion():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}, type="NodePort"))
    bad = with_service(topo, "a", ports=(ManifestPort(80, 8080, node_port=8080),))
    with pytest.raises(TopologyError) as exc:
        resolve(bad, plan)
    assert "spec.ports[0].nodePort: 8080 is outside the node port range 30000-32767" in problems(exc)[0]
    # Every port of the range taken explicitly, one more wanted.
    ports = tuple(ManifestPort(i + 1, 8080, name=f"p{i}", node_port=30000 + i) for i in range(2768))
    full = with_service(topo, "a", ports=ports + (ManifestPort(9999, 8080, name="extra"),))
    with pytest.raises(TopologyError) as exc:
        resolve(full, plan)
    assert problems(exc) == ["manifests[1] Service a: spec.ports[2768].nodePort: the node port range "
                             "30000-32767 is exhausted: no free TCP port left (hint: use fewer "
                             "NodePort/LoadBalancer Services)"]


def test_node_ports_fall_back_to_the_static_band():
    topo, plan = lab(WEB, service("a", selector={"app": "web"}, type="NodePort"))
    ports = tuple(ManifestPort(i + 1, 8080, name=f"p{i}", node_port=30086 + i) for i in range(32768 - 30086))
    full = with_service(topo, "a", ports=ports + (ManifestPort(9999, 8080, name="extra"),))
    assert resolve(full, plan).node_ports[("default/a", "extra", "TCP")] == 30000


# -- LoadBalancer IPs -----------------------------------------------------------------

def lb(name: str, **spec) -> dict:
    return service(name, selector={"app": "web"}, type="LoadBalancer", **spec)


def test_lb_ips_first_free_in_service_order_and_explicit_first():
    topo, plan = lab(WEB, lb("zeta"), lb("alpha"), lb("mid", loadBalancerIP="192.168.100.241"),
                     cluster={"loadBalancerPool": ["192.168.100.240/29"]})
    res = resolve(topo, plan)
    assert res.lb_ips == {"default/alpha": "192.168.100.242", "default/mid": "192.168.100.241",
                          "default/zeta": "192.168.100.243"}
    alpha = res.port("default", "alpha")
    assert alpha.load_balancer_ips == ("192.168.100.242",)
    assert alpha.node_port is not None and alpha.externally_accessible   # LB Services get nodePorts too


def test_lb_pool_skips_node_and_external_addresses():
    topo, plan = lab(WEB, lb("a"), lb("b"), cluster={"loadBalancerPool": ["192.168.100.240/29"]},
                     nodes=({"name": "n1", "address": "192.168.100.241"}, "n2"),
                     externals=({"name": "ext", "address": "192.168.100.242"},))
    assert resolve(topo, plan).lb_ips == {"default/a": "192.168.100.243", "default/b": "192.168.100.244"}


def test_lb_pool_small_networks_use_every_address():
    topo, plan = lab(WEB, lb("a"), lb("b"), lb("c"),
                     cluster={"loadBalancerPool": ["192.168.100.250/31", "192.168.100.252/32"]})
    assert resolve(topo, plan).lb_ips == {"default/a": "192.168.100.250", "default/b": "192.168.100.251",
                                          "default/c": "192.168.100.252"}


def test_lb_pool_exhausted():
    topo, plan = lab(WEB, lb("a"), lb("b"), lb("c"), cluster={"loadBalancerPool": ["192.168.100.240/30"]})
    with pytest.raises(TopologyError) as exc:
        resolve(topo, plan)
    assert problems(exc) == ["manifests[3] Service c: spec.type: cluster.loadBalancerPool (192.168.100.240/30) "
                             "is exhausted: no address left for Service default/c (hint: add addresses to "
                             "cluster.loadBalancerPool, or use fewer LoadBalancer Services)"]


def test_lb_explicit_ip_refusals():
    topo, plan = lab(WEB, lb("a", loadBalancerIP="192.168.100.10"),
                     lb("b", loadBalancerIP="192.168.100.242"), lb("c", loadBalancerIP="192.168.100.242"),
                     lb("d", loadBalancerIP="192.168.100.240"), lb("e", loadBalancerIP="192.168.100.241"),
                     cluster={"loadBalancerPool": ["192.168.100.240/29"]},
                     nodes=({"name": "n1", "address": "192.168.100.241"},))
    with pytest.raises(TopologyError) as exc:
        resolve(topo, plan)
    lines = problems(exc)
    assert len(lines) == 4
    assert lines[0].startswith("manifests[1] Service a: spec.loadBalancerIP: 192.168.100.10 is not in "
                               "cluster.loadBalancerPool (192.168.100.240/29)")
    assert lines[1].startswith("manifests[3] Service c: spec.loadBalancerIP: 192.168.100.242 is already "
                               "assigned to Service default/b")
    assert lines[2].startswith("manifests[4] Service d: spec.loadBalancerIP: 192.168.100.240 is the network "
                               "or broadcast address")
    assert lines[3].startswith("manifests[5] Service e: spec.loadBalancerIP: 192.168.100.241 is the address "
                               "of node n1")


def test_lb_without_pool_stays_pending():
    topo, plan = lab(WEB, lb("a"))
    res = resolve(topo, plan)
    port = res.port("default", "a")
    assert port.load_balancer_ips == () and port.node_port is not None
    assert res.lb_ips == {}
    assert len(res.warnings) == 1
    assert res.warnings[0].path == "manifests[1] Service a: spec.type"
    assert "stays pending" in res.warnings[0].message


# -- endpoints from selectors -----------------------------------------------------------

def test_named_target_port_is_looked_up_per_pod_and_protocol():
    topo, plan = lab(
        deployment("v1", 2, {"app": "x", "v": "1"}, [{"name": "http", "containerPort": 8080}]),
        deployment("v2", 1, {"app": "x", "v": "2"}, [{"name": "http", "containerPort": 9090}]),
        deployment("v3", 1, {"app": "x", "v": "3"}, [{"name": "other", "containerPort": 7070}]),
        deployment("dns", 1, {"app": "x", "v": "4"}, [{"name": "http", "containerPort": 8080, "protocol": "UDP"}]),
        service("x", selector={"app": "x"}, ports=[{"name": "web", "port": 80, "targetPort": "http"},
                                                   {"name": "raw", "port": 81, "targetPort": 6000}]))
    res = resolve(topo, plan)
    ips = {p.labels["v"]: set() for p in plan.pods}
    for p in plan.pods:
        ips[p.labels["v"]].add(p.ip)
    web = res.port("default", "x", "web")
    assert {(e.ip, e.port) for e in web.endpoints} == (
        {(ip, 8080) for ip in ips["1"]} | {(ip, 9090) for ip in ips["2"]})
    # An integer targetPort is used as is, whatever the pod declares.
    raw = res.port("default", "x", "raw")
    assert {e.port for e in raw.endpoints} == {6000} and len(raw.endpoints) == 5
    assert res.warnings == ()


def test_named_target_port_nobody_declares_warns():
    topo, plan = lab(deployment("d", 1, {"app": "dns"}, [{"name": "dns", "containerPort": 53, "protocol": "TCP"}]),
                     service("dns", selector={"app": "dns"},
                             ports=[{"name": "udp", "port": 53, "targetPort": "dns", "protocol": "UDP"},
                                    {"name": "tcp", "port": 53, "targetPort": "dns", "protocol": "TCP"}]))
    res = resolve(topo, plan)
    assert res.port("default", "dns", "udp", "UDP").endpoints == ()
    assert len(res.port("default", "dns", "tcp", "TCP").endpoints) == 1
    assert [(w.path, w.message) for w in res.warnings] == [
        ("manifests[1] Service dns: spec.ports[0].targetPort",
         "no pod selected by the Service declares a UDP port named 'dns'")]


def test_selector_matching_no_pod_warns_and_namespaces_are_separate():
    topo, plan = lab(deployment("web", 2, {"app": "web"}, [{"containerPort": 8080}], namespace="other"),
                     service("web", selector={"app": "web"}))
    res = resolve(topo, plan)
    assert res.port("default", "web").endpoints == ()
    assert [(w.path, w.message) for w in res.warnings] == [
        ("manifests[1] Service web: spec.selector", "app=web matches no pod in namespace default")]


def test_selector_needs_every_label():
    topo, plan = lab(pod("a", {"app": "web", "tier": "fe"}, [{"containerPort": 8080}]),
                     pod("b", {"app": "web"}, [{"containerPort": 8080}]),
                     service("fe", selector={"app": "web", "tier": "fe"}))
    res = resolve(topo, plan)
    assert [e.pod for e in res.port("default", "fe").endpoints] == ["default/a"]


# -- endpoints from hand-written EndpointSlices ---------------------------------------

def test_selectorless_service_uses_its_slices():
    topo, plan = lab(
        service("ext", ports=[{"name": "http", "port": 80, "targetPort": 8080},
                              {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"}]),
        eslice("ext-1", "ext", [
            {"addresses": ["10.180.2.1", "10.180.99.99"], "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "p1"}},
            {"addresses": ["10.180.10.1"], "conditions": {"ready": False, "serving": True, "terminating": True},
             "nodeName": "n2"},
            {"addresses": ["10.180.3.1"], "conditions": {"ready": False, "serving": False, "terminating": True}},
            {"addresses": ["10.180.4.1"], "conditions": {"ready": False}},
        ], [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        eslice("ext-2", "ext", [{"addresses": ["10.180.2.1"], "conditions": {"ready": False}},
                                {"addresses": ["10.180.1.1"]}],
               [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "TCP"}]))
    res = resolve(topo, plan)
    http = res.port("default", "ext", "http")
    assert [e.address for e in http.endpoints] == [
        "10.180.1.1:8080", "10.180.10.1:8080", "10.180.2.1:8080", "10.180.3.1:8080", "10.180.4.1:8080"]
    by = {e.ip: e for e in http.endpoints}
    # Only addresses[0]; the duplicate 10.180.2.1 from ext-2 (not ready) is collapsed, first slice wins.
    assert by["10.180.2.1"] == Endpoint("10.180.2.1", 8080, "n1", True, True, False, "default/p1")
    assert "10.180.99.99" not in by
    assert (by["10.180.10.1"].ready, by["10.180.10.1"].serving, by["10.180.10.1"].terminating) == (False, True, True)
    assert by["10.180.10.1"].node == "n2"
    assert (by["10.180.3.1"].serving, by["10.180.3.1"].terminating) == (False, True)
    assert by["10.180.1.1"].node is None and by["10.180.1.1"].pod is None
    # dns is matched by name and protocol: ext-2's dns/TCP port is not dns/UDP.
    dns = res.port("default", "ext", "dns", "UDP")
    assert {e.address for e in dns.endpoints} == {"10.180.2.1:5353", "10.180.10.1:5353", "10.180.3.1:5353",
                                                  "10.180.4.1:5353"}
    assert [(w.path, w.message.split(":")[0]) for w in res.warnings] == [
        ("manifests[2] EndpointSlice ext-2: ports[1]", "port dns/TCP matches no port of Service default/ext (dns/UDP, http/TCP)")]


def test_unnamed_port_matches_unnamed_slice_port():
    topo, plan = lab(service("one", ports=[{"port": 80, "targetPort": 80}]),
                     eslice("one-x", "one", [{"addresses": ["10.1.0.1"]}], [{"port": 8443}]))
    res = resolve(topo, plan)
    assert [e.address for e in res.port("default", "one").endpoints] == ["10.1.0.1:8443"]
    assert res.warnings == ()


def test_selector_and_slice_are_merged_with_a_warning():
    topo, plan = lab(pod("p", {"app": "web"}, [{"name": "http", "containerPort": 8080}], node="n1"),
                     service("web", selector={"app": "web"}, ports=[{"name": "http", "port": 80, "targetPort": "http"}]),
                     eslice("web-manual", "web", [{"addresses": ["10.180.0.5"]}], [{"name": "http", "port": 8080}]))
    res = resolve(topo, plan)
    assert {e.ip for e in res.port("default", "web", "http").endpoints} == {plan.pods[0].ip, "10.180.0.5"}
    assert [w.path for w in res.warnings] == ["manifests[2] EndpointSlice web-manual"]
    assert "merges this hand-written slice" in res.warnings[0].message


def test_slice_warnings_for_missing_service_and_no_endpoints():
    topo, plan = lab(service("lonely"), eslice("orphan", "nobody", [{"addresses": ["10.1.0.1"]}], [{"port": 80}]))
    res = resolve(topo, plan)
    assert [(w.path, w.message) for w in res.warnings] == [
        ("manifests[0] Service lonely: spec",
         "the Service has no selector and no EndpointSlice names it, so it has no endpoints"),
        ("manifests[1] EndpointSlice orphan: metadata.labels",
         "no Service default/nobody in this topology: the slice is not used"),
    ]


def test_slices_of_another_namespace_are_ignored():
    topo, plan = lab(service("s", ports=[{"port": 80}]),
                     eslice("s-1", "s", [{"addresses": ["10.1.0.1"]}], [{"port": 80}], namespace="other"))
    assert resolve(topo, plan).port("default", "s").endpoints == ()


# -- policies, affinity, ranges -------------------------------------------------------

def test_traffic_policies_affinity_and_source_ranges():
    topo, plan = lab(
        WEB,
        lb("lb", externalTrafficPolicy="Local", internalTrafficPolicy="Local", sessionAffinity="ClientIP",
           sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
           loadBalancerSourceRanges=["203.0.113.0/24", "198.51.100.0/24"], externalIPs=["192.168.100.50"]),
        lb("open", loadBalancerSourceRanges=["10.0.0.0/8", "0.0.0.0/0"]),
        service("plain", selector={"app": "web"}, sessionAffinity="ClientIP"),
        cluster={"loadBalancerPool": ["192.168.100.240/29"]})
    res = resolve(topo, plan)
    port = res.port("default", "lb")
    assert port.external_policy_local and port.internal_policy_local
    assert port.affinity_timeout == 60
    assert port.load_balancer_source_ranges == ("203.0.113.0/24", "198.51.100.0/24")
    assert port.external_ips == ("192.168.100.50",)
    assert res.port("default", "open").load_balancer_source_ranges == ()
    plain = res.port("default", "plain")
    assert plain.affinity_timeout == 10800
    assert not plain.external_policy_local and not plain.internal_policy_local
    assert res.port("default", "open").affinity_timeout is None


def test_external_policy_local_needs_external_access():
    topo, plan = lab(WEB, service("c", selector={"app": "web"}), service("x", selector={"app": "web"}))
    # The loader refuses eTP on ClusterIP Services; set it behind its back.
    topo = with_service(topo, "c", external_traffic_policy="Local")
    topo = with_service(topo, "x", external_traffic_policy="Local",
                        external_ips=(IPv4Address("192.168.100.60"),))
    res = resolve(topo, plan)
    assert not res.port("default", "c").external_policy_local
    assert res.port("default", "x").external_policy_local


def test_empty_selector_means_no_selector():
    topo, plan = lab(WEB, service("s", selector={}))
    res = resolve(topo, plan)
    assert res.port("default", "s").endpoints == ()


# -- persistence ----------------------------------------------------------------------

def test_round_trip_through_json(demo):
    topo, plan, res = demo
    data = json.loads(json.dumps(res.to_dict()))
    back = Resolution.from_dict(data)
    assert back == res
    assert resolve(topo, plan, previous=back) == res


def test_ports_are_sorted_by_namespace_name_port_and_protocol():
    topo, plan = lab(WEB,
                     service("b", selector={"app": "web"}, ports=[{"name": "z", "port": 1, "targetPort": 1},
                                                                   {"name": "a", "port": 2, "targetPort": 2}]),
                     service("a", selector={"app": "web"}, namespace="zz"),
                     service("a", selector={"app": "web"}))
    res = resolve(topo, plan)
    assert [(p.namespace, p.name, p.port_name) for p in res.ports] == [
        ("default", "a", ""), ("default", "b", "a"), ("default", "b", "z"), ("zz", "a", "")]
