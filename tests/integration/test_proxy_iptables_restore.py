"""The rendered kube-proxy rules load into a real kernel, with both iptables back ends.

Each test gets a throw-away network namespace (``nstest-kp-<pid>-<tag>``, deleted by the
fixture's finalizer), loads ``render()``'s output with ``iptables-{nft,legacy}-restore
--noflush --counters`` as the agent does, and reads it back with ``iptables-save``: the
kernel's canonical forms must appear, every chain render() reports must exist and the
rule count must match. A partial sync on top must delete the stale chains. The last test
loads 10,000 services × 2 endpoints, then a one-Service partial sync on top.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import replace

import pytest

from netsim.proxy.iptables import (endpoint_chain_suffix, jump_rules, port_key, render,
                                   service_chain_suffix)
from netsim.proxy.model import NodeContext, ServicePort
from netsim.proxy.synthetic import synthetic_ports
from netsim.proxy.synthetic import endpoint as ep, service_port as sp

pytestmark = pytest.mark.root

NODE = NodeContext("test-node", ("192.168.0.2",), "10.0.0.0/8")
BACKENDS = {"nft": ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"),
            "legacy": ("iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")}




def sample_ports() -> list[ServicePort]:
    """Every rule shape: the worked example, eTP=Local, LB with source ranges and affinity,
    three endpoints, UDP, iTP=Local without local endpoints, no endpoints at all."""
    return [
        sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1", node="test-node"), ep("10.180.2.1", node="node-2"),
           node_port=30080),
        sp("ns2", "svc2", "172.30.0.42", ep("10.180.0.2", node="test-node"), ep("10.180.2.2", node="node-2"),
           node_port=30081, load_balancer_ips=("1.2.3.4",), external_ips=("192.168.99.22",),
           external_policy_local=True),
        sp("ns5", "svc5", "172.30.0.45", ep("10.180.0.3"), ep("10.180.0.4"), ep("10.180.0.5"), node_port=30082,
           load_balancer_ips=("5.6.7.8",), load_balancer_source_ranges=("203.0.113.0/25", "192.168.0.0/24"),
           affinity_timeout=10800),
        sp("kube-system", "kube-dns", "172.30.0.10", ep("10.180.0.7", 53), port_name="dns", proto="UDP", port=53),
        sp("ns7", "svc7", "172.30.0.47", ep("10.180.2.7", node="node-2"), internal_policy_local=True),
        sp("ns6", "svc6", "172.30.0.46", node_port=30086, external_ips=("192.168.99.46",)),
    ]


@pytest.fixture
def netns(request):
    """A factory of throw-away network namespaces, all deleted when the test ends."""
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"nstest-kp-{os.getpid()}-{tag}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        made.append(name)
        return name

    def cleanup():
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    request.addfinalizer(cleanup)
    return make


def in_ns(ns: str, argv: list[str], input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns] + argv, input=input, text=True, capture_output=True)


def load(ns: str, backend: str, text: str) -> float:
    """``iptables-restore --noflush --counters`` in ``ns``; returns the seconds it took."""
    t0 = time.perf_counter()
    done = in_ns(ns, [BACKENDS[backend][1], "--noflush", "--counters"], input=text)
    took = time.perf_counter() - t0
    assert done.returncode == 0, f"{BACKENDS[backend][1]} failed: {done.stderr}"
    return took


def save(ns: str, backend: str) -> dict[str, str]:
    out = {}
    for table in ("filter", "nat", "mangle"):
        done = in_ns(ns, [BACKENDS[backend][2], "-t", table])
        assert done.returncode == 0, done.stderr
        out[table] = done.stdout
    return out


def kube_chains(dump: str) -> set[str]:
    return {m for m in re.findall(r"^:(\S+)", dump, re.M) if m.startswith("KUBE-")}


def kube_rules(dump: str) -> list[str]:
    return [line for line in dump.splitlines() if line.startswith("-A KUBE-")]


def ensure_jumps(ns: str, backend: str) -> None:
    """What the agent does on a full sync: ``-C``, and ``-I`` if missing."""
    iptables = BACKENDS[backend][0]
    for table, chain, words in jump_rules():
        if in_ns(ns, [iptables, "-w", "-t", table, "-C", chain] + words).returncode != 0:
            done = in_ns(ns, [iptables, "-w", "-t", table, "-I", chain] + words)
            assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_rendered_rules_load_and_read_back_canonically(backend, netns):
    ns = netns(backend)
    ports = sample_ports()
    rs = render(ports, NODE)
    load(ns, backend, rs.text)
    ensure_jumps(ns, backend)
    ensure_jumps(ns, backend)                 # idempotent: -C finds them the second time
    dump = save(ns, backend)
    nat, filt = dump["nat"], dump["filter"]

    # every chain render() reports exists, and nothing else of ours
    for table in ("filter", "nat", "mangle"):
        assert kube_chains(dump[table]) == set(rs.chains_by_table[table]), table
    assert len(kube_rules(nat)) + len(kube_rules(filt)) == rs.rule_count

    h1 = service_chain_suffix("ns1/svc1:p80", "tcp")
    sep1 = "KUBE-SEP-" + endpoint_chain_suffix("ns1/svc1:p80", "tcp", "10.180.0.1:80")
    # the kernel's canonical forms (reference 1.9 (b))
    assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in nat
    assert "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0" in nat
    assert "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN" in nat
    assert ('-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully") in nat
    assert (f'-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" '
            f"-m tcp --dport 80 -j KUBE-SVC-{h1}") in nat
    assert (f'-A KUBE-SVC-{h1} ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment '
            f'"ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ') in nat
    assert (f'-A KUBE-SVC-{h1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random '
            f"--probability 0.50000000000 -j {sep1}") in nat
    assert f'-A {sep1} -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ' in nat
    assert (f'-A {sep1} -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT '
            "--to-destination 10.180.0.1:80") in nat
    assert (f'-A KUBE-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 30080 '
            f"-j KUBE-EXT-{h1}") in nat
    assert "--probability 0.33333333349" in nat                         # 1/3 as lround(p * 2^31)
    assert re.search(r"-m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-\S+ "
                     r"--mask 255\.255\.255\.255 --rsource -j KUBE-SEP-", nat)
    assert re.search(r'-A (KUBE-SEP-\S+) -p tcp -m comment --comment "ns5/svc5:p80" -m recent --set --name \1 '
                     r"--mask 255\.255\.255\.255 --rsource -m tcp -j DNAT --to-destination 10\.180\.0\.3:80", nat)
    assert "-p udp -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp --dport 53" in nat
    # filter: REJECT / DROP, the firewall, the jumps from the built-in chains
    assert ('-A KUBE-SERVICES -d 172.30.0.46/32 -p tcp -m comment --comment "ns6/svc6:p80 has no endpoints" '
            "-m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable") in filt
    assert ('-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns6/svc6:p80 has no endpoints" '
            "-m addrtype --dst-type LOCAL -m tcp --dport 30086 -j REJECT") in filt
    assert ('-A KUBE-SERVICES -d 172.30.0.47/32 -p tcp -m comment --comment "ns7/svc7:p80 has no local endpoints" '
            "-m tcp --dport 80 -j DROP") in filt
    assert re.search(r'-A KUBE-PROXY-FIREWALL -d 5\.6\.7\.8/32 -p tcp -m comment --comment "ns5/svc5:p80 traffic '
                     r'not accepted by KUBE-FW-\S+" -m tcp --dport 80 -j DROP', filt)
    assert '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat
    assert '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING' in nat
    assert ('-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
            'portals" -j KUBE-EXTERNAL-SERVICES') in filt
    assert len(re.findall(r"^-A (?:INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) ", nat + filt, re.M)) == len(
        jump_rules())

    # a partial sync on top: svc1 loses an endpoint, svc5 goes away
    svc1 = replace(ports[0], endpoints=ports[0].endpoints[:1])
    changed = {port_key(svc1), port_key(ports[2])}
    ports2 = [svc1] + ports[1:2] + ports[3:]
    partial = render(ports2, NODE, changed=changed, existing_chains=rs.chains)
    gone = "KUBE-SEP-" + endpoint_chain_suffix("ns1/svc1:p80", "tcp", "10.180.2.1:80")
    h5 = service_chain_suffix("ns5/svc5:p80", "tcp")
    assert gone in partial.stale and f"KUBE-FW-{h5}" in partial.stale
    load(ns, backend, partial.text)
    after = save(ns, backend)
    for table in ("filter", "nat"):
        assert kube_chains(after[table]) == set(partial.chains_by_table[table]), table
    assert gone not in after["nat"] and h5 not in after["nat"] and h5 not in after["filter"]
    assert len(kube_rules(after["nat"])) + len(kube_rules(after["filter"])) == partial.rule_count
    # the result is what a full sync of the same services loads
    full = render(ports2, NODE)
    ns2 = netns(backend + "-full")
    load(ns2, backend, full.text)
    ref = save(ns2, backend)
    for table in ("filter", "nat"):
        assert sorted(kube_rules(after[table])) == sorted(kube_rules(ref[table])), table
    # the canary survives a partial sync (it is only declared on full syncs)
    assert ":KUBE-PROXY-CANARY" in after["mangle"]


def test_10k_services_load_and_partial_sync(netns, record_property):
    """10,000 Services load in one restore and a one-Service partial sync on top writes only
    that Service's chains (timings are recorded; benchmarks/proxy_scale.py compares them)."""
    ports = synthetic_ports(10_000)
    t0 = time.perf_counter()
    rs = render(ports, NODE)
    render_s = time.perf_counter() - t0
    ns = netns("big")
    restore_s = load(ns, "legacy", rs.text)
    dump = save(ns, "legacy")
    rules = len(kube_rules(dump["nat"])) + len(kube_rules(dump["filter"]))
    assert rules == rs.rule_count == 9 + 10_000 * 8
    # a partial sync touching one service
    t0 = time.perf_counter()
    partial = render(ports, NODE, changed={port_key(ports[0])}, existing_chains=rs.chains)
    partial_render_s = time.perf_counter() - t0
    partial_restore_s = load(ns, "legacy", partial.text)
    summary = (f"10k services x 2 endpoints: {rs.rule_count} rules, {len(rs.text) / 1e6:.1f} MB; "
               f"render {render_s:.3f}s, iptables-legacy-restore {restore_s:.3f}s; "
               f"partial sync: render {partial_render_s:.3f}s ({partial.rules_written} rules written), "
               f"restore {partial_restore_s:.3f}s")
    print(summary)
    record_property("timing", summary)
    # upstream rewrites the top-level chains (one KUBE-SERVICES rule per Service) on every
    # sync; of the per-service chains only svc0's are written
    assert 10_000 < partial.rules_written < 10_000 + 20, summary
    dump = save(ns, "legacy")
    assert len(kube_rules(dump["nat"])) + len(kube_rules(dump["filter"])) == partial.rule_count
