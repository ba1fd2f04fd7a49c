"""kube-proxy's nftables mode (netsim.proxy.nftables), checked against upstream's fixtures.

Fixture conventions are upstream's (pkg/proxy/nftables/proxier_test.go): node ``test-node``
= 192.168.0.2, pod CIDR 10.0.0.0/8, service CIDR 172.30.0.0/16, ClusterIPs 172.30.0.x,
endpoints 10.180.x.y. Goldens live in tests/golden/nftables/; regenerate after a
deliberate change with

    NETSIM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_proxy_nftables.py

and review the diff. Every transaction also runs through a small in-memory ``nft -f``
(``Table`` below) that refuses what the kernel refuses: a rule or element naming a chain
or set that does not exist, deleting a chain something still refers to.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from netsim.cli import main
from netsim.proxy.backend import port_key
from netsim.proxy.model import NodeContext, ServicePort
from netsim.proxy.nftables import (endpoint_base, port_base, render, render_text, transaction)
from netsim.proxy.synthetic import endpoint as ep, service_port as sp

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "nftables"
UPDATE = os.environ.get("NETSIM_UPDATE_GOLDEN") == "1"
NODE = NodeContext("test-node", ("192.168.0.2",), "10.0.0.0/8", service_cidrs=("172.30.0.0/16",))
T = "ip kube-proxy"




def overall_ports() -> list[ServicePort]:
    """TestOverallNFTablesRules: svc1 ClusterIP, svc2 LB eTP=Local (endpoint elsewhere),
    svc3 NodePort, svc4 externalIP, svc5 LB with source range and affinity, svc6 no endpoints."""
    return [
        sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1")),
        sp("ns2", "svc2", "172.30.0.42", ep("10.180.0.2"), node_port=3001, load_balancer_ips=("1.2.3.4",),
           external_ips=("192.168.99.22",), external_policy_local=True),
        sp("ns3", "svc3", "172.30.0.43", ep("10.180.0.3"), node_port=3003),
        sp("ns4", "svc4", "172.30.0.44", ep("10.180.0.4"), ep("10.180.0.5", node="test-node"),
           external_ips=("192.168.99.33",)),
        sp("ns5", "svc5", "172.30.0.45", ep("10.180.0.3"), node_port=3002, load_balancer_ips=("5.6.7.8",),
           load_balancer_source_ranges=(" 203.0.113.0/25",), affinity_timeout=10800),
        sp("ns6", "svc6", "172.30.0.46"),
    ]


# -- an in-memory nft -f ----------------------------------------------------------------------
class Table:
    """Just enough of the kernel's nf_tables to replay kube-proxy's transactions."""

    def __init__(self):
        self.chains: dict[str, list[str]] = {}
        self.sets: dict[str, dict[str, str]] = {}       # sets and maps: key → body

    def refs(self) -> set[str]:
        text = "\n".join(r for rules in self.chains.values() for r in rules)
        text += "\n" + "\n".join(b for els in self.sets.values() for b in els.values())
        return set(re.findall(r"(?:goto|jump) (\S+)", text)) | set(re.findall(r"@(\S+)", text))

    def run(self, text: str) -> "Table":
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            verb, kind, rest = re.match(r"(\w+) (\w+) ip kube-proxy ?(.*)", line).groups()
            name = rest.split(" ", 1)[0]
            if verb == "add" and kind == "table":
                continue
            if kind == "chain":
                if verb == "add":
                    self.chains.setdefault(name, [])
                elif verb == "flush":
                    self.chains[name] = []
                elif verb == "delete":
                    assert not self.chains[name] or name in BASE, f"deleting non-empty chain {name}"
                    assert name not in self.refs() - {name}, f"deleting referenced chain {name}"
                    del self.chains[name]
            elif kind in ("set", "map"):
                if verb == "add":
                    self.sets.setdefault(name, {})
                elif verb == "flush":
                    self.sets[name] = {}
                elif verb == "delete":
                    assert f"@{name}" not in "\n".join(r for rs in self.chains.values() for r in rs), name
                    del self.sets[name]
            elif kind == "rule":
                rule = rest.split(" ", 1)[1]
                for target in re.findall(r"(?:goto|jump) (\S+)", rule):
                    assert target in self.chains, f"rule in {name} names missing chain {target}"
                for s in re.findall(r"@(\S+)", rule):
                    assert s in self.sets, f"rule in {name} names missing set {s}"
                self.chains[name].append(rule)
            elif kind == "element":
                body = re.match(r"\S+ \{ (.*) \}$", rest).group(1)
                key = body.split(" comment ")[0].split(" : ")[0]
                if verb == "add":
                    for target in re.findall(r"goto (\S+)", body):
                        assert target in self.chains, f"element names missing chain {target}"
                    assert key not in self.sets[name], f"element {key} exists in {name}"
                    self.sets[name][key] = body
                else:
                    del self.sets[name][key]
        return self

    def snapshot(self):
        return ({c: list(r) for c, r in self.chains.items()}, {s: dict(e) for s, e in self.sets.items()})


BASE = {"filter-prerouting-pre-dnat", "filter-output-pre-dnat", "filter-input", "filter-forward",
        "filter-output", "nat-prerouting", "nat-output", "nat-postrouting"}


def full(ports, node=NODE) -> str:
    return transaction(render(ports, node), node).text


def lines(text: str) -> set[str]:
    return {l for l in text.splitlines() if l and not l.startswith(("#", "flush"))}


# -- names -------------------------------------------------------------------------------------
def test_chain_names_use_upstreams_hash():
    p = sp("ns1", "svc1", "172.30.0.41")
    assert port_base(p) == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert endpoint_base(p, "10.180.0.1:80") == "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert endpoint_base(p, "10.180.2.1:80") == "MLKSHPWN-ns1/svc1/tcp/p80__10.180.2.1/80"
    assert endpoint_base(p, "[fd00::1]:80").endswith("__fd00..1/80")
    long = replace(p, namespace="n" * 63, name="s" * 63, port_name="p" * 63)
    assert len("endpoint-" + endpoint_base(long, "[fd00:1:2:3:4:5:6:7]:65535")) <= 256


# -- upstream's fixtures ---------------------------------------------------------------------------
def test_overall_rules_match_upstream_and_golden():
    text = render_text(overall_ports(), NODE)
    golden = GOLDEN / "overall.nft"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text()
    got = lines(text)
    # lines of upstream's expected dump, by service
    for want in [
        f"add rule {T} cluster-ips-check ip daddr {{ 172.30.0.0/16 }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
        f"add chain {T} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}",
        f"add rule {T} filter-output-pre-dnat ct state new jump firewall-check",
        f"add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        f"add element {T} nodeport-ips {{ 192.168.0.2 }}",
        f"add rule {T} service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"add rule {T} service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap {{ 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }}",
        f"add rule {T} external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment \"short-circuit pod traffic\"",
        f"add element {T} no-endpoint-nodeports {{ tcp . 3001 comment \"ns2/svc2:p80\" : drop }}",
        f"add element {T} service-ips {{ 1.2.3.4 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }}",
        f"add rule {T} external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80",
        f"add rule {T} service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap {{ 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }}",
        f"add set {T} affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}",
        f"add rule {T} service-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 goto endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80",
        f"add rule {T} endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 update @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 {{ ip saddr }}",
        f"add rule {T} firewall-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr != {{ 203.0.113.0/25 }} drop",
        f"add element {T} firewall-ips {{ 5.6.7.8 . tcp . 80 : goto firewall-HVFWP5L3-ns5/svc5/tcp/p80 }}",
        f"add element {T} no-endpoint-services {{ 172.30.0.46 . tcp . 80 comment \"ns6/svc6:p80\" : goto reject-chain }}",
    ]:
        assert want in got, want
    # svc2's only endpoint is on another node: no local chain, no "goto local-" in external
    assert not any("local-42NFTM6N" in l for l in got)
    # svc6 has no endpoints: no chains at all, only elements
    assert not any("ns6/svc6/" in l for l in got)
    Table().run(text)


def test_no_endpoints_reject_every_address():
    """TestNoEndpointsReject: ClusterIP, externalIP, LB IP and NodePort → reject-chain."""
    p = sp("ns1", "svc1", "172.30.0.41", node_port=3001, external_ips=("192.168.99.11",),
           load_balancer_ips=("1.2.3.4",))
    got = lines(full([p]))
    for key in ("172.30.0.41 . tcp . 80", "192.168.99.11 . tcp . 80", "1.2.3.4 . tcp . 80"):
        assert f'add element {T} no-endpoint-services {{ {key} comment "ns1/svc1:p80" : goto reject-chain }}' in got
    assert f'add element {T} no-endpoint-nodeports {{ tcp . 3001 comment "ns1/svc1:p80" : goto reject-chain }}' in got
    assert not any("service-ips {" in l and "element" in l for l in got)


def test_load_balancer_source_ranges_allow_the_lb_ips_when_a_node_is_inside():
    """TestLoadBalancer: a range holds the node IP, so the LB IPs themselves are allowed."""
    p = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1"), node_port=3001, load_balancer_ips=("1.2.3.4", "5.6.7.8"),
           load_balancer_source_ranges=("192.168.0.0/24", " 203.0.113.0/25"))
    fw = "firewall-" + port_base(p)
    got = lines(full([p]))
    assert f"add rule {T} {fw} ip saddr != {{ 192.168.0.0/24 , 203.0.113.0/25 , 1.2.3.4 , 5.6.7.8 }} drop" in got
    assert f"add element {T} firewall-ips {{ 5.6.7.8 . tcp . 80 : goto {fw} }}" in got
    open_range = replace(p, load_balancer_source_ranges=("0.0.0.0/0",))
    assert not any("firewall-" in l for l in lines(full([open_range])) if "/" in l)


def test_external_policy_local_goes_to_local_endpoints_and_internal_local_drops():
    p = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1", node="test-node"), ep("10.180.2.1", node="node2"),
           node_port=3001, external_policy_local=True)
    base = port_base(p)
    got = lines(full([p]))
    assert f"add rule {T} external-{base} goto local-{base}" in got
    assert any(l.startswith(f"add rule {T} local-{base} numgen random mod 1 vmap") for l in got)
    assert any(l.startswith(f"add rule {T} service-{base} numgen random mod 2 vmap") for l in got)
    itp = sp("ns7", "svc7", "172.30.0.47", ep("10.180.2.7", node="node2"), internal_policy_local=True)
    got = lines(full([itp]))
    assert f'add element {T} no-endpoint-services {{ 172.30.0.47 . tcp . 80 comment "ns7/svc7:p80" : drop }}' in got
    assert not any("/ns7/" in l or "ns7/svc7/" in l for l in got if "chain" in l)


def test_udp_and_tcp_ports_get_their_own_chains_and_keys():
    tcp = sp("kube-system", "dns", "172.30.0.10", ep("10.180.0.7", 53), port_name="dns-tcp", port=53)
    udp = sp("kube-system", "dns", "172.30.0.10", ep("10.180.0.7", 53), port_name="dns", proto="UDP", port=53)
    got = lines(full([tcp, udp]))
    assert f"add element {T} service-ips {{ 172.30.0.10 . udp . 53 : goto service-{port_base(udp)} }}" in got
    assert f"add element {T} service-ips {{ 172.30.0.10 . tcp . 53 : goto service-{port_base(tcp)} }}" in got
    assert any("meta l4proto udp dnat to 10.180.0.7:53" in l for l in got)


def test_render_is_deterministic_whatever_the_input_order():
    ports = overall_ports()
    assert full(ports) == full(list(reversed(ports)))


# -- partial syncs ------------------------------------------------------------------------------------
def changed_scenario():
    old = overall_ports()
    new = list(old)
    new[0] = replace(old[0], endpoints=old[0].endpoints + (ep("10.180.3.1"),))       # svc1 grows
    new[3] = replace(old[3], endpoints=old[3].endpoints[:1])                        # svc4 shrinks
    new[4] = replace(old[4], affinity_timeout=None)                                 # svc5 drops affinity
    new[1] = replace(old[1], endpoints=())                                          # svc2 loses all
    del new[5]                                                                      # svc6 deleted
    changed = {port_key(p) for p in (old[0], old[1], old[3], old[4], old[5])}
    return old, new, changed


def test_partial_sync_writes_only_changed_chains_and_ends_where_a_full_sync_does():
    old, new, changed = changed_scenario()
    before, after = render(old, NODE), render(new, NODE)
    kernel = Table().run(transaction(before, NODE).text)
    tx = transaction(after, NODE, previous=before, changed=changed)
    assert not tx.full and "svc3" not in tx.text               # untouched service: not written
    assert "filter-input" not in tx.text                       # no skeleton
    assert f"delete chain {T} endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80" in tx.text
    assert f"delete set {T} affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80" in tx.text
    assert f"delete element {T} cluster-ips {{ 172.30.0.46 }}" in tx.text
    assert "goto reject-chain" in tx.text                      # svc2 now rejects
    kernel.run(tx.text)
    assert kernel.snapshot() == Table().run(transaction(after, NODE).text).snapshot()
    golden = GOLDEN / "partial.nft"                    # like upstream's TestSyncProxyRulesRepeated
    if UPDATE:
        golden.write_text(tx.text)
    assert tx.text == golden.read_text()


def test_partial_sync_without_changes_writes_nothing():
    state = render(overall_ports(), NODE)
    assert transaction(state, NODE, previous=state, changed=set()).text == ""


def test_full_sync_deletes_chains_and_sets_listed_from_the_kernel():
    old, new, _ = changed_scenario()
    kernel = Table().run(full(old))
    tx = transaction(render(new, NODE), NODE, existing_chains=set(kernel.chains), existing_sets=set(kernel.sets))
    kernel.run(tx.text)
    assert kernel.snapshot() == Table().run(full(new)).snapshot()
    assert not any(c.startswith("endpoint-") and "ns6" in c for c in kernel.chains)


# -- the CLI ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["node-1", "node-2", "node-3"])
def test_demo_render_matches_golden(capsys, node):
    argv = ["proxy", "render", str(REPO / "topologies" / "demo.yaml"), "--node", node, "--mode", "nftables"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0 and capsys.readouterr().out == first
    golden = GOLDEN / f"demo-{node}.nft"
    if UPDATE:
        golden.write_text(first)
    assert first == golden.read_text()
    assert "ip daddr { 10.96.0.0/12 } drop" in first            # the demo's service CIDR
    Table().run(first)
