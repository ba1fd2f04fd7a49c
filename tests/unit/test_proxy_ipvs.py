"""kube-proxy's IPVS mode (netsim.proxy.ipvs), checked against upstream's unit tests.

The cases port ``pkg/proxy/ipvs/proxier_test.go`` (node ``test-node`` = 100.101.102.103,
ClusterIPs 10.20.30.4x, endpoints 10.180.x.y, LB IP 1.2.3.4, pod CIDR 10.0.0.0/8): upstream
compares structurally (virtual servers with their real servers, set members, and the
(match-set, jump) sequence of a chain), and so do these tests; the full text of each case is
also kept as a golden file under tests/golden/ipvs/. Regenerate after a deliberate change
with ``NETSIM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_proxy_ipvs.py`` and review.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from netsim.proxy import ipvs
from netsim.proxy.backend import render_text
from netsim.proxy.model import Endpoint, NodeContext, ServicePort

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "ipvs"
UPDATE = os.environ.get("NETSIM_UPDATE_GOLDEN") == "1"
NODE = NodeContext("test-node", ("100.101.102.103",), "10.0.0.0/8")


@dataclass(frozen=True)
class HCServicePort(ServicePort):
    health_check_node_port: int | None = None


def ep(ip: str, port: int = 80, node: str | None = None, **kw) -> Endpoint:
    return Endpoint(ip, port, node, **kw)


def sp(name: str, cip: str, *eps: Endpoint, ns: str = "ns1", port: int = 80, proto: str = "TCP",
       cls=ServicePort, **kw) -> ServicePort:
    return cls(ns, name, "p80", proto, port, cip, endpoints=tuple(sorted(eps, key=lambda e: e.address)), **kw)


def vs_map(st: ipvs.IPVSState) -> dict[str, list[str]]:
    """``{"TCP 10.20.30.41:80": ["10.180.0.1:80", ...]}``."""
    return {f"{v.protocol} {v.ip}:{v.port}": [r.address for r in v.reals] for v in st.virtual_servers}


def members(st: ipvs.IPVSState) -> dict[str, list[str]]:
    return {s.name: list(s.entries) for s in st.ipsets if s.entries}


def chain(st: ipvs.IPVSState, table: str, name: str) -> list[tuple[str, str]]:
    """(match-set or "", jump) per rule of one chain, upstream's ExpectedIptablesRule shape."""
    out, cur = [], None
    for line in st.iptables.splitlines():
        if line.startswith("*"):
            cur = line[1:]
        elif cur == table and line.startswith(f"-A {name} "):
            m = re.search(r"--match-set (\S+)", line)
            out.append((m.group(1) if m else "", line.split(" -j ")[1].split()[0]))
    return out


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden {path}: run with NETSIM_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text()


# -- upstream cases --------------------------------------------------------------------------
def test_cluster_ip_no_endpoint():
    """TestClusterIPNoEndpoint: a virtual server without real servers (the kernel answers a new
    connection with port unreachable), the ClusterIP bound and in KUBE-CLUSTER-IP."""
    st = ipvs.render([sp("svc1", "10.20.30.41")], NODE)
    assert vs_map(st) == {"TCP 10.20.30.41:80": []}
    assert st.bind_addresses == ("10.20.30.41",)
    assert members(st) == {"KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"], "KUBE-IPVS-IPS": ["10.20.30.41"]}
    check_golden("cluster-ip-no-endpoint.txt", render_text("ipvs", [sp("svc1", "10.20.30.41")], NODE))


def test_cluster_ip():
    """TestClusterIP (IPv4 half): two services, endpoints sorted, rr, masquerade weight 1."""
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1")),
             sp("svc2", "10.20.30.42", ep("10.180.0.2", 8080), ep("10.180.0.3", 8080), port=8080)]
    st = ipvs.render(ports, NODE)
    assert vs_map(st) == {"TCP 10.20.30.41:80": ["10.180.0.1:80"],
                          "TCP 10.20.30.42:8080": ["10.180.0.2:8080", "10.180.0.3:8080"]}
    assert all(r.weight == 1 for v in st.virtual_servers for r in v.reals)
    assert st.ipvsadm_text().splitlines()[:2] == ["-A -t 10.20.30.41:80 -s rr",
                                                  "-a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1"]
    check_golden("cluster-ip.txt", render_text("ipvs", ports, NODE))


