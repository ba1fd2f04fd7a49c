"""Endpoint selection per node: kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go)
without topology hints, with ProxyTerminatingEndpoints (GA), and the health-check count.

The table mirrors upstream's TestCategorizeEndpoints (the cases without hints), plus the
spirit of TestTerminatingEndpoints* and TestInternalTrafficPolicy of the proxiers:
``None`` means "the Service does not use this kind of endpoints".
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from netsim.proxy.endpoints import (Categorized, categorize, health_check_local_count,
                                    uses_cluster_endpoints, uses_local_endpoints)
from netsim.proxy.model import Endpoint, ServicePort

NODE = "node-1"


def ep(ip: str, ready: bool = True, serving: bool | None = None, terminating: bool = False,
       local: bool = False, port: int = 80) -> Endpoint:
    return Endpoint(ip, port, NODE if local else "node-2", ready, ready if serving is None else serving,
                    terminating, None)


def svc(*endpoints: Endpoint, itp: bool = False, etp: bool = False, node_port: int | None = None,
        external_ips: tuple[str, ...] = (), lb_ips: tuple[str, ...] = ()) -> ServicePort:
    return ServicePort("ns", "svc", "p", "TCP", 80, "10.96.0.50", node_port=node_port,
                       external_ips=external_ips, load_balancer_ips=lb_ips,
                       external_policy_local=etp, internal_policy_local=itp,
                       endpoints=tuple(sorted(endpoints, key=lambda e: e.address)))


def addrs(eps) -> set[str]:
    return {e.address for e in eps}


# (name, service port, cluster endpoints or None, local endpoints or None, all reachable, only remote)
CASES = [
    ("internalTrafficPolicy: Local, with empty endpoints",
     svc(itp=True), None, set(), set(), False),
    ("internalTrafficPolicy: Local, but all endpoints are remote",
     svc(ep("10.0.0.0"), ep("10.0.0.1"), itp=True), None, set(), set(), True),
    ("internalTrafficPolicy: Local, all endpoints are local",
     svc(ep("10.0.0.0", local=True), ep("10.0.0.1", local=True), itp=True),
     None, {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80", "10.0.0.1:80"}, False),
    ("internalTrafficPolicy: Local, some endpoints are local",
     svc(ep("10.0.0.0", local=True), ep("10.0.0.1"), itp=True),
     None, {"10.0.0.0:80"}, {"10.0.0.0:80"}, False),
    ("Cluster traffic policy, endpoints not Ready",
     svc(ep("10.0.0.0", ready=False), ep("10.0.0.1", ready=False)), set(), None, set(), False),
    ("Cluster traffic policy, some endpoints are Ready",
     svc(ep("10.0.0.0", ready=False), ep("10.0.0.1")), {"10.0.0.1:80"}, None, {"10.0.0.1:80"}, False),
    ("Cluster traffic policy, all endpoints are terminating",
     svc(ep("10.0.0.0", ready=False, serving=True, terminating=True, local=True),
         ep("10.0.0.1", ready=False, serving=True, terminating=True)),
     {"10.0.0.0:80", "10.0.0.1:80"}, None, {"10.0.0.0:80", "10.0.0.1:80"}, False),
    ("iTP: Local, eTP: Cluster, some endpoints local",
     svc(ep("10.0.0.0", local=True), ep("10.0.0.1"), itp=True, node_port=30080),
     {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.1:80"}, False),
    ("iTP: Cluster, eTP: Local, some endpoints local",
     svc(ep("10.0.0.0", local=True), ep("10.0.0.1"), etp=True, node_port=30080),
     {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.1:80"}, False),
    ("iTP: Local, eTP: Local, some endpoints local",
     svc(ep("10.0.0.0", local=True), ep("10.0.0.1"), itp=True, etp=True, node_port=30080),
     {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.1:80"}, False),
    ("iTP: Local, eTP: Local, all endpoints remote",
     svc(ep("10.0.0.0"), ep("10.0.0.1"), itp=True, etp=True, node_port=30080),
     {"10.0.0.0:80", "10.0.0.1:80"}, set(), {"10.0.0.0:80", "10.0.0.1:80"}, False),
    ("iTP: Local, eTP: Local, all endpoints remote and terminating",
     svc(ep("10.0.0.0", ready=False, serving=True, terminating=True),
         ep("10.0.0.1", ready=False, serving=True, terminating=True), itp=True, etp=True, node_port=30080),
     {"10.0.0.0:80", "10.0.0.1:80"}, set(), {"10.0.0.0:80", "10.0.0.1:80"}, True),
    ("iTP: Cluster, eTP: Local, with terminating endpoints",
     svc(ep("10.0.0.0"), ep("10.0.0.1", ready=False, serving=False, local=True),
         ep("10.0.0.2", ready=False, serving=True, terminating=True, local=True),
         ep("10.0.0.3", ready=False, serving=True, terminating=True), etp=True, node_port=30080),
     {"10.0.0.0:80"}, {"10.0.0.2:80"}, {"10.0.0.0:80", "10.0.0.2:80"}, False),
    ("externalTrafficPolicy ignored if not externally accessible",
     svc(ep("10.0.0.0"), ep("10.0.0.1", local=True), etp=True),
     {"10.0.0.0:80", "10.0.0.1:80"}, None, {"10.0.0.0:80", "10.0.0.1:80"}, False),
    ("no cluster endpoints for iTP:Local internal-only service",
     svc(ep("10.0.0.0"), ep("10.0.0.1", local=True), itp=True),
     None, {"10.0.0.1:80"}, {"10.0.0.1:80"}, False),
    # netsim additions, same rules
    ("no endpoints at all",
     svc(), set(), None, set(), False),
    ("ready and serving-terminating: only the ready ones",
     svc(ep("10.0.0.0"), ep("10.0.0.1", ready=False, serving=True, terminating=True)),
     {"10.0.0.0:80"}, None, {"10.0.0.0:80"}, False),
    ("terminating but not serving is never used",
     svc(ep("10.0.0.0", ready=False, serving=False, terminating=True),
         ep("10.0.0.1", ready=False, serving=True, terminating=True)),
     {"10.0.0.1:80"}, None, {"10.0.0.1:80"}, False),
    ("serving but neither ready nor terminating is not a fallback",
     svc(ep("10.0.0.0", ready=False, serving=True, terminating=False)), set(), None, set(), False),
    ("eTP Local via externalIPs: local ready first",
     svc(ep("10.0.0.0", local=True), ep("10.0.0.1", ready=False, serving=True, terminating=True, local=True),
         etp=True, external_ips=("192.168.100.50",)),
     {"10.0.0.0:80"}, {"10.0.0.0:80"}, {"10.0.0.0:80"}, False),
    ("eTP Local via a LoadBalancer IP: local falls back to serving-terminating on this node",
     svc(ep("10.0.0.0"), ep("10.0.0.1", ready=False, serving=True, terminating=True, local=True),
         etp=True, lb_ips=("192.168.100.241",)),
     {"10.0.0.0:80"}, {"10.0.0.1:80"}, {"10.0.0.0:80", "10.0.0.1:80"}, False),
    ("iTP Local, local endpoint only terminating: fallback",
     svc(ep("10.0.0.0"), ep("10.0.0.1", ready=False, serving=True, terminating=True, local=True), itp=True),
     None, {"10.0.0.1:80"}, {"10.0.0.1:80"}, False),
    ("iTP Local, local endpoint terminating and not serving: nothing here, but endpoints elsewhere",
     svc(ep("10.0.0.0"), ep("10.0.0.1", ready=False, serving=False, terminating=True, local=True), itp=True),
     None, set(), set(), True),
]


@pytest.mark.parametrize("name,port,cluster,local,reachable,only_remote", CASES, ids=[c[0] for c in CASES])
def test_categorize_matrix(name, port, cluster, local, reachable, only_remote):
    got = categorize(port, NODE)
    assert got.uses_cluster == (cluster is not None)
    assert got.uses_local == (local is not None)
    assert addrs(got.cluster) == (cluster or set())
    assert addrs(got.local) == (local or set())
    assert addrs(got.reachable) == reachable
    assert got.all_endpoints == (bool(reachable) or only_remote)


def test_uses_flags_follow_service_py():
    plain = svc()
    assert uses_cluster_endpoints(plain) and not uses_local_endpoints(plain)
    itp = svc(itp=True)
    assert not uses_cluster_endpoints(itp) and uses_local_endpoints(itp)
    # An externally accessible service always needs the cluster chain.
    assert uses_cluster_endpoints(svc(itp=True, node_port=30000))
    assert uses_cluster_endpoints(svc(itp=True, lb_ips=("1.2.3.4",)))
    assert uses_cluster_endpoints(svc(itp=True, external_ips=("1.2.3.4",)))
    # eTP=Local only counts when the service is reachable from outside.
    assert not uses_local_endpoints(svc(etp=True))
    assert uses_local_endpoints(svc(etp=True, node_port=30000))


def test_results_keep_the_ip_port_string_order():
    port = svc(ep("10.180.2.1", local=True), ep("10.180.10.1", local=True), ep("10.180.0.9"), etp=True,
               node_port=30000)
    got = categorize(port, NODE)
    assert [e.address for e in got.cluster] == ["10.180.0.9:80", "10.180.10.1:80", "10.180.2.1:80"]
    assert [e.address for e in got.local] == ["10.180.10.1:80", "10.180.2.1:80"]
    assert [e.address for e in got.reachable] == ["10.180.0.9:80", "10.180.10.1:80", "10.180.2.1:80"]


def test_locality_is_by_node_name_only():
    port = svc(Endpoint("10.0.0.1", 80, None), Endpoint("10.0.0.2", 80, "node-1"), itp=True)
    assert addrs(categorize(port, "node-1").local) == {"10.0.0.2:80"}
    assert addrs(categorize(port, "node-2").local) == set()
    # An empty node name is never local (kube-proxy: len(hostname) > 0 && equal).
    assert addrs(categorize(port, "").local) == set()


def test_categorized_is_frozen():
    got = categorize(svc(ep("10.0.0.1")), NODE)
    assert isinstance(got, Categorized)
    with pytest.raises(Exception):
        got.cluster = ()          # type: ignore[misc]


# -- terminating endpoints across nodes (TestTerminatingEndpoints* in spirit) --------

def terminating_mix() -> ServicePort:
    """Two nodes: node-1 has one ready and one terminating pod, node-2 only terminating ones."""
    return svc(
        Endpoint("10.0.1.1", 80, "node-1", True, True, False),
        Endpoint("10.0.1.2", 80, "node-1", False, True, True),
        Endpoint("10.0.1.3", 80, "node-1", False, False, True),
        Endpoint("10.0.2.1", 80, "node-2", False, True, True),
        Endpoint("10.0.2.2", 80, "node-2", False, False, True),
        etp=True, node_port=30080)


def test_terminating_endpoints_etp_local_per_node():
    port = terminating_mix()
    one, two, three = categorize(port, "node-1"), categorize(port, "node-2"), categorize(port, "node-3")
    # The cluster chain is the same on every node: the one ready endpoint.
    for got in (one, two, three):
        assert addrs(got.cluster) == {"10.0.1.1:80"}
        assert got.all_endpoints
    # Local: node-1 has a ready one; node-2 falls back to its serving terminating one;
    # node-3 has nothing (eTP=Local traffic is dropped there).
    assert addrs(one.local) == {"10.0.1.1:80"}
    assert addrs(two.local) == {"10.0.2.1:80"}
    assert addrs(three.local) == set()


def test_terminating_endpoints_all_terminating_cluster_wide():
    port = svc(Endpoint("10.0.1.2", 80, "node-1", False, True, True),
               Endpoint("10.0.1.3", 80, "node-1", False, False, True),
               Endpoint("10.0.2.1", 80, "node-2", False, True, True))
    got = categorize(port, "node-1")
    assert addrs(got.cluster) == {"10.0.1.2:80", "10.0.2.1:80"}
    assert got.all_endpoints


def test_no_usable_endpoint_anywhere_means_reject():
    port = svc(Endpoint("10.0.1.3", 80, "node-1", False, False, True), etp=True, node_port=30080)
    got = categorize(port, "node-1")
    assert got.cluster == () and got.local == () and not got.all_endpoints


# -- internalTrafficPolicy (TestInternalTrafficPolicy in spirit) ---------------------

@pytest.mark.parametrize("itp,node,expected", [
    (False, "node-1", {"10.0.1.1:80", "10.0.1.2:80", "10.0.2.1:80"}),
    (True, "node-1", {"10.0.1.1:80", "10.0.1.2:80"}),
    (True, "node-2", {"10.0.2.1:80"}),
    (True, "node-3", set()),
])
def test_internal_traffic_policy(itp, node, expected):
    port = svc(Endpoint("10.0.1.1", 80, "node-1"), Endpoint("10.0.1.2", 80, "node-1"),
               Endpoint("10.0.2.1", 80, "node-2"), itp=itp)
    got = categorize(port, node)
    assert addrs(got.reachable) == expected
    assert got.all_endpoints                 # no local endpoints under iTP=Local: DROP, not REJECT
    assert got.uses_cluster == (not itp)


# -- health-check node port -----------------------------------------------------------

def test_health_check_counts_local_ready_not_terminating():
    port = svc(Endpoint("10.0.1.1", 80, "node-1", True, True, False),
               Endpoint("10.0.1.2", 80, "node-1", True, True, True),      # ready yet terminating (hand-written)
               Endpoint("10.0.1.3", 80, "node-1", False, True, True),
               Endpoint("10.0.1.4", 80, "node-1", False, False, False),
               Endpoint("10.0.2.1", 80, "node-2", True, True, False),
               etp=True, lb_ips=("192.168.100.241",))
    assert health_check_local_count(port, "node-1") == 1
    assert health_check_local_count(port, "node-2") == 1
    assert health_check_local_count(port, "node-3") == 0
    assert health_check_local_count(port, "") == 0


def test_health_check_when_terminating_drains_the_node():
    """TestHealthCheckNodePortWhenTerminating: only terminating pods on the node → 0, though
    traffic still reaches them through the serving-terminating fallback."""
    port = svc(Endpoint("10.0.1.1", 80, "node-1", False, True, True),
               Endpoint("10.0.1.2", 80, "node-1", False, True, True),
               Endpoint("10.0.2.1", 80, "node-2", True, True, False),
               etp=True, lb_ips=("192.168.100.241",))
    assert health_check_local_count(port, "node-1") == 0
    assert addrs(categorize(port, "node-1").local) == {"10.0.1.1:80", "10.0.1.2:80"}


def test_health_check_counts_per_service_by_distinct_ip():
    http = ServicePort("ns", "svc", "http", "TCP", 80, "10.96.0.50", node_port=30080, external_policy_local=True,
                       endpoints=(Endpoint("10.0.1.1", 8080, "node-1"), Endpoint("10.0.1.2", 8080, "node-1")))
    https = replace(http, port_name="https", port=443,
                    endpoints=(Endpoint("10.0.1.1", 8443, "node-1"), Endpoint("10.0.2.1", 8443, "node-2")))
    assert health_check_local_count(http, "node-1") == 2
    assert health_check_local_count(https, "node-1") == 1
    assert health_check_local_count([http, https], "node-1") == 2      # 10.0.1.1 counts once
    assert health_check_local_count((http, https), "node-2") == 1
