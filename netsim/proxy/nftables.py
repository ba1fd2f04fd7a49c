"""kube-proxy's nftables mode as pure functions: Service ports → ``nft -f`` transactions.

``render()`` computes, for one node, the objects kube-proxy's nftables proxier
(``pkg/proxy/nftables/proxier.go``, v1.33+ layout) keeps in table ``ip kube-proxy``:

* the fixed skeleton (base chains with kube-proxy's hooks and priorities, the dispatch
  and check chains, the ``cluster-ips`` / ``nodeport-ips`` sets and the ``service-ips``,
  ``service-nodeports``, ``firewall-ips``, ``no-endpoint-services`` and
  ``no-endpoint-nodeports`` verdict maps);
* per service port, its chains (``service-``, ``local-``, ``external-``, ``firewall-``,
  ``endpoint-`` + ``HASH-ns/name/proto/port[__IP/port]``), its ClientIP affinity sets
  (``affinity-…``, dynamic with timeout) and its map and set elements.

``transaction()`` turns that state into one ``nft -f`` transaction: a full sync (the
skeleton, every container flushed and refilled, every service chain rewritten) or a
partial sync against the previous state (only the chains of changed service ports, only
the element changes; stale chains and affinity sets deleted). ``render_text()`` is the
full sync for a fresh node, what ``netsim proxy render --mode nftables`` prints.

Choices where upstream is not deterministic or where this clone differs:

* Service ports are written in ``(SPN, protocol, port)`` order (upstream: Go map order).
* Stale chains are flushed *and deleted* in the same transaction. Upstream flushes them
  and deletes them in a later sync (≥ 1 s later) because kernels before 6.2 released
  map-element references to chains asynchronously; netsim needs a newer kernel anyway.
* ``--nodeport-addresses`` is kube-proxy's default, ``primary``: the ``nodeport-ips``
  set holds the node's IPs (no ``fib daddr type local`` variant).
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Sequence

from .iptables import _categorize, _source_ranges, endpoint_string
from .model import MASQ_MARK, NodeContext, ServicePort

TABLE = "kube-proxy"
NAME_MAX = 256                       # knftables.NameLengthMax
_BASE_MAX = NAME_MAX - 16            # chainNameBaseLengthMax: room for the longest prefix

# containers whose elements kube-proxy tracks (nftElementStorage), in setup order
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
FIREWALL_IPS = "firewall-ips"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
ELEMENT_CONTAINERS = (CLUSTER_IPS, SERVICE_IPS, FIREWALL_IPS, NO_ENDPOINT_SERVICES,
                      NO_ENDPOINT_NODEPORTS, SERVICE_NODEPORTS)

# (name, type, hook, priority): filter chains run before DNAT so they see service addresses
BASE_CHAINS = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
# (target, from, match): the jumps from the base chains (nftablesJumpChains)
JUMPS = (
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting-pre-dnat", "ct state new"),
    ("firewall-check", "filter-output-pre-dnat", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output", "ct state new"),
)
TOP_LEVEL = ("services", "cluster-ips-check", "masquerading", "mark-for-masquerade")
MARK_MASQ = "mark-for-masquerade"
REJECT_CHAIN = "reject-chain"


# -- names (reference 3.1) -------------------------------------------------------------------
@lru_cache(maxsize=1 << 17)
def hash_and_truncate(name: str) -> str:
    """``base32(sha256(name))[:8] + "-" + name``, cut to fit an nftables name."""
    out = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8] + "-" + name
    return out if len(out) <= _BASE_MAX else out[:_BASE_MAX - 3] + "..."


def port_base(port: ServicePort) -> str:
    """``HASH-ns/name/proto/portname``, e.g. ``ULMVA6XW-ns1/svc1/tcp/p80``."""
    return hash_and_truncate(f"{port.namespace}/{port.name}/{port.proto}/{port.port_name}")


def endpoint_base(port: ServicePort, endpoint: str) -> str:
    """``HASH-ns/name/proto/portname__IP/port`` (IPv6 colons become dots)."""
    ip, _, p = endpoint.rpartition(":")
    ip = ip.strip("[]").replace(":", ".")
    return hash_and_truncate(f"{port.namespace}/{port.name}/{port.proto}/{port.port_name}__{ip}/{p}")


def is_service_chain(name: str) -> bool:
    """Per-service chains are the only ones with a ``/`` in the name."""
    return "/" in name


def is_affinity_set(name: str) -> bool:
    return name.startswith("affinity-")


# -- the desired state -------------------------------------------------------------------------
@dataclass
class PortObjects:
    """What one service port owns: chains in creation order, affinity sets (name → timeout)."""
    label: str = ""
    chains: dict[str, list[str]] = field(default_factory=dict)
    affinity: dict[str, int] = field(default_factory=dict)


@dataclass
class State:
    """kube-proxy's table for one node, apart from the fixed skeleton."""
    node_ips: tuple[str, ...]
    service_cidrs: tuple[str, ...]
    ports: dict[str, PortObjects]                 # port key (SPN + proto) → its objects
    elements: dict[str, dict[str, str]]           # container → key → element body

    @property
    def chains(self) -> set[str]:
        return {c for p in self.ports.values() for c in p.chains}

    @property
    def affinity_sets(self) -> set[str]:
        return {s for p in self.ports.values() for s in p.affinity}

    @property
    def rule_count(self) -> int:
        return (len(skeleton_rules(self)) + sum(len(r) for p in self.ports.values() for r in p.chains.values()))


