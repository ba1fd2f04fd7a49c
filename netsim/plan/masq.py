"""flannel's ip-masq and forward rules (FLANNEL-POSTRTG, FLANNEL-FWD) as iptables-restore text.

Pod-to-pod traffic inside the cluster CIDR is never NATed; pod-to-outside leaves with
the node's address; packets kube-proxy marked 0x4000 are left to KUBE-POSTROUTING.
"""
from __future__ import annotations

from ipaddress import IPv4Network

MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'


def flannel_rules(cluster: IPv4Network, subnet: IPv4Network, random_fully: bool = True) -> str:
    """Rules for a node owning ``subnet`` of ``cluster``, to load with ``iptables-restore --noflush``."""
    rf = " --random-fully" if random_fully else ""
    c, p = str(cluster), str(subnet)
    return "\n".join([
        "*nat",
        ":FLANNEL-POSTRTG - [0:0]",
        f"-A POSTROUTING {MASQ} -j FLANNEL-POSTRTG",
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {p} -d {c} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {c} -d {p} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s {c} -d {p} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {c} ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE{rf}",
        f"-A FLANNEL-POSTRTG ! -s {c} -d {c} {MASQ} -j MASQUERADE{rf}",
        "COMMIT",
        "*filter",
        ":FLANNEL-FWD - [0:0]",
        f"-A FORWARD {FWD} -j FLANNEL-FWD",
        f"-A FLANNEL-FWD -s {c} {FWD} -j ACCEPT",
        f"-A FLANNEL-FWD -d {c} {FWD} -j ACCEPT",
        "COMMIT",
        "",
    ])
