"""kube-proxy's iptables rules (netsim.proxy.iptables), checked against upstream.

Fixture conventions are upstream's (pkg/proxy/iptables/proxier_test.go): node ``test-node``
= 192.168.0.2, pod CIDR 10.0.0.0/8, ClusterIPs 172.30.0.x, endpoints 10.180.x.y. Goldens
live in tests/golden/iptables/ and are compared after the normalisation upstream's
``sortIPTablesRules`` applies (KUBE-NODEPORTS and KUBE-SERVICES first, other chains
alphabetically, rule order within a chain kept; KUBE-SERVICES/KUBE-NODEPORTS rules ordered
by service, the NodePort catch-all last). Regenerate after a deliberate change with

    NETSIM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_proxy_iptables.py

and review the diff. Every rendered case also goes through a small in-memory
``iptables-restore --noflush`` and a consistency check (every jump target exists, no
per-service chain is left unreferenced), like upstream's ``checkIPTablesRuleJumps``.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from netsim.proxy.iptables import (TOP_LEVEL_CHAINS, Ruleset, endpoint_chain_suffix, is_service_chain,
                                   jump_rules, port_key, probability, render, service_chain_suffix)
from netsim.proxy.model import Endpoint, NodeContext, ServicePort
from netsim.proxy.synthetic import endpoint as ep, service_port as sp

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "iptables"
UPDATE = os.environ.get("NETSIM_UPDATE_GOLDEN") == "1"

NODE = NodeContext("test-node", ("192.168.0.2",), "10.0.0.0/8")
NODE_NO_RANDOM_FULLY = replace(NODE, random_fully=False)     # upstream's fake iptables


@dataclass(frozen=True)
class HCServicePort(ServicePort):
    """A ServicePort carrying a health-check node port (read by render() when present)."""
    health_check_node_port: int | None = None




# -- restore-text helpers: parse, normalise, simulate, check ---------------------------------
def parse(text: str) -> dict[str, dict]:
    """Restore text → {table: {"decl": [chains], "rules": {chain: [rule]}, "delete": [chains]}}."""
    tables: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], {"decl": [], "rules": {}, "delete": []})
        elif line == "COMMIT":
            cur = None
        elif line.startswith(":"):
            name = line[1:].split()[0]
            cur["decl"].append(name)
            cur["rules"].setdefault(name, [])
        elif line.startswith("-A "):
            chain = line.split()[1]
            cur["rules"].setdefault(chain, []).append(line)
        elif line.startswith("-X "):
            cur["delete"].append(line.split()[1])
        else:
            raise AssertionError(f"unexpected restore line: {line!r}")
    return tables


def _spn_of(rule: str) -> str:
    m = re.search(r'--comment (?:"([^"]*)"|(\S+))', rule)
    return (m.group(1) or m.group(2)).split(" ")[0] if m else ""


def normalise(text: str, drop_canary: bool = True) -> str:
    """upstream ``sortIPTablesRules``. The canary chain is dropped: upstream creates it with
    ``iptables -N`` outside the restore, so its fixtures never show it."""
    out = []
    for tname, t in sorted(parse(text).items()):
        chains = [c for c in dict.fromkeys(t["decl"] + list(t["rules"]))
                  if not (drop_canary and c == "KUBE-PROXY-CANARY")]
        if not chains and not t["delete"]:
            continue

        def order(c):
            return (0, "") if c == "KUBE-NODEPORTS" else (1, "") if c == "KUBE-SERVICES" else (2, c)
        chains.sort(key=order)
        out.append(f"*{tname}")
        out += [f":{c} - [0:0]" for c in chains]
        for c in chains:
            rules = list(t["rules"].get(c, []))
            if c in ("KUBE-SERVICES", "KUBE-NODEPORTS"):
                last = [r for r in rules if "must be the last rule" in r]
                rules = sorted((r for r in rules if r not in last), key=_spn_of) + last
            out += rules
        out += [f"-X {c}" for c in sorted(t["delete"])]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def restore(state: dict[str, dict[str, list[str]]], text: str) -> dict[str, dict[str, list[str]]]:
    """Apply ``text`` as ``iptables-restore --noflush`` would to ``state`` ({table: {chain:
    [rules]}}, user chains only): a declaration creates or flushes a chain, ``-A`` appends,
    ``-X`` deletes (the chain must be empty and unreferenced after the restore)."""
    state = {t: {c: list(r) for c, r in chains.items()} for t, chains in state.items()}
    for tname, t in parse(text).items():
        chains = state.setdefault(tname, {})
        for c in t["decl"]:
            chains[c] = []
        for c, rules in t["rules"].items():
            assert c in chains, f"{tname}: -A to undeclared chain {c}"
            if c in t["decl"]:
                chains[c] = list(rules)
            else:
                chains[c] += rules
        for c in t["delete"]:
            assert c in t["decl"], f"{tname}: -X {c} without flushing it first"
            assert not chains[c], f"{tname}: -X of non-empty {c}"
            del chains[c]
    return state


def _targets(rule: str) -> list[str]:
    return re.findall(r"-[jg] (KUBE-\S+)", rule)


def check_consistency(state: dict[str, dict[str, list[str]]]) -> None:
    """Every ``-j KUBE-...`` target exists in its table; every declared per-service chain
    is referenced (top-level chains are reached from the built-in chains)."""
    for tname, chains in state.items():
        referenced = set()
        for c, rules in chains.items():
            for r in rules:
                for target in _targets(r):
                    assert target in chains, f"{tname}/{c}: jump to undeclared {target}: {r}"
                    referenced.add(target)
        for c in chains:
            if c not in TOP_LEVEL_CHAINS:
                assert c in referenced, f"{tname}: chain {c} is declared but never referenced"


def full_state(rs: Ruleset) -> dict:
    state = restore({}, rs.text)
    check_consistency(state)
    return state


def nat(rs: Ruleset) -> dict[str, list[str]]:
    return parse(rs.text)["nat"]["rules"]


def filt(rs: Ruleset) -> dict[str, list[str]]:
    return parse(rs.text)["filter"]["rules"]


def check_golden(name: str, rs: Ruleset) -> None:
    path = GOLDEN / name
    got = normalise(rs.text)
    if UPDATE:
        header = [line for line in path.read_text().splitlines() if line.startswith("#")] if path.exists() else []
        path.write_text("".join(h + "\n" for h in header) + got)
    assert path.exists(), f"no golden {path}: run with NETSIM_UPDATE_GOLDEN=1 and review it"
    assert got == normalise(path.read_text())


# -- hashing ---------------------------------------------------------------------------------
def test_chain_name_hashes_match_the_reference_check_values():
    assert service_chain_suffix("ns1/svc1:p80", "tcp") == "XPGD46QRK7WJZT7O"
    assert endpoint_chain_suffix("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "SXIVWICOYRO3J4NJ"
    assert endpoint_chain_suffix("ns1/svc1:p80", "tcp", "10.180.2.1:80") == "ZX7GRIZKSNUQ3LAJ"
    assert service_chain_suffix("default/kubernetes:https", "tcp") == "NPX46M4PTMTKRN6Y"
    # kube-dns chains as seen on a real (kubeadm) cluster
    assert service_chain_suffix("kube-system/kube-dns:dns", "udp") == "TCOU7JCQXEZGVUNU"
    assert service_chain_suffix("kube-system/kube-dns:dns-tcp", "tcp") == "ERIFXISQEP7F7OF4"
    assert service_chain_suffix("kube-system/kube-dns:metrics", "tcp") == "JD5MR3NA4I4DYORP"
    # protocol is part of the hash, and is lower-cased
    assert service_chain_suffix("ns1/svc1:p80", "TCP") == "XPGD46QRK7WJZT7O"
    assert service_chain_suffix("ns1/svc1:p80", "udp") != "XPGD46QRK7WJZT7O"


def test_port_key_is_spn_plus_protocol():
    assert port_key(sp("ns1", "svc1", "172.30.0.41")) == "ns1/svc1:p80tcp"
    assert port_key(sp("ns1", "svc1", "172.30.0.41", port_name="")) == "ns1/svc1tcp"


# -- goldens ---------------------------------------------------------------------------------
def worked_example() -> list[ServicePort]:
    return [sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1", node="test-node"), ep("10.180.2.1", node="node-2"),
               node_port=30080)]


def test_worked_example_golden():
    rs = render(worked_example(), NODE)
    full_state(rs)
    check_golden("worked-example.rules", rs)
    assert rs.full and rs.stale == ()
    assert rs.rule_count == rs.rules_written == 20


def overall_ports() -> list[ServicePort]:
    """upstream TestOverallIPTablesRules: svc1-svc6."""
    return [
        # svc1: plain ClusterIP
        sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1")),
        # svc2: LoadBalancer, eTP=Local, with an externalIP and a health-check node port; its
        # only endpoint has no nodeName, so it is not local.
        sp("ns2", "svc2", "172.30.0.42", ep("10.180.0.2"), cls=HCServicePort, node_port=3001,
           load_balancer_ips=("1.2.3.4",), external_ips=("192.168.99.22",), external_policy_local=True,
           health_check_node_port=30000),
        # svc3: NodePort
        sp("ns3", "svc3", "172.30.0.43", ep("10.180.0.3"), node_port=3003),
        # svc4: externalIP (type NodePort in upstream, but no node port allocated)
        sp("ns4", "svc4", "172.30.0.44", ep("10.180.0.4"), ep("10.180.0.5", node="test-node"),
           external_ips=("192.168.99.33",)),
        # svc5: LoadBalancer, eTP=Cluster, source ranges (note the whitespace), ClientIP affinity;
        # upstream sets a health-check port too, which kube-proxy ignores for eTP=Cluster.
        sp("ns5", "svc5", "172.30.0.45", ep("10.180.0.3"), node_port=3002, load_balancer_ips=("5.6.7.8",),
           load_balancer_source_ranges=(" 203.0.113.0/25",), affinity_timeout=10800),
        # svc6: no endpoints
        sp("ns6", "svc6", "172.30.0.46"),
    ]


def test_overall_iptables_rules_golden():
    rs = render(overall_ports(), NODE_NO_RANDOM_FULLY)
    full_state(rs)
    check_golden("overall.rules", rs)


def test_output_is_deterministic_and_independent_of_input_order():
    ports = overall_ports()
    a = render(ports, NODE)
    b = render(list(reversed(ports)), NODE)
    assert a.text == b.text
    # KUBE-SERVICES is already in SPN order, the NodePort catch-all last
    services = nat(a)["KUBE-SERVICES"]
    assert [_spn_of(r) for r in services[:-1]] == sorted(_spn_of(r) for r in services[:-1])
    assert "must be the last rule" in services[-1]


def test_restore_text_shape():
    rs = render(worked_example(), NODE)
    text = rs.text
    assert text.endswith("COMMIT\n")
    sections = re.findall(r"^\*(\w+)$", text, re.M)
    assert sections == ["mangle", "filter", "nat"]
    for table in ("mangle", "filter", "nat"):
        assert "KUBE-PROXY-CANARY" in parse(text)[table]["decl"]
        assert "KUBE-PROXY-CANARY" in rs.chains_by_table[table]
    # every declaration of a table precedes its rules
    for block in re.findall(r"^\*\w+\n(.*?)^COMMIT$", text, re.M | re.S):
        kinds = [line[0] for line in block.splitlines()]
        assert kinds == sorted(kinds, key=lambda k: {":": 0, "-": 1}[k])
    assert "MASQUERADE --random-fully" in text
    assert "MASQUERADE --random-fully" not in render(worked_example(), NODE_NO_RANDOM_FULLY).text


# -- load balancing --------------------------------------------------------------------------
def test_probabilities_for_three_endpoints():
    assert [probability(n) for n in (1, 2, 3, 4)] == ["1.0000000000", "0.5000000000", "0.3333333333",
                                                     "0.2500000000"]
    p = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1"), ep("10.180.0.2"), ep("10.180.0.3"))
    rs = render([p], NODE)
    full_state(rs)
    svc = nat(rs)["KUBE-SVC-" + service_chain_suffix("ns1/svc1:p80", "tcp")]
    assert "! -s 10.0.0.0/8 -j KUBE-MARK-MASQ" in svc[0]
    assert "--probability 0.3333333333 -j KUBE-SEP-" in svc[1] and '"ns1/svc1:p80 -> 10.180.0.1:80"' in svc[1]
    assert "--probability 0.5000000000 -j KUBE-SEP-" in svc[2] and '"ns1/svc1:p80 -> 10.180.0.2:80"' in svc[2]
    assert "statistic" not in svc[3] and '"ns1/svc1:p80 -> 10.180.0.3:80"' in svc[3]
    assert len(svc) == 4


def test_endpoints_are_ordered_by_their_ip_port_string():
    # "10.180.10.1:80" < "10.180.2.1:80" as strings; the model's order is not trusted
    p = replace(sp("ns1", "svc1", "172.30.0.41"), endpoints=(ep("10.180.2.1"), ep("10.180.10.1")))
    svc = nat(render([p], NODE))["KUBE-SVC-" + service_chain_suffix("ns1/svc1:p80", "tcp")]
    assert "10.180.10.1:80" in svc[1] and "0.5000000000" in svc[1]
    assert "10.180.2.1:80" in svc[2]


def test_session_affinity_rules():
    p = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1"), ep("10.180.0.2"), affinity_timeout=600)
    rs = render([p], NODE)
    full_state(rs)
    rules = nat(rs)
    svc = rules["KUBE-SVC-" + service_chain_suffix("ns1/svc1:p80", "tcp")]
    sep1 = "KUBE-SEP-" + endpoint_chain_suffix("ns1/svc1:p80", "tcp", "10.180.0.1:80")
    sep2 = "KUBE-SEP-" + endpoint_chain_suffix("ns1/svc1:p80", "tcp", "10.180.0.2:80")
    assert svc[1].endswith(f"-m recent --name {sep1} --rcheck --seconds 600 --reap -j {sep1}")
    assert svc[2].endswith(f"-m recent --name {sep2} --rcheck --seconds 600 --reap -j {sep2}")
    assert "--probability 0.5000000000" in svc[3] and svc[4].endswith(f"-j {sep2}")
    assert rules[sep1][1] == (f"-A {sep1} -m comment --comment ns1/svc1:p80 -m recent --name {sep1} --set "
                              "-m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80")


def test_udp_and_tcp_ports_with_the_same_name_get_different_chains():
    tcp = sp("kube-system", "kube-dns", "172.30.0.10", ep("10.180.0.7", 53), port_name="dns", port=53)
    udp = replace(tcp, protocol="UDP")
    rs = render([tcp, udp], NODE)
    full_state(rs)
    rules = nat(rs)
    h_udp = service_chain_suffix("kube-system/kube-dns:dns", "udp")
    h_tcp = service_chain_suffix("kube-system/kube-dns:dns", "tcp")
    assert h_udp != h_tcp
    assert (f'-A KUBE-SERVICES -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp -p udp '
            f"-d 172.30.0.10 --dport 53 -j KUBE-SVC-{h_udp}") in rules["KUBE-SERVICES"]
    sep = "KUBE-SEP-" + endpoint_chain_suffix("kube-system/kube-dns:dns", "udp", "10.180.0.7:53")
    assert rules[sep][1].endswith("-m udp -p udp -j DNAT --to-destination 10.180.0.7:53")


# -- traffic policies --------------------------------------------------------------------------
H = service_chain_suffix("ns1/svc1:p80", "tcp")


def local_svc(*eps: Endpoint, **kw) -> ServicePort:
    return sp("ns1", "svc1", "172.30.0.41", *eps, node_port=3001, load_balancer_ips=("1.2.3.4",),
              external_policy_local=True, **kw)


def test_external_traffic_policy_local_with_local_endpoints():
    p = local_svc(ep("10.180.0.1", node="test-node"), ep("10.180.2.1", node="node-2"))
    rs = render([p], NODE)
    full_state(rs)
    rules = nat(rs)
    assert rules[f"KUBE-EXT-{H}"] == [
        f'-A KUBE-EXT-{H} -m comment --comment "pod traffic for ns1/svc1:p80 external destinations" '
        f"-s 10.0.0.0/8 -j KUBE-SVC-{H}",
        f'-A KUBE-EXT-{H} -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" '
        "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
        f'-A KUBE-EXT-{H} -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" '
        f"-m addrtype --src-type LOCAL -j KUBE-SVC-{H}",
        f"-A KUBE-EXT-{H} -j KUBE-SVL-{H}",
    ]
    # KUBE-SVL: only the local endpoint, no masquerade rule (used only externally)
    sep_local = "KUBE-SEP-" + endpoint_chain_suffix("ns1/svc1:p80", "tcp", "10.180.0.1:80")
    assert rules[f"KUBE-SVL-{H}"] == [
        f'-A KUBE-SVL-{H} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j {sep_local}']
    # KUBE-SVC: both endpoints, with the cluster-IP masquerade rule
    assert len(rules[f"KUBE-SVC-{H}"]) == 3 and "! -s 10.0.0.0/8" in rules[f"KUBE-SVC-{H}"][0]
    assert not any(filt(rs)[c] for c in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"))
    assert f"-j KUBE-EXT-{H}" in rules["KUBE-SERVICES"][1] and '"ns1/svc1:p80 loadbalancer IP"' in rules["KUBE-SERVICES"][1]


def test_external_traffic_policy_local_without_local_endpoints():
    p = local_svc(ep("10.180.2.1", node="node-2"))
    rs = render([p], NODE)
    full_state(rs)
    rules = nat(rs)
    assert len(rules[f"KUBE-EXT-{H}"]) == 3                 # short-circuits, no jump to KUBE-SVL
    assert f"KUBE-SVL-{H}" not in rules and f"KUBE-SVL-{H}" not in rs.chains
    assert filt(rs)["KUBE-EXTERNAL-SERVICES"] == [
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp '
        "-d 1.2.3.4 --dport 80 -j DROP",
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" '
        "-m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP",
    ]
    assert filt(rs)["KUBE-SERVICES"] == []                   # cluster IP still works


def test_internal_traffic_policy_local():
    local = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1", node="test-node"), ep("10.180.2.1", node="node-2"),
               internal_policy_local=True)
    rs = render([local], NODE)
    full_state(rs)
    rules = nat(rs)
    assert rules["KUBE-SERVICES"][0].endswith(f"-d 172.30.0.41 --dport 80 -j KUBE-SVL-{H}")
    assert rules[f"KUBE-SVL-{H}"][0].endswith("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ")
    assert len(rules[f"KUBE-SVL-{H}"]) == 2 and f"KUBE-SVC-{H}" not in rules
    assert len([c for c in rules if c.startswith("KUBE-SEP-")]) == 1

    remote = replace(local, endpoints=(ep("10.180.2.1", node="node-2"),))
    rs = render([remote], NODE)
    full_state(rs)
    assert filt(rs)["KUBE-SERVICES"] == [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp '
        "-d 172.30.0.41 --dport 80 -j DROP"]
    assert len(nat(rs)["KUBE-SERVICES"]) == 1                # only the NodePort catch-all
    assert not any(c.startswith(("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-")) for c in rs.chains)


def test_internal_local_external_cluster_masquerades_only_in_the_internal_chain():
    p = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1", node="test-node"), ep("10.180.2.1", node="node-2"),
           internal_policy_local=True, node_port=3001)
    rs = render([p], NODE)
    full_state(rs)
    rules = nat(rs)
    assert "cluster IP" not in rules[f"KUBE-SVC-{H}"][0]      # KUBE-SVC only serves external traffic
    assert len(rules[f"KUBE-SVC-{H}"]) == 2
    assert "! -s 10.0.0.0/8 -j KUBE-MARK-MASQ" in rules[f"KUBE-SVL-{H}"][0]
    assert rules[f"KUBE-EXT-{H}"][-1] == f"-A KUBE-EXT-{H} -j KUBE-SVC-{H}"


def test_terminating_endpoints_are_a_fallback():
    serving = dict(ready=False, serving=True, terminating=True)
    p = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1", **serving), ep("10.180.0.2", ready=False, serving=False,
                                                                          terminating=True))
    rs = render([p], NODE)
    full_state(rs)
    svc = nat(rs)[f"KUBE-SVC-{H}"]
    assert len(svc) == 2 and "10.180.0.1:80" in svc[1]
    # a ready endpoint wins over serving-terminating ones
    q = replace(p, endpoints=p.endpoints + (ep("10.180.0.3"),))
    svc = nat(render([q], NODE))[f"KUBE-SVC-{H}"]
    assert len(svc) == 2 and "10.180.0.3:80" in svc[1]
    # nothing serving: REJECT
    r = replace(p, endpoints=(ep("10.180.0.2", ready=False, serving=False, terminating=True),))
    rs = render([r], NODE)
    full_state(rs)
    assert filt(rs)["KUBE-SERVICES"][0].endswith("-j REJECT") and "has no endpoints" in filt(rs)["KUBE-SERVICES"][0]


def test_no_endpoints_rejects_every_address():
    p = sp("ns1", "svc1", "172.30.0.41", node_port=3001, external_ips=("192.168.99.11",),
           load_balancer_ips=("1.2.3.4",), load_balancer_source_ranges=("203.0.113.0/25",))
    rs = render([p], NODE)
    full_state(rs)
    c = '"ns1/svc1:p80 has no endpoints"'
    assert filt(rs)["KUBE-SERVICES"] == [
        f"-A KUBE-SERVICES -m comment --comment {c} -m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT"]
    assert filt(rs)["KUBE-EXTERNAL-SERVICES"] == [
        f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {c} -m tcp -p tcp -d 192.168.99.11 --dport 80 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {c} -m tcp -p tcp -d 1.2.3.4 --dport 80 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {c} -m addrtype --dst-type LOCAL -m tcp -p tcp "
        "--dport 3001 -j REJECT",
    ]
    assert filt(rs)["KUBE-PROXY-FIREWALL"] == []             # no FW chain without endpoints
    assert not any(is_service_chain(c) for c in rs.chains)   # no nat chains at all
    assert len(nat(rs)["KUBE-SERVICES"]) == 1 and nat(rs)["KUBE-NODEPORTS"] == []


# -- load-balancer source ranges ------------------------------------------------------------------
def test_source_ranges_containing_a_node_ip_allow_the_lb_ips():
    p = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1"), node_port=3001, load_balancer_ips=("1.2.3.4", "5.6.7.8"),
           load_balancer_source_ranges=("192.168.0.0/24", " 203.0.113.0/25", "not-a-cidr", "2001:db8::/64"))
    rs = render([p], NODE)
    full_state(rs)
    base = f'-A KUBE-FW-{H} -m comment --comment "ns1/svc1:p80 loadbalancer IP"'
    assert nat(rs)[f"KUBE-FW-{H}"] == [
        f"{base} -s 192.168.0.0/24 -j KUBE-EXT-{H}",
        f"{base} -s 203.0.113.0/25 -j KUBE-EXT-{H}",
        f"{base} -s 1.2.3.4 -j KUBE-EXT-{H}",
        f"{base} -s 5.6.7.8 -j KUBE-EXT-{H}",
        f'-A KUBE-FW-{H} -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"',
    ]
    assert filt(rs)["KUBE-PROXY-FIREWALL"] == [
        f'-A KUBE-PROXY-FIREWALL -m comment --comment "ns1/svc1:p80 traffic not accepted by KUBE-FW-{H}" '
        f"-m tcp -p tcp -d {ip} --dport 80 -j DROP" for ip in ("1.2.3.4", "5.6.7.8")]
    assert all(f"-j KUBE-FW-{H}" in r for r in nat(rs)["KUBE-SERVICES"] if "loadbalancer IP" in r)
    # NodePorts are not subject to source ranges
    assert nat(rs)["KUBE-NODEPORTS"][0].endswith(f"-j KUBE-EXT-{H}")


def test_allow_all_source_range_disables_the_firewall():
    p = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1"), load_balancer_ips=("1.2.3.4",),
           load_balancer_source_ranges=("203.0.113.0/25", "0.0.0.0/0"))
    rs = render([p], NODE)
    full_state(rs)
    assert f"KUBE-FW-{H}" not in rs.chains and filt(rs)["KUBE-PROXY-FIREWALL"] == []


# -- node options ----------------------------------------------------------------------------------
def test_localhost_nodeports_disabled():
    rs = render(worked_example(), replace(NODE, localhost_nodeports=False))
    full_state(rs)
    assert nat(rs)["KUBE-SERVICES"][-1] == (
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
        'in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS')
    assert "KUBE-FIREWALL" not in parse(rs.text)["filter"]["decl"]


def test_masquerade_all_and_no_local_detector():
    rs = render(worked_example(), replace(NODE, pod_cidr=""))
    full_state(rs)
    assert "cluster IP" not in nat(rs)[f"KUBE-SVC-{H}"][0]   # no detector: no masquerade rule

    @dataclass(frozen=True)
    class MasqAllNode(NodeContext):
        masquerade_all: bool = True
    rs = render(worked_example(), MasqAllNode("test-node", ("192.168.0.2",), "10.0.0.0/8"))
    assert nat(rs)[f"KUBE-SVC-{H}"][0].endswith("--dport 80 -j KUBE-MARK-MASQ")


# -- large clusters -------------------------------------------------------------------------------
def _many(n_services: int, per: int, affinity: int | None = None) -> list[ServicePort]:
    def ip(k: int) -> str:
        return f"10.180.{k // 250}.{k % 250 + 1}"
    return [sp("ns", f"svc{i}", f"172.30.{i // 250}.{i % 250 + 1}",
               *(ep(ip(i * per + j), node="test-node" if j == 0 else "node-2") for j in range(per)),
               affinity_timeout=affinity)
            for i in range(n_services)]


def test_large_cluster_mode_drops_endpoint_comments():
    small = render(_many(500, 2, affinity=60), NODE)        # exactly 1000 endpoints: comments kept
    assert '-m comment --comment "ns/svc0:p80 -> ' in small.text
    big_ports = _many(500, 2, affinity=60) + [sp("ns", "extra", "172.30.9.9", ep("10.180.9.9"))]
    big = render(big_ports, NODE)
    full_state(big)
    rules = nat(big)
    svc = rules["KUBE-SVC-" + service_chain_suffix("ns/svc0:p80", "tcp")]
    assert "cluster IP" in svc[0]                             # the masquerade rule keeps its comment
    assert all("comment" not in r for r in svc[1:])
    seps = [c for c in rules if c.startswith("KUBE-SEP-")]
    assert all("comment" not in r for c in seps for r in rules[c])
    assert '"ns/extra:p80 cluster IP"' in rules["KUBE-SERVICES"][0]     # KUBE-SERVICES keeps its comments
    sep = "KUBE-SEP-" + endpoint_chain_suffix("ns/svc0:p80", "tcp", "10.180.0.1:80")
    assert rules[sep] == [f"-A {sep} -s 10.180.0.1 -j KUBE-MARK-MASQ",
                          f"-A {sep} -m recent --name {sep} --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80"]


# -- partial syncs (KEP-3453) ------------------------------------------------------------------------
def _strip_canary(state):
    return {t: {c: r for c, r in chains.items() if c != "KUBE-PROXY-CANARY"} for t, chains in state.items()
            if t != "mangle"}


def test_partial_sync_writes_only_changed_chains_and_deletes_stale_ones():
    a = sp("ns1", "svc1", "172.30.0.41", ep("10.180.0.1"), ep("10.180.2.1"), node_port=3001)
    b = sp("ns2", "svc2", "172.30.0.42", ep("10.180.0.2"), ep("10.180.2.2"))
    c = sp("ns3", "svc3", "172.30.0.43", ep("10.180.0.3"), load_balancer_ips=("5.6.7.8",),
           load_balancer_source_ranges=("203.0.113.0/25",))
    first = render([a, b, c], NODE)
    state = full_state(first)

    # svc2 loses an endpoint, svc3 is deleted, svc1 is untouched
    b2 = replace(b, endpoints=b.endpoints[:1])
    partial = render([a, b2], NODE, changed={port_key(b2), port_key(c)}, existing_chains=first.chains)
    assert not partial.full
    t = parse(partial.text)
    assert "mangle" not in t and "KUBE-PROXY-CANARY" not in t["nat"]["decl"]
    # top-level chains are always rewritten, in both tables
    for chain in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"):
        assert chain in t["nat"]["decl"]
    for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                  "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"):
        assert chain in t["filter"]["decl"]
    # svc1's chains are not mentioned, but its KUBE-SERVICES/KUBE-NODEPORTS rules are there
    ha, hb, hc = (service_chain_suffix(p.spn, "tcp") for p in (a, b, c))
    assert ha not in " ".join(t["nat"]["decl"])
    assert any(f"-j KUBE-SVC-{ha}" in r for r in t["nat"]["rules"]["KUBE-SERVICES"])
    assert any(f"-j KUBE-EXT-{ha}" in r for r in t["nat"]["rules"]["KUBE-NODEPORTS"])
    # svc2's chain is rewritten; its dropped endpoint's chain and all of svc3's are deleted
    assert f"KUBE-SVC-{hb}" in t["nat"]["decl"]
    gone = "KUBE-SEP-" + endpoint_chain_suffix(b.spn, "tcp", "10.180.2.2:80")
    expected_stale = {gone, f"KUBE-SVC-{hc}", f"KUBE-EXT-{hc}", f"KUBE-FW-{hc}",
                      "KUBE-SEP-" + endpoint_chain_suffix(c.spn, "tcp", "10.180.0.3:80")}
    assert set(partial.stale) == expected_stale
    assert set(t["nat"]["delete"]) == expected_stale
    assert all(s in t["nat"]["decl"] for s in expected_stale)
    assert partial.text.index(f"-X {gone}") > partial.text.rindex("-A ")
    assert not (expected_stale & partial.chains)

    # the kernel ends up exactly where a full sync would have put it
    after = restore(state, partial.text)
    check_consistency(after)
    reference = render([a, b2], NODE)
    assert _strip_canary(after) == _strip_canary(full_state(reference))
    assert partial.rule_count == reference.rule_count
    assert partial.rules_written < reference.rules_written
    assert partial.chains == reference.chains


def test_partial_sync_with_nothing_changed_rewrites_only_top_level_chains():
    ports = overall_ports()
    first = render(ports, NODE)
    again = render(ports, NODE, changed=set(), existing_chains=first.chains)
    t = parse(again.text)
    assert all(c in TOP_LEVEL_CHAINS for c in t["nat"]["decl"])
    assert again.stale == () and again.rule_count == first.rule_count and again.chains == first.chains
    after = restore(full_state(first), again.text)
    check_consistency(after)
    assert _strip_canary(after) == _strip_canary(full_state(first))


def test_partial_sync_writes_a_service_whose_chains_are_missing():
    ports = overall_ports()
    first = render(ports, NODE)
    sep = "KUBE-SEP-" + endpoint_chain_suffix("ns1/svc1:p80", "tcp", "10.180.0.1:80")
    again = render(ports, NODE, changed=set(), existing_chains=first.chains - {sep})
    assert f":{sep} - [0:0]" in again.text and f":KUBE-SVC-{H} - [0:0]" in again.text


def test_partial_sync_ignores_chains_that_are_not_kube_proxy_service_chains():
    first = render(worked_example(), NODE)
    existing = first.chains | {"FLANNEL-POSTRTG", "KUBE-MARK-DROP", "KUBE-KUBELET-CANARY"}
    again = render(worked_example(), NODE, changed=set(), existing_chains=existing)
    assert again.stale == ()


# -- consistency checker self-test and jumps ------------------------------------------------------
def test_consistency_checker_catches_mistakes():
    with pytest.raises(AssertionError, match="undeclared"):
        check_consistency({"nat": {"KUBE-SERVICES": ["-A KUBE-SERVICES -j KUBE-SVC-X"]}})
    with pytest.raises(AssertionError, match="never referenced"):
        check_consistency({"nat": {"KUBE-SERVICES": [], "KUBE-SEP-X": []}})


def test_jump_rules():
    jumps = jump_rules()
    assert ("nat", "PREROUTING", ["-m", "comment", "--comment", "kubernetes service portals",
                                  "-j", "KUBE-SERVICES"]) in jumps
    assert ("nat", "POSTROUTING", ["-m", "comment", "--comment", "kubernetes postrouting rules",
                                   "-j", "KUBE-POSTROUTING"]) in jumps
    assert ("filter", "INPUT", ["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                                "kubernetes externally-visible service portals",
                                "-j", "KUBE-EXTERNAL-SERVICES"]) in jumps
    assert ("filter", "INPUT", ["-m", "comment", "--comment", "kubernetes health check service ports",
                                "-j", "KUBE-NODEPORTS"]) in jumps
    assert ("filter", "FORWARD", ["-m", "comment", "--comment", "kubernetes forwarding rules",
                                  "-j", "KUBE-FORWARD"]) in jumps
    assert ("filter", "OUTPUT", ["-j", "KUBE-FIREWALL"]) in jumps
    assert sum(1 for t, c, w in jumps if w[-1] == "KUBE-PROXY-FIREWALL") == 3
    assert len(jumps) == 14
    # every target is a chain render() declares
    rs = render(worked_example(), NODE)
    for table, _, words in jumps:
        assert words[-1] in rs.chains_by_table[table]


# -- speed ------------------------------------------------------------------------------------------
def test_render_10k_services_is_fast():
    ports = _many(10_000, 2)
    t0 = time.perf_counter()
    rs = render(ports, NODE)
    took = time.perf_counter() - t0
    # filter: 3 KUBE-FORWARD + 1 KUBE-FIREWALL; nat: 4 global + the catch-all;
    # per service: KUBE-SERVICES + KUBE-SVC (masquerade + 2) + 2 KUBE-SEP x 2
    assert rs.rule_count == 4 + 5 + 10_000 * (1 + 3 + 2 * 2)
    assert took < 5.0, f"rendering 10k services took {took:.2f}s"      # ~0.1-0.3 s unloaded


def test_full_sync_also_deletes_stale_chains():
    first = render(overall_ports(), NODE)
    rs = render(overall_ports()[1:], NODE, existing_chains=first.chains)
    assert rs.full and set(rs.stale) == {f"KUBE-SVC-{H}", "KUBE-SEP-SXIVWICOYRO3J4NJ"}
    after = restore(full_state(first), rs.text)
    check_consistency(after)
    assert f"KUBE-SVC-{H}" not in after["nat"]


def test_ipv6_forms():
    node = NodeContext("test-node", ("fd00::2",), "fd00:10::/64")
    p = sp("ns1", "svc1", "fd00:172:30::41", ep("fd00:10:180::1"), ep("192.0.2.1"), node_port=3001,
           external_ips=("fd00:99::22", "192.168.99.22"))
    rs = render([p], node)
    full_state(rs)
    rules = nat(rs)
    sep = "KUBE-SEP-" + endpoint_chain_suffix("ns1/svc1:p80", "tcp", "[fd00:10:180::1]:80")
    assert rules[sep][1].endswith("-j DNAT --to-destination [fd00:10:180::1]:80")
    assert rules["KUBE-SERVICES"][-1].endswith("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS")
    assert not any("192.168.99.22" in r for r in rules["KUBE-SERVICES"])      # other family ignored
    assert "192.0.2.1" not in rs.text and "--probability" not in rs.text
    assert "KUBE-FIREWALL" not in parse(rs.text)["filter"]["decl"]            # no localhost NodePorts
    assert rules[f"KUBE-SVC-{H}"][0].endswith("! -s fd00:10::/64 -j KUBE-MARK-MASQ")