def test_node_port_ipv4():
    """TestNodePortIPv4: a NodePort gives one virtual server per node address (not bound)."""
    node = replace(NODE, node_ips=("100.101.102.103", "100.101.102.104"))
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1"), ep("1002:ab8::2:10"), node_port=3001)]
    st = ipvs.render(ports, node)
    assert vs_map(st) == {"TCP 10.20.30.41:80": ["10.180.0.1:80"],
                          "TCP 100.101.102.103:3001": ["10.180.0.1:80"],
                          "TCP 100.101.102.104:3001": ["10.180.0.1:80"]}
    assert st.bind_addresses == ("10.20.30.41",)
    assert members(st)["KUBE-NODE-PORT-TCP"] == ["3001"]
    assert chain(st, "nat", "KUBE-NODE-PORT") == [("KUBE-NODE-PORT-TCP", "KUBE-MARK-MASQ")]
    check_golden("node-port.txt", render_text("ipvs", ports, node))


def test_node_port_udp():
    st = ipvs.render([sp("svc1", "10.20.30.41", ep("10.180.0.1"), proto="UDP", node_port=3001)], NODE)
    assert members(st)["KUBE-NODE-PORT-UDP"] == ["3001"]
    assert chain(st, "nat", "KUBE-NODE-PORT") == [("KUBE-NODE-PORT-UDP", "KUBE-MARK-MASQ")]
    assert "-A -u 100.101.102.103:3001 -s rr" in st.ipvsadm_text()
    assert "-A KUBE-NODE-PORT -p udp " in st.iptables


def test_external_ips():
    """TestExternalIPs: each externalIP gets a virtual server, a KUBE-EXTERNAL-IP member and
    the masquerade + two ACCEPT rules; an externalIP that is a node address is not bound."""
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1"), external_ips=("50.60.70.81", "100.101.102.103"))]
    st = ipvs.render(ports, NODE)
    assert set(vs_map(st)) == {"TCP 10.20.30.41:80", "TCP 50.60.70.81:80", "TCP 100.101.102.103:80"}
    assert st.bind_addresses == ("10.20.30.41", "50.60.70.81")
    assert members(st)["KUBE-EXTERNAL-IP"] == ["50.60.70.81,tcp:80", "100.101.102.103,tcp:80"]
    assert chain(st, "nat", "KUBE-SERVICES") == [
        ("", "RETURN"), ("KUBE-CLUSTER-IP", "KUBE-MARK-MASQ"), ("KUBE-EXTERNAL-IP", "KUBE-MARK-MASQ"),
        ("KUBE-EXTERNAL-IP", "ACCEPT"), ("KUBE-EXTERNAL-IP", "ACCEPT"), ("", "KUBE-NODE-PORT"),
        ("KUBE-CLUSTER-IP", "ACCEPT")]
    assert ("-m set --match-set KUBE-EXTERNAL-IP dst,dst -m physdev ! --physdev-is-in "
            "-m addrtype ! --src-type LOCAL -j ACCEPT") in st.iptables
    check_golden("external-ips.txt", render_text("ipvs", ports, NODE))


def test_only_local_external_ips():
    """TestOnlyLocalExternalIPs: eTP=Local externalIP uses only the local endpoint and the
    -LOCAL set (no masquerade); the ClusterIP keeps both endpoints."""
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1", node="test-node"), ep("10.180.1.1", node="other"),
                external_ips=("50.60.70.81",), external_policy_local=True, node_port=3001)]
    st = ipvs.render(ports, NODE)
    m = vs_map(st)
    assert m["TCP 50.60.70.81:80"] == ["10.180.0.1:80"]
    assert m["TCP 10.20.30.41:80"] == ["10.180.0.1:80", "10.180.1.1:80"]
    assert m["TCP 100.101.102.103:3001"] == ["10.180.0.1:80"]
    assert members(st)["KUBE-EXTERNAL-IP-LOCAL"] == ["50.60.70.81,tcp:80"]
    assert "KUBE-EXTERNAL-IP" not in members(st)
    assert ("KUBE-EXTERNAL-IP-LOCAL", "KUBE-MARK-MASQ") not in chain(st, "nat", "KUBE-SERVICES")
    assert members(st)["KUBE-LOOP-BACK"] == ["10.180.0.1,tcp:80,10.180.0.1"]


