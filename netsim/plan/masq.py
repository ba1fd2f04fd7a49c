"""flannel's ip-masq and forward rules (FLANNEL-POSTRTG, FLANNEL-FWD) as iptables-restore text.

Pod-to-pod traffic inside the cluster CIDR is never NATed; pod-to-outside leaves with
the node's address; packets kube-proxy marked 0x4000 are left to KUBE-POSTROUTING.
"""
from __future__ import annotations

from ipaddress import IPv4Network

MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'


def flannel_jumps() -> list[tuple[str, str, list[str]]]:
    """The jumps into flannel's chains: (table, built-in chain, rule words)."""
    return [("nat", "POSTROUTING", ["-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"]),
            ("filter", "FORWARD", ["-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"])]


def flannel_rules(cluster: IPv4Network, subnet: IPv4Network, random_fully: bool = True) -> str:
    """All of flannel's rules for a fresh node owning ``subnet``: the chains, then the jumps."""
    return flannel_chains(cluster, subnet, random_fully) + "".join(jump_block(*j) for j in flannel_jumps())


def jump_block(table: str, chain: str, words: list[str]) -> str:
    """An iptables-restore block appending one rule to a built-in chain."""
    rule = " ".join(f'"{w}"' if " " in w else w for w in words)
    return f"*{table}\n-A {chain} {rule}\nCOMMIT\n"


def flannel_chains(cluster: IPv4Network, subnet: IPv4Network, random_fully: bool = True) -> str:
    """FLANNEL-POSTRTG and FLANNEL-FWD for ``iptables-restore --noflush``: declaring a chain
    flushes it, so loading this again resyncs the chains without duplicating rules."""
    rf = " --random-fully" if random_fully else ""
    c, p = str(cluster), str(subnet)
    return "\n".join([
        "*nat",
        ":FLANNEL-POSTRTG - [0:0]",
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {p} -d {c} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {c} -d {p} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s {c} -d {p} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {c} ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE{rf}",
        f"-A FLANNEL-POSTRTG ! -s {c} -d {c} {MASQ} -j MASQUERADE{rf}",
        "COMMIT",
        "*filter",
        ":FLANNEL-FWD - [0:0]",
        f"-A FLANNEL-FWD -s {c} {FWD} -j ACCEPT",
        f"-A FLANNEL-FWD -d {c} {FWD} -j ACCEPT",
        "COMMIT",
        "",
    ])
