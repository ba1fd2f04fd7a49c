"""Packet flows through the rendered nftables rules, as upstream's ``runPacketFlowTests``.

``trace()`` walks one new connection through what ``netsim.proxy.nftables`` renders, the
way the kernel would: ``firewall-check`` on the pre-DNAT address, then ``services``
(DNAT), then the filter checks for traffic that was not DNATed. It reads the rule text
itself, so it checks the rules, not the renderer's intentions. The cases and expected
results are upstream's (pkg/proxy/nftables/proxier_test.go: TestNoEndpointsReject,
TestClusterIPGeneral, TestLoadBalancer, TestNodePorts, TestExternalTrafficPolicyLocal,
TestExternalTrafficPolicyCluster); SCTP cases are left out (netsim models TCP and UDP).
"""
from __future__ import annotations

import ipaddress
import re

import pytest

from netsim.proxy.model import Endpoint, NodeContext
from netsim.proxy.nftables import render
from netsim.proxy.synthetic import service_port as sp

NODE = NodeContext("test-node", ("192.168.0.2",), "10.0.0.0/8", service_cidrs=("172.30.0.0/16",))
LOCAL_IPS = {"192.168.0.2", "192.168.1.2"}         # testNodeIP and testNodeIPAlt
EXTERNAL = "203.0.113.2"                           # testExternalClient
BLOCKED = "203.0.113.130"                          # testExternalClientBlocked


def _in(ip: str, cidr: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr.strip(), strict=False)


def trace(ports, src: str, dst: str, dport: int, proto: str = "tcp") -> tuple[str, bool]:
    """(output, masq): "IP:port, IP:port" (every possible DNAT target), "REJECT", "DROP"
    or "" (accepted without NAT), and whether the connection was marked for masquerade."""
    state = render(ports, NODE)
    chains = {c: rules for p in state.ports.values() for c, rules in p.chains.items()}
    el = state.elements
    key3 = f"{dst} . {proto} . {dport}"

    def verdict(body: str) -> str:
        return body.rsplit(" : ", 1)[1]

    def run(chain: str) -> list[tuple[str, bool]]:
        """Every way through ``chain``: (DNAT target or verdict, masq mark set)."""
        masq = False
        for rule in chains[chain]:
            rule = re.sub(r' comment "[^"]*"$', "", rule)
            words = rule.split()
            cond = True
            i = 0
            while i < len(words) and words[i] not in ("jump", "goto", "numgen", "update", "meta", "drop"):
                field, op = words[i:i + 2], words[i + 2] if words[i + 2] == "!=" else "=="
                value = words[i + 3] if op == "!=" else words[i + 2]
                if field == ["ip", "daddr"]:
                    cond &= (dst == value) == (op == "==")
                elif field == ["ip", "saddr"] and value == "{":
                    close = words.index("}", i)
                    nets = [w for w in words[i + 4:close] if w != ","]
                    cond &= any(_in(src, n) for n in nets) == (op == "==")
                    i = close + 1
                    continue
                elif field == ["ip", "saddr"] and value.startswith("@"):
                    cond = False                                   # affinity sets start empty
                elif field == ["ip", "saddr"]:
                    cond &= _in(src, value) == (op == "==")
                elif field == ["fib", "saddr"]:
                    cond &= src in LOCAL_IPS
                    i += 4
                    continue
                else:
                    raise AssertionError(f"tracer cannot read {rule!r}")
                i += 4 if op == "!=" else 3
            if not cond:
                continue
            action = words[i:]
            if action == ["jump", "mark-for-masquerade"]:
                masq = True
            elif action[0] == "goto":
                return [(out, masq or m) for out, m in run(action[1])]
            elif action[0] == "numgen":
                targets = re.findall(r"goto (\S+)", rule)
                return [(out, masq or m) for t in targets for out, m in run(t)]
            elif action[0] == "update":
                continue
            elif action[:2] == ["meta", "l4proto"]:
                return [(action[-1], masq)]
            elif action == ["drop"]:
                return [("DROP", masq)]
            else:
                raise AssertionError(f"tracer cannot read {rule!r}")
        return [("", masq)]                                         # fell off the end: accepted

    # filter, before DNAT: LoadBalancer source ranges
    fw = el["firewall-ips"].get(key3)
    if fw and any(out == "DROP" for out, _ in run(verdict(fw).split()[1])):
        return "DROP", False
    # nat: dispatch
    target = el["service-ips"].get(key3)
    if target is None and dst in state.node_ips:
        target = el["service-nodeports"].get(f"{proto} . {dport}")
    if target is not None:
        paths = run(verdict(target).split()[1])
        outs = sorted({out for out, _ in paths})
        if outs != [""]:                                            # not DNATed: on to the filter
            return ", ".join(outs), any(m for _, m in paths)
    # filter, not DNATed: no endpoints, then ClusterIP checks
    noep = el["no-endpoint-services"].get(key3)
    if noep is None and dst in state.node_ips and dst in LOCAL_IPS:
        noep = el["no-endpoint-nodeports"].get(f"{proto} . {dport}")
    if noep is not None:
        return ("REJECT" if verdict(noep) == "goto reject-chain" else "DROP"), False
    if dst not in LOCAL_IPS:
        if dst in el["cluster-ips"]:
            return "REJECT", False
        if any(_in(dst, c) for c in state.service_cidrs):
            return "DROP", False
    return "", False