def test_load_balancer():
    """TestLoadBalancer: LB IP virtual server, KUBE-LOAD-BALANCER member and the chain order."""
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1"), node_port=3001, load_balancer_ips=("1.2.3.4",))]
    st = ipvs.render(ports, NODE)
    assert vs_map(st)["TCP 1.2.3.4:80"] == ["10.180.0.1:80"]
    assert "1.2.3.4" in st.bind_addresses
    assert members(st)["KUBE-LOAD-BALANCER"] == ["1.2.3.4,tcp:80"]
    assert [j for j in chain(st, "nat", "KUBE-SERVICES") if j[0] or j[1] != "RETURN"] == [
        ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"), ("KUBE-CLUSTER-IP", "KUBE-MARK-MASQ"),
        ("", "KUBE-NODE-PORT"), ("KUBE-CLUSTER-IP", "ACCEPT"), ("KUBE-LOAD-BALANCER", "ACCEPT")]
    assert chain(st, "nat", "KUBE-LOAD-BALANCER") == [("", "KUBE-MARK-MASQ")]
    check_golden("load-balancer.txt", render_text("ipvs", ports, NODE))


def test_only_local_node_ports():
    """TestOnlyLocalNodePorts: the NodePort virtual server lists only the local endpoint;
    the port is in both the plain and the -LOCAL bitmap, LOCAL → RETURN first."""
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1", node="test-node"), ep("10.180.1.1", node="other"),
                node_port=3001, external_policy_local=True)]
    st = ipvs.render(ports, NODE)
    assert vs_map(st)["TCP 100.101.102.103:3001"] == ["10.180.0.1:80"]
    assert members(st)["KUBE-NODE-PORT-TCP"] == members(st)["KUBE-NODE-PORT-LOCAL-TCP"] == ["3001"]
    assert chain(st, "nat", "KUBE-NODE-PORT") == [("KUBE-NODE-PORT-LOCAL-TCP", "RETURN"),
                                                  ("KUBE-NODE-PORT-TCP", "KUBE-MARK-MASQ")]
    assert chain(st, "filter", "KUBE-NODE-PORT") == [("KUBE-HEALTH-CHECK-NODE-PORT", "ACCEPT")]


def test_only_local_without_local_endpoints_falls_back_to_cluster_endpoints():
    """PR #97081: with eTP=Local and no local endpoint, IPVS uses every endpoint (iptables drops)."""
    ports = [sp("svc1", "10.20.30.41", ep("10.180.1.1", node="other"), node_port=3001, external_policy_local=True,
                load_balancer_ips=("1.2.3.4",))]
    m = vs_map(ipvs.render(ports, NODE))
    assert m["TCP 100.101.102.103:3001"] == m["TCP 1.2.3.4:80"] == ["10.180.1.1:80"]


def test_health_check_node_port():
    """TestHealthCheckNodePort: eTP=Local LB services' health-check ports in the bitmap."""
    ports = [sp(f"valid-svc{i}", f"10.20.30.4{i}", cls=HCServicePort, node_port=3000 + i, external_policy_local=True,
                health_check_node_port=30000 + i - 1) for i in (1, 2)]
    st = ipvs.render(ports, NODE)
    assert members(st)["KUBE-HEALTH-CHECK-NODE-PORT"] == ["30000", "30001"]
    assert chain(st, "filter", "KUBE-NODE-PORT") == [("KUBE-HEALTH-CHECK-NODE-PORT", "ACCEPT")]


def test_load_balancer_source_ranges():
    """TestLoadBalancerSourceRanges: FW set, CIDR set, the firewall chains; the node IP is not
    in the range, so node-originated traffic to the LB IP is dropped (KUBE-IPVS-OUT-FILTER)."""
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1"), load_balancer_ips=("1.2.3.4",),
                load_balancer_source_ranges=("10.0.0.0/8",))]
    st = ipvs.render(ports, NODE)
    mem = members(st)
    assert mem["KUBE-LOAD-BALANCER"] == mem["KUBE-LOAD-BALANCER-FW"] == ["1.2.3.4,tcp:80"]
    assert mem["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == ["1.2.3.4,tcp:80,10.0.0.0/8"]
    assert "KUBE-LOAD-BALANCER-SOURCE-IP" not in mem
    assert chain(st, "filter", "KUBE-PROXY-FIREWALL") == [("KUBE-LOAD-BALANCER-FW", "KUBE-SOURCE-RANGES-FIREWALL")]
    assert chain(st, "filter", "KUBE-SOURCE-RANGES-FIREWALL") == [("KUBE-LOAD-BALANCER-SOURCE-CIDR", "RETURN"),
                                                                  ("", "DROP")]
    assert ("-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP"
            in st.iptables)
    check_golden("load-balancer-source-ranges.txt", render_text("ipvs", ports, NODE))


def test_source_range_holding_the_node_ip_allows_the_lb_ip_as_source():
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1"), load_balancer_ips=("1.2.3.4",),
                load_balancer_source_ranges=("100.101.102.0/24",))]
    st = ipvs.render(ports, NODE)
    assert members(st)["KUBE-LOAD-BALANCER-SOURCE-IP"] == ["1.2.3.4,tcp:80,1.2.3.4"]
    assert "KUBE-IPVS-OUT-FILTER -s" not in st.iptables
    allow_all = ipvs.render([replace(ports[0], load_balancer_source_ranges=("0.0.0.0/0",))], NODE)
    assert "KUBE-LOAD-BALANCER-FW" not in members(allow_all)