def _family(node: NodeContext) -> tuple[bool, str, str]:
    v6 = ":" in node.pod_cidr if node.pod_cidr else any(":" in ip for ip in node.node_ips[:1])
    return v6, ("ip6" if v6 else "ip"), ("ipv6_addr" if v6 else "ipv4_addr")


def render(ports: Sequence[ServicePort], node: NodeContext) -> State:
    """The objects kube-proxy's ``syncProxyRules`` keeps for ``ports`` on ``node``."""
    v6, _, _ = _family(node)
    elements: dict[str, dict[str, str]] = {c: {} for c in ELEMENT_CONTAINERS}
    out: dict[str, PortObjects] = {}
    for p in sorted(ports, key=lambda p: (p.spn, p.proto, p.port)):
        obj, elems = _render_port(p, node)
        out[p.spn + p.proto] = obj
        for container, k, body in elems:
            elements[container][k] = body
    node_ips = tuple(ip for ip in node.node_ips if (":" in ip) == v6 and not ipaddress.ip_address(ip).is_loopback)
    cidrs = tuple(c for c in getattr(node, "service_cidrs", ()) if (":" in c) == v6)
    return State(node_ips, cidrs, out, elements)


@lru_cache(maxsize=1 << 16)
def _render_port(p: ServicePort, node: NodeContext) -> tuple[PortObjects, tuple[tuple[str, str, str], ...]]:
    """One service port's chains, affinity sets and (container, key, body) elements.
    Cached: a sync re-renders only the ports that changed (the result is never mutated)."""
    v6, ipx, _ = _family(node)
    masq_all = bool(getattr(node, "masquerade_all", False))
    detector = bool(node.pod_cidr)
    node_ip = next((ipaddress.ip_address(ip) for ip in node.node_ips if (":" in ip) == v6), None)
    elements: list[tuple[str, str, str]] = []

    def element(container: str, key: list[str], value: str | None = None, comment: str | None = None) -> None:
        k = " . ".join(key)
        elements.append((container, k, k + (f' comment "{comment}"' if comment else "") + (f" : {value}" if value else "")))

    if any((":" in e.ip) != v6 for e in p.endpoints):
        p = replace(p, endpoints=tuple(e for e in p.endpoints if (":" in e.ip) == v6))
    proto, spn, port_s = p.proto, p.spn, str(p.port)
    base = port_base(p)
    cluster_chain, local_chain = "service-" + base, "local-" + base
    ext_chain, fw_chain = "external-" + base, "firewall-" + base
    cluster, local, reachable, has_endpoints = _categorize(p, node.name)
    external_ips = [ip for ip in p.external_ips if (":" in ip) == v6]
    lb_ips = [ip for ip in p.load_balancer_ips if (":" in ip) == v6]
    accessible = bool(p.node_port or external_ips or lb_ips)
    affinity = p.affinity_timeout

    obj = PortObjects(f"{spn} ({proto})")
    chains = obj.chains
    ep_chain = {endpoint_string(e): "endpoint-" + endpoint_base(p, endpoint_string(e)) for e in reachable}
    for c in ep_chain.values():
        chains[c] = []
    uses_cluster = bool(cluster)
    uses_local = bool(local)
    if uses_cluster:
        chains[cluster_chain] = []
    if uses_local:
        chains[local_chain] = []
    internal_chain, has_internal = cluster_chain, has_endpoints
    if p.internal_policy_local:
        internal_chain, has_internal = local_chain, bool(local) and has_endpoints
    external_policy_chain, has_external = cluster_chain, has_endpoints
    epol_local = p.external_policy_local and accessible
    if epol_local:
        external_policy_chain, has_external = local_chain, bool(local) and has_endpoints
    uses_ext = has_endpoints and accessible
    if uses_ext:
        chains[ext_chain] = []
    ranges = _source_ranges(p, v6) if lb_ips else []
    uses_fw = bool(lb_ips) and bool(ranges)
    if uses_fw:
        chains[fw_chain] = []

    if not has_endpoints:
        internal_verdict = external_verdict = f"goto {REJECT_CHAIN}"
    else:
        internal_verdict = None if has_internal else "drop"
        external_verdict = None if has_external else "drop"

    # elements: ClusterIP, externalIPs, LB IPs, NodePort
    element(CLUSTER_IPS, [p.cluster_ip])
    if has_internal:
        element(SERVICE_IPS, [p.cluster_ip, proto, port_s], f"goto {internal_chain}")
    else:
        element(NO_ENDPOINT_SERVICES, [p.cluster_ip, proto, port_s], internal_verdict, spn)
    for eip in external_ips:
        if has_endpoints:
            element(SERVICE_IPS, [eip, proto, port_s], f"goto {ext_chain}")
        if not has_external:
            element(NO_ENDPOINT_SERVICES, [eip, proto, port_s], external_verdict, spn)
    for lbip in lb_ips:
        if has_endpoints:
            element(SERVICE_IPS, [lbip, proto, port_s], f"goto {ext_chain}")
        if uses_fw:
            element(FIREWALL_IPS, [lbip, proto, port_s], f"goto {fw_chain}")
    if not has_external:
        for lbip in lb_ips:
            element(NO_ENDPOINT_SERVICES, [lbip, proto, port_s], external_verdict, spn)
    if p.node_port:
        if has_endpoints:
            element(SERVICE_NODEPORTS, [proto, str(p.node_port)], f"goto {ext_chain}")
        if not has_external:
            element(NO_ENDPOINT_NODEPORTS, [proto, str(p.node_port)], external_verdict, spn)

    # rules
    if has_internal:
        if masq_all:
            chains[internal_chain].append(f"{ipx} daddr {p.cluster_ip} jump {MARK_MASQ}")
        elif detector:
            chains[internal_chain].append(f"{ipx} daddr {p.cluster_ip} {ipx} saddr != {node.pod_cidr} "
                                          f"jump {MARK_MASQ}")
    if uses_ext:
        rules = chains[ext_chain]
        if not epol_local:
            rules.append(f"jump {MARK_MASQ}")
        else:
            if detector:
                rules.append(f'{ipx} saddr {node.pod_cidr} goto {cluster_chain} comment "short-circuit pod traffic"')
            rules.append(f'fib saddr type local jump {MARK_MASQ} comment "masquerade local traffic"')
            rules.append(f'fib saddr type local goto {cluster_chain} comment "short-circuit local traffic"')
        if has_external:
            rules.append(f"goto {external_policy_chain}")
    if uses_fw:
        sources = [str(n) for n in ranges]
        if node_ip is not None and any(node_ip in n for n in ranges):
            sources += lb_ips                   # a node's own traffic to its LB IP loops back
        chains[fw_chain].append(f"{ipx} saddr != {{ {' , '.join(sources)} }} drop")
    if affinity is not None:
        for es in ep_chain:
            obj.affinity["affinity-" + endpoint_base(p, es)] = affinity
    if uses_cluster:
        _lb_rules(chains[cluster_chain], ipx, p, cluster, ep_chain, affinity)
    if uses_local:
        _lb_rules(chains[local_chain], ipx, p, local, ep_chain, affinity)
    for e in reachable:
        es = endpoint_string(e)
        rules = chains[ep_chain[es]]
        rules.append(f"{ipx} saddr {e.ip} jump {MARK_MASQ}")
        if affinity is not None:
            rules.append(f"update @affinity-{endpoint_base(p, es)} {{ {ipx} saddr }}")
        rules.append(f"meta l4proto {proto} dnat to {es}")
    return obj, tuple(elements)