def check(ports, flows):
    for name, src, dst, dport, want, *rest in flows:
        proto = rest[1] if len(rest) > 1 else "tcp"
        got = trace(ports, src, dst, dport, proto)
        expect = (want, rest[0] if rest else False)
        if want in ("REJECT", "DROP", ""):
            got = (got[0], False)
        assert got == expect, f"{name}: got {got}, want {expect}"


def test_no_endpoints_reject():
    ports = [sp("ns1", "svc1", "172.30.0.41", node_port=3001, external_ips=("192.168.99.11",),
                load_balancer_ips=("1.2.3.4",))]
    check(ports, [
        ("pod to cluster IP with no endpoints", "10.0.0.2", "172.30.0.41", 80, "REJECT"),
        ("external to external IP with no endpoints", EXTERNAL, "192.168.99.11", 80, "REJECT"),
        ("pod to NodePort with no endpoints", "10.0.0.2", "192.168.0.2", 3001, "REJECT"),
        ("external to NodePort with no endpoints", EXTERNAL, "192.168.0.2", 3001, "REJECT"),
        ("pod to LoadBalancer IP with no endpoints", "10.0.0.2", "1.2.3.4", 80, "REJECT"),
        ("external to LoadBalancer IP with no endpoints", EXTERNAL, "1.2.3.4", 80, "REJECT"),
    ])