def test_accept_ipvs_traffic():
    """TestAcceptIPVSTraffic: ClusterIP + externalIP, LoadBalancer, NodePort services."""
    ports = [sp("svc1", "10.20.30.40", ep("10.180.0.1"), external_ips=("5.6.7.8",)),
             sp("svc2", "10.20.30.41", ep("10.180.0.2"), node_port=80, load_balancer_ips=("1.2.3.4",)),
             sp("svc3", "10.20.30.42", ep("10.180.0.3"), node_port=81)]
    st = ipvs.render(ports, NODE)
    assert chain(st, "nat", "KUBE-SERVICES") == [
        ("", "RETURN"),
        ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"), ("KUBE-CLUSTER-IP", "KUBE-MARK-MASQ"),
        ("KUBE-EXTERNAL-IP", "KUBE-MARK-MASQ"), ("KUBE-EXTERNAL-IP", "ACCEPT"), ("KUBE-EXTERNAL-IP", "ACCEPT"),
        ("", "KUBE-NODE-PORT"), ("KUBE-CLUSTER-IP", "ACCEPT"), ("KUBE-LOAD-BALANCER", "ACCEPT")]
    check_golden("accept-ipvs-traffic.txt", render_text("ipvs", ports, NODE))


def test_session_affinity():
    """TestSessionAffinity: ClientIP affinity → persistent virtual servers with the timeout."""
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1"), affinity_timeout=10800, node_port=3001,
                external_ips=("50.60.70.81",))]
    st = ipvs.render(ports, NODE)
    assert all(v.persistent and v.timeout == 10800 for v in st.virtual_servers)
    assert "-A -t 10.20.30.41:80 -s rr -p 10800" in st.ipvsadm_text()
    check_golden("session-affinity.txt", render_text("ipvs", ports, NODE))


# -- netsim specifics ------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["rr", "wrr", "lc", "sh", "mh"])
def test_scheduler_choice(scheduler):
    st = ipvs.render([sp("svc1", "10.20.30.41", ep("10.180.0.1"))], replace(NODE, ipvs_scheduler=scheduler))
    assert st.virtual_servers[0].scheduler == scheduler
    assert st.ipvsadm_text().splitlines()[0].startswith(f"-A -t 10.20.30.41:80 -s {scheduler}")
    assert bool(st.virtual_servers[0].flags & ipvs.FLAG_SOURCE_HASH) == (scheduler == "mh")


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="unknown IPVS scheduler 'fastest'"):
        ipvs.render([], replace(NODE, ipvs_scheduler="fastest"))


def test_every_set_exists_with_upstream_types_even_when_empty():
    st = ipvs.render([], NODE)
    assert [(s.name, s.type) for s in st.ipsets] == [(n, t) for n, t, _ in ipvs.IPSET_INFO]
    assert len(st.ipsets) == 17 and not any(s.entries for s in st.ipsets)
    assert st.ipset("KUBE-NODE-PORT-TCP").save_lines() == ["create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"]
    assert st.virtual_servers == () and st.bind_addresses == ()
    # Without services, only the rules upstream writes unconditionally remain.
    assert chain(st, "nat", "KUBE-SERVICES") == [("", "RETURN"), ("", "KUBE-NODE-PORT")]