def _lb_rules(rules: list[str], ipx: str, p: ServicePort, endpoints, ep_chain: dict[str, str],
              affinity: int | None) -> None:
    """``writeServiceToEndpointRules``: affinity lookups, then one ``numgen`` verdict map."""
    strs = [endpoint_string(e) for e in endpoints]
    if affinity is not None:
        for es in strs:
            rules.append(f"{ipx} saddr @affinity-{endpoint_base(p, es)} goto {ep_chain[es]}")
    vmap = " , ".join(f"{i} : goto {ep_chain[es]}" for i, es in enumerate(strs))
    rules.append(f"numgen random mod {len(strs)} vmap {{ {vmap} }}")


# -- the skeleton ------------------------------------------------------------------------------
def skeleton_rules(state: State, v6: bool = False) -> list[tuple[str, str]]:
    """(chain, rule) of the fixed chains, in kube-proxy's order."""
    ipx = "ip6" if v6 else "ip"
    mark = f"{MASQ_MARK:#x}"
    out = [(src, f"{match} jump {dst}".strip()) for dst, src, match in JUMPS]
    out += [
        (MARK_MASQ, f"mark set mark or {mark}"),
        ("masquerading", f"mark and {mark} == 0 return"),
        ("masquerading", f"mark set mark xor {mark}"),
        ("masquerading", "masquerade fully-random"),
        ("cluster-ips-check", f'{ipx} daddr @{CLUSTER_IPS} reject comment "Reject traffic to invalid ports of ClusterIPs"'),
    ]
    if state.service_cidrs:
        out.append(("cluster-ips-check", f"{ipx} daddr {{ {','.join(state.service_cidrs)} }} drop "
                                         f'comment "Drop traffic to unallocated ClusterIPs"'))
    out += [
        (REJECT_CHAIN, "reject"),
        ("service-endpoints-check", f"{ipx} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"),
        ("nodeport-endpoints-check", f"{ipx} daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"),
        ("firewall-check", f"{ipx} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"),
        ("services", f"{ipx} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"),
        ("services", f"{ipx} daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"),
    ]
    return out