def test_cluster_ip_general():
    local, other = "test-node", "node2"
    ports = [sp("ns1", "svc1", "172.30.0.41", Endpoint("10.180.0.1", 80, local), port_name="http")]
    for name, proto, port, target in (("http", "TCP", 80, 80), ("https", "TCP", 443, 8443),
                                      ("dns-udp", "UDP", 53, 53), ("dns-tcp", "TCP", 53, 5353)):
        ports.append(sp("ns2", "svc2", "172.30.0.42", Endpoint("10.180.0.1", target, local),
                        Endpoint("10.180.2.1", target, other), port_name=name, proto=proto, port=port))
    check(ports, [
        ("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ("clusterIP with multiple endpoints", "10.180.0.2", "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80", False),
        ("clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443", False),
        ("TCP and UDP on the same port (TCP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353",
         False, "tcp"),
        ("TCP and UDP on the same port (UDP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53",
         False, "udp"),
        ("TCP-only port does not match UDP traffic", "10.180.0.2", "172.30.0.42", 80, "REJECT", False, "udp"),
        ("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, "REJECT"),
        ("packet to unallocated cluster ip", "10.180.0.2", "172.30.0.50", 80, "DROP"),
    ])


def test_load_balancer_source_ranges():
    ports = [sp("ns1", "svc1", "172.30.0.41", Endpoint("10.180.0.1", 80), node_port=3001,
                load_balancer_ips=("1.2.3.4", "5.6.7.8"),
                load_balancer_source_ranges=("192.168.0.0/24", " 203.0.113.0/25"))]
    ep = "10.180.0.1:80"
    check(ports, [
        ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, ep, False),
        ("external to nodePort", EXTERNAL, "192.168.0.2", 3001, ep, True),
        ("nodePort bypasses LoadBalancerSourceRanges", BLOCKED, "192.168.0.2", 3001, ep, True),
        ("accepted external to LB1", EXTERNAL, "1.2.3.4", 80, ep, True),
        ("accepted external to LB2", EXTERNAL, "5.6.7.8", 80, ep, True),
        ("blocked external to LB1", BLOCKED, "1.2.3.4", 80, "DROP"),
        ("blocked external to LB2", BLOCKED, "5.6.7.8", 80, "DROP"),
        ("pod to LB1 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "1.2.3.4", 80, "DROP"),
        ("pod to LB2 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "5.6.7.8", 80, "DROP"),
        ("node to LB1 (allowed by LoadBalancerSourceRanges)", "192.168.0.2", "1.2.3.4", 80, ep, True),
        ("node to LB2 (allowed by LoadBalancerSourceRanges)", "192.168.0.2", "5.6.7.8", 80, ep, True),
        ("same node to LB1, SNATted to LB1 (implicitly allowed)", "1.2.3.4", "1.2.3.4", 80, ep, True),
        ("same node to LB2, SNATted to LB2 (implicitly allowed)", "5.6.7.8", "5.6.7.8", 80, ep, True),
    ])


def test_node_ports_only_on_the_primary_node_ip():
    ports = [sp("ns1", "svc1", "172.30.0.41", Endpoint("10.180.0.1", 80), Endpoint("10.180.2.1", 80, "test-node"),
                node_port=3001)]
    both = "10.180.0.1:80, 10.180.2.1:80"
    check(ports, [
        ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("external to nodePort", EXTERNAL, "192.168.0.2", 3001, both, True),
        ("node to nodePort", "192.168.0.2", "192.168.0.2", 3001, both, True),
        ("secondary nodeIP ignores NodePorts", EXTERNAL, "192.168.1.2", 3001, ""),
    ])


@pytest.mark.parametrize("local_policy", [True, False], ids=["eTP=Local", "eTP=Cluster"])
def test_external_traffic_policy(local_policy):
    ports = [sp("ns1", "svc1", "172.30.0.41", Endpoint("10.180.0.1", 80), Endpoint("10.180.2.1", 80, "test-node"),
                node_port=3001, external_ips=("192.168.99.11",), load_balancer_ips=("1.2.3.4",),
                external_policy_local=local_policy)]
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    external_target = local if local_policy else both
    masq = not local_policy
    check(ports, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints", "10.0.0.2", "192.168.99.11", 80, both, masq),
        ("external to external IP", EXTERNAL, "192.168.99.11", 80, external_target, masq),
        ("pod to LB IP hits both endpoints", "10.0.0.2", "1.2.3.4", 80, both, masq),
        ("external to LB IP", EXTERNAL, "1.2.3.4", 80, external_target, masq),
        ("pod to NodePort hits both endpoints", "10.0.0.2", "192.168.0.2", 3001, both, masq),
        ("external to NodePort", EXTERNAL, "192.168.0.2", 3001, external_target, masq),
    ])


def test_external_traffic_policy_local_without_local_endpoints_drops_outside_traffic_only():
    ports = [sp("ns1", "svc1", "172.30.0.41", Endpoint("10.180.0.1", 80, "node2"), node_port=3001,
                load_balancer_ips=("1.2.3.4",), external_policy_local=True)]
    check(ports, [
        ("external to LB IP: no local endpoint", EXTERNAL, "1.2.3.4", 80, "DROP"),
        ("external to NodePort: no local endpoint", EXTERNAL, "192.168.0.2", 3001, "DROP"),
        ("pod to LB IP: short-circuited to the cluster endpoints", "10.0.0.2", "1.2.3.4", 80, "10.180.0.1:80", False),
        ("host to NodePort: short-circuited and masqueraded", "192.168.0.2", "192.168.0.2", 3001, "10.180.0.1:80", True),
    ])