def test_hairpin_and_masquerade_rules():
    st = ipvs.render([sp("svc1", "10.20.30.41", ep("10.180.0.1", node="test-node"), ep("10.180.0.2"))], NODE)
    assert members(st)["KUBE-LOOP-BACK"] == ["10.180.0.1,tcp:80,10.180.0.1"]
    post = [line for line in st.iptables.splitlines() if line.startswith("-A KUBE-POSTROUTING")]
    assert post == [
        '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin '
        'purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE',
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
        "--random-fully"]
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000" in st.iptables
    assert ('-m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ' in st.iptables)


def test_internal_traffic_policy_local():
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1", node="test-node"), ep("10.180.0.2", node="other"),
                internal_policy_local=True)]
    assert vs_map(ipvs.render(ports, NODE)) == {"TCP 10.20.30.41:80": ["10.180.0.1:80"]}
    elsewhere = [replace(ports[0], endpoints=(ep("10.180.0.2", node="other"),))]
    assert vs_map(ipvs.render(elsewhere, NODE)) == {"TCP 10.20.30.41:80": []}


def test_terminating_endpoints_are_a_fallback():
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1", ready=False, serving=True, terminating=True),
                ep("10.180.0.2"))]
    assert vs_map(ipvs.render(ports, NODE))["TCP 10.20.30.41:80"] == ["10.180.0.2:80"]
    only = [replace(ports[0], endpoints=(ports[0].endpoints[0],))]
    assert vs_map(ipvs.render(only, NODE))["TCP 10.20.30.41:80"] == ["10.180.0.1:80"]


def test_sysctls():
    assert ipvs.sysctls(NODE, (6, 1)) == (
        ("net/ipv4/vs/conntrack", "1"), ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"), ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/conf/all/arp_ignore", "1"), ("net/ipv4/conf/all/arp_announce", "2"))
    assert ("net/ipv4/vs/conn_reuse_mode", "0") in ipvs.sysctls(NODE, (5, 4))
    assert not any("arp" in k for k, _ in ipvs.sysctls(replace(NODE, ipvs_strict_arp=False), (6, 1)))


def test_jump_rules_match_upstream_iptables_jump_chain():
    assert ipvs.jump_rules()[0] == ("nat", "OUTPUT", ["-m", "comment", "--comment", "kubernetes service portals",
                                                      "-j", "KUBE-SERVICES"])
    assert [(t, c, w[-1]) for t, c, w in ipvs.jump_rules()][-2:] == [("filter", "INPUT", "KUBE-IPVS-FILTER"),
                                                                     ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER")]


def test_output_is_deterministic_and_independent_of_input_order():
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1"), ep("10.180.10.1"), ep("10.180.2.1")),
             sp("svc2", "10.20.30.42", ep("10.180.0.3"), node_port=3002, proto="UDP")]
    a = render_text("ipvs", ports, NODE)
    assert a == render_text("ipvs", list(reversed(ports)), NODE)
    # real servers in "IP:port" string order, as endpoints are sorted everywhere in kube-proxy
    assert vs_map(ipvs.render(ports, NODE))["TCP 10.20.30.41:80"] == ["10.180.0.1:80", "10.180.10.1:80",
                                                                      "10.180.2.1:80"]


def test_iptables_text_declares_every_chain_it_writes():
    ports = [sp("svc1", "10.20.30.41", ep("10.180.0.1", node="test-node"), node_port=3001,
                load_balancer_ips=("1.2.3.4",), load_balancer_source_ranges=("10.0.0.0/8",),
                external_policy_local=True, external_ips=("50.60.70.81",))]
    text = ipvs.render(ports, NODE).iptables
    table, declared = None, {}
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            declared[table] = set()
        elif line.startswith(":"):
            declared[table].add(line[1:].split()[0])
        elif line.startswith("-A "):
            assert line.split()[1] in declared[table], line
            target = line.split(" -j ")[1].split()[0]
            assert target.isupper() and (target in declared[table] or not target.startswith("KUBE-")), line


def test_ipset_entries_are_written_with_numeric_protocols():
    from netsim.proxy.ipvs_apply import _numeric
    assert _numeric("10.96.0.1,tcp:443") == "10.96.0.1,6:443"
    assert _numeric("10.244.1.5,udp:53,10.244.1.5") == "10.244.1.5,17:53,10.244.1.5"
    assert _numeric("10.96.0.2,sctp:80,10.0.0.0/8") == "10.96.0.2,132:80,10.0.0.0/8"
    assert _numeric("30080") == "30080"                     # bitmap:port sets carry no protocol