def _skeleton(state: State, v6: bool, recreate_base: bool) -> list[str]:
    """``setupNFTables``: table, base chains, top-level chains and their rules, sets and maps,
    every tracked container flushed."""
    t = f"ip6 {TABLE}" if v6 else f"ip {TABLE}"
    addr = "ipv6_addr" if v6 else "ipv4_addr"
    key3 = f"{addr} . inet_proto . inet_service : verdict"
    key2 = "inet_proto . inet_service : verdict"
    lines = [f'add table {t} {{ comment "rules for kube-proxy" ; }}']
    if recreate_base:                     # once per agent: base chains may have new priorities
        for name, *_ in BASE_CHAINS:
            lines += [f"add chain {t} {name}", f"delete chain {t} {name}"]
    for name, typ, hook, prio in BASE_CHAINS:
        lines += [f"add chain {t} {name} {{ type {typ} hook {hook} priority {prio} ; }}", f"flush chain {t} {name}"]
    regular = list(dict.fromkeys([dst for dst, _, _ in JUMPS] + list(TOP_LEVEL)))
    for name in regular:
        lines += [f"add chain {t} {name}", f"flush chain {t} {name}"]
    lines += [f'add chain {t} {REJECT_CHAIN} {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}',
              f"flush chain {t} {REJECT_CHAIN}"]
    lines += [
        f'add set {t} {CLUSTER_IPS} {{ type {addr} ; comment "Active ClusterIPs" ; }}',
        f'add set {t} {NODEPORT_IPS} {{ type {addr} ; comment "IPs that accept NodePort traffic" ; }}',
        f"flush set {t} {NODEPORT_IPS}",
    ]
    lines += [f"add element {t} {NODEPORT_IPS} {{ {ip} }}" for ip in state.node_ips]
    lines += [
        f'add map {t} {NO_ENDPOINT_SERVICES} {{ type {key3} ; comment "vmap to drop or reject packets to services with no endpoints" ; }}',
        f'add map {t} {NO_ENDPOINT_NODEPORTS} {{ type {key2} ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}',
        f'add map {t} {FIREWALL_IPS} {{ type {key3} ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}',
        f'add map {t} {SERVICE_IPS} {{ type {key3} ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}',
        f'add map {t} {SERVICE_NODEPORTS} {{ type {key2} ; comment "NodePort traffic" ; }}',
    ]
    lines += [f"add rule {t} {chain} {rule}" for chain, rule in skeleton_rules(state, v6)]
    for c in ELEMENT_CONTAINERS:
        kind = "set" if c == CLUSTER_IPS else "map"
        lines.append(f"flush {kind} {t} {c}")
    return lines


# -- transactions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transaction:
    text: str                    # nft -f input
    full: bool
    rules_written: int           # "add rule" lines
    elements_written: int        # element adds and deletes
    chains_written: int          # per-service chains (re)written
    stale_chains: tuple[str, ...] = ()
    stale_sets: tuple[str, ...] = ()


def transaction(state: State, node: NodeContext, *, previous: State | None = None,
                changed: set[str] | None = None, existing_chains: set[str] | None = None,
                existing_sets: set[str] | None = None, recreate_base: bool = False) -> Transaction:
    """One ``nft -f`` transaction from ``previous`` (what the kernel holds) to ``state``.

    ``changed=None`` or ``previous=None``: full sync. Otherwise only the chains of the port
    keys in ``changed`` (and of ports whose chains are new) are rewritten and only element
    differences are written. Stale service chains and affinity sets (in ``previous``, or in
    ``existing_chains`` / ``existing_sets`` as listed from the kernel) are deleted.
    """
    v6, _, _ = _family(node)
    t = f"ip6 {TABLE}" if v6 else f"ip {TABLE}"
    full = changed is None or previous is None
    lines: list[str] = []
    if full:
        lines += _skeleton(state, v6, recreate_base)
    known_chains = set(existing_chains or ()) | (previous.chains if previous else set())
    known_sets = set(existing_sets or ()) | (previous.affinity_sets if previous else set())
    rules = chains_written = elements = 0
    for key, obj in state.ports.items():
        old = previous.ports.get(key) if previous else None
        if not (full or key in changed or old is None or not known_chains.issuperset(obj.chains)):
            continue
        group: list[str] = [f"# {obj.label}"] if obj.chains else []
        group += [f"add set {t} {name} {{ type {'ipv6_addr' if v6 else 'ipv4_addr'} ; flags dynamic,timeout ; "
                  f"timeout {timeout}s ; }}" for name, timeout in obj.affinity.items()]
        for name in obj.chains:
            group += [f"add chain {t} {name}", f"flush chain {t} {name}"]
        for name, chain_rules in obj.chains.items():
            group += [f"add rule {t} {name} {r}" for r in chain_rules]
            rules += len(chain_rules)
        chains_written += len(obj.chains)
        lines += group
    # elements
    deletes: list[str] = []
    adds: list[str] = []
    for c in ELEMENT_CONTAINERS:
        new = state.elements[c]
        old = {} if full else previous.elements.get(c, {})
        for k, body in new.items():
            prev = old.get(k)
            if prev == body:
                continue
            if prev is not None:
                deletes.append(f"delete element {t} {c} {{ {k} }}")
            adds.append(f"add element {t} {c} {{ {body} }}")
        deletes += [f"delete element {t} {c} {{ {k} }}" for k in old if k not in new]
    elements = len(deletes) + len(adds)
    lines += deletes + adds
    # stale objects: flush, then delete once nothing refers to them
    active = state.chains
    stale = tuple(sorted(c for c in known_chains if is_service_chain(c) and c not in active))
    stale_sets = tuple(sorted(s for s in known_sets if is_affinity_set(s) and s not in state.affinity_sets))
    lines += [f"flush chain {t} {c}" for c in stale]
    lines += [f"delete chain {t} {c}" for c in stale]
    lines += [f"delete set {t} {s}" for s in stale_sets]
    text = "\n".join(lines) + "\n" if lines else ""
    return Transaction(text, full, rules + (len(skeleton_rules(state, v6)) if full else 0),
                       elements + (len(state.node_ips) if full else 0), chains_written, stale, stale_sets)


def render_text(ports: Sequence[ServicePort], node: NodeContext) -> str:
    """What ``netsim proxy render --mode nftables`` prints: the full-sync transaction."""
    state = render(ports, node)
    tx = transaction(state, node)
    head = (f"# kube-proxy (nftables mode) on {node.name}: table ip {TABLE}, {state.rule_count} rules, "
            f"{len(state.chains)} service chains, {sum(len(e) for e in state.elements.values())} map/set elements;\n"
            f"# one transaction: nft -f FILE\n")
    return head + tx.text
