"""kube-proxy's iptables mode as a pure function: Service ports → ``iptables-restore`` input.

``render()`` produces, for one node, exactly what kube-proxy (``pkg/proxy/iptables/
proxier.go``, ``syncProxyRules``) feeds to ``iptables-restore --noflush``: a ``*filter`` and
a ``*nat`` section with the same chains, rule shapes, argument order and comments, so the
result can be diffed against upstream's unit-test fixtures and against a real node's
``iptables-save``. ``jump_rules()`` lists the jumps from the built-in chains that kube-proxy
installs one by one (``iptables -C`` / ``-I``) rather than through the restore.

Choices where upstream is not deterministic or where this clone differs:

* Service ports are emitted in ``(SPN, protocol, port)`` order (upstream: Go map order).
  Rules are grouped by chain: top-level chains first, then each service port's own chains
  (SVC, SVL, EXT, FW, SEP…), then ``-X`` lines for stale chains.
* No ``-m nfacct`` counter rules (they need kernel nfacct objects; upstream writes them
  only when the counters could be created).
* ``KUBE-PROXY-CANARY`` (mangle, nat, filter) is declared in the restore input on full
  syncs only (upstream creates it with ``iptables -N`` from its monitor); a partial sync
  does not mention it, so its disappearance still reveals a foreign flush.
* Optional inputs the model does not carry yet are read with ``getattr``:
  ``ServicePort.health_check_node_port`` (filter KUBE-NODEPORTS ACCEPT rule) and
  ``NodeContext.masquerade_all``.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass, field, replace
from functools import lru_cache
from types import MappingProxyType
from typing import Mapping, Sequence

from .endpoints import categorize
from .model import MASQ_MARK, Endpoint, NodeContext, ServicePort

# -- chain names ---------------------------------------------------------------------------
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")

SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")

# Top-level chains: rewritten on every sync, never deleted as stale.
FILTER_TOP_LEVEL = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS,
                    KUBE_PROXY_FIREWALL)
NAT_TOP_LEVEL = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
TOP_LEVEL_CHAINS = frozenset(FILTER_TOP_LEVEL + NAT_TOP_LEVEL + (KUBE_FIREWALL, KUBE_PROXY_CANARY))

LARGE_CLUSTER_ENDPOINTS = 1000          # more endpoints than this: "large cluster mode"

_NODEPORTS_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


def is_service_chain(name: str) -> bool:
    """A per-service chain (SVC/SVL/EXT/FW/SEP): the only kind ever deleted as stale."""
    return name.startswith(SERVICE_CHAIN_PREFIXES)


# -- hashing (reference 1.6) ---------------------------------------------------------------
@lru_cache(maxsize=1 << 17)
def _hash16(s: str) -> str:
    return base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:16]


def service_chain_suffix(spn: str, proto: str) -> str:
    """``base32(sha256(SPN + proto))[:16]``: the suffix of KUBE-SVC/SVL/EXT/FW chains."""
    return _hash16(spn + proto.lower())


def endpoint_chain_suffix(spn: str, proto: str, endpoint: str) -> str:
    """``base32(sha256(SPN + proto + "IP:port"))[:16]``: the suffix of a KUBE-SEP chain
    (``endpoint`` is ``[addr]:port`` for IPv6)."""
    return _hash16(spn + proto.lower() + endpoint)


def port_key(port: ServicePort) -> str:
    """The key ``render(changed=...)`` uses for a service port: ``SPN + proto``."""
    return port.spn + port.proto


def endpoint_string(ep: Endpoint) -> str:
    """kube-proxy's endpoint string (``net.JoinHostPort``): ``IP:port`` or ``[IP]:port``."""
    return f"[{ep.ip}]:{ep.port}" if ":" in ep.ip else f"{ep.ip}:{ep.port}"


_PROBABILITIES: list[str] = ["<bad value>"]


def probability(n: int) -> str:
    """``%0.10f`` of ``1/n``, as kube-proxy's ``computeProbability`` (cached, like upstream)."""
    while len(_PROBABILITIES) <= n:
        _PROBABILITIES.append(f"{1.0 / len(_PROBABILITIES):0.10f}")
    return _PROBABILITIES[n]


# -- jumps from the built-in chains (reference 1.2) ------------------------------------------
_CT_NEW = ("-m", "conntrack", "--ctstate", "NEW")
_JUMPS = (
    ("filter", "INPUT", _CT_NEW, "kubernetes externally-visible service portals", KUBE_EXTERNAL_SERVICES),
    ("filter", "FORWARD", _CT_NEW, "kubernetes externally-visible service portals", KUBE_EXTERNAL_SERVICES),
    ("filter", "INPUT", (), "kubernetes health check service ports", KUBE_NODEPORTS),
    ("filter", "FORWARD", _CT_NEW, "kubernetes service portals", KUBE_SERVICES),
    ("filter", "OUTPUT", _CT_NEW, "kubernetes service portals", KUBE_SERVICES),
    ("filter", "FORWARD", (), "kubernetes forwarding rules", KUBE_FORWARD),
    ("filter", "INPUT", _CT_NEW, "kubernetes load balancer firewall", KUBE_PROXY_FIREWALL),
    ("filter", "OUTPUT", _CT_NEW, "kubernetes load balancer firewall", KUBE_PROXY_FIREWALL),
    ("filter", "FORWARD", _CT_NEW, "kubernetes load balancer firewall", KUBE_PROXY_FIREWALL),
    ("nat", "OUTPUT", (), "kubernetes service portals", KUBE_SERVICES),
    ("nat", "PREROUTING", (), "kubernetes service portals", KUBE_SERVICES),
    ("nat", "POSTROUTING", (), "kubernetes postrouting rules", KUBE_POSTROUTING),
    # kubelet's duplicates (iptablesKubeletJumpChains): no comment
    ("filter", "INPUT", (), "", KUBE_FIREWALL),
    ("filter", "OUTPUT", (), "", KUBE_FIREWALL),
)


def jump_rules() -> list[tuple[str, str, list[str]]]:
    """``(table, built-in chain, rule words)`` in kube-proxy's order; each is ensured with
    ``iptables -t T -C CHAIN words`` and, if missing, ``-I CHAIN words`` (prepend). The
    words are argv (the comment is one unquoted word); the last word is the target chain."""
    out = []
    for table, chain, extra, comment, target in _JUMPS:
        words = list(extra)
        if comment:
            words += ["-m", "comment", "--comment", comment]
        words += ["-j", target]
        out.append((table, chain, words))
    return out


# -- the result ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ruleset:
    text: str                                   # iptables-restore --noflush input
    chains: frozenset[str]                      # every kube-proxy chain after this sync (names, all tables)
    rule_count: int                             # rules in kube-proxy chains after this sync (filter + nat)
    stale: tuple[str, ...] = ()                 # nat chains flushed and deleted by this restore
    full: bool = True                           # a full sync (every chain written)
    chains_by_table: Mapping[str, frozenset[str]] = field(default_factory=dict)
    rules_written: int = 0                      # "-A" lines in ``text``


# -- helpers ---------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _parse_range(text: str, v6: bool):
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None                              # invalid entries are ignored
    return net if (net.version == 6) == v6 else None


def _source_ranges(port: ServicePort, v6: bool) -> list:
    nets = [n for n in (_parse_range(r, v6) for r in port.load_balancer_source_ranges) if n is not None]
    if any(n.prefixlen == 0 for n in nets):      # 0.0.0.0/0 (::/0): no filtering at all
        return []
    return nets


def _categorize(port: ServicePort, node: str):
    """(cluster endpoints, local endpoints, reachable endpoints, has any endpoints)."""
    c = categorize(port, node)
    key = endpoint_string
    cluster = sorted(c.cluster, key=key) if c.uses_cluster else []
    local = sorted(c.local, key=key) if c.uses_local else []
    if not local:
        reachable = cluster
    elif not cluster:
        reachable = local
    else:
        merged = {key(e): e for e in cluster}
        merged.update((key(e), e) for e in local)
        reachable = [merged[k] for k in sorted(merged)]
    return cluster, local, reachable, c.all_endpoints


# -- render ----------------------------------------------------------------------------------
def render(ports: Sequence[ServicePort], node: NodeContext, *, changed: set[str] | None = None,
           existing_chains: set[str] | frozenset[str] = frozenset()) -> Ruleset:
    """kube-proxy's ``syncProxyRules`` for ``node``.

    ``changed=None``: full sync, every chain written. Otherwise a partial sync (KEP-3453):
    the top-level chains are always rewritten, but a service port's own chains (SVC, SVL,
    EXT, FW, SEP) only if ``port_key(port)`` is in ``changed`` (or if one of them is missing
    from ``existing_chains``, which would otherwise make the restore fail). Per-service
    chains in ``existing_chains`` that no longer exist are flushed and deleted
    (``:X - [0:0]`` … ``-X X``).
    """
    full = changed is None
    existing = existing_chains if isinstance(existing_chains, (set, frozenset)) else set(existing_chains)
    v6 = ":" in node.pod_cidr if node.pod_cidr else any(":" in ip for ip in node.node_ips[:1])
    detector = bool(node.pod_cidr)
    masq_all = bool(getattr(node, "masquerade_all", False))
    localhost_np = node.localhost_nodeports and not v6
    node_ips = [ipaddress.ip_address(ip) for ip in node.node_ips if (":" in ip) == v6]
    mark = f"{MASQ_MARK:#x}"            # upstream fixtures: 0x4000 (the kernel stores a number)
    node_name = node.name
    if_local = f"-s {node.pod_cidr}"
    if_not_local = f"! -s {node.pod_cidr}"

    ordered = sorted(ports, key=lambda p: (p.spn, p.proto, p.port))
    large = sum(len(p.endpoints) for p in ordered) > LARGE_CLUSTER_ENDPOINTS

    # filter
    f_services: list[str] = []
    f_external: list[str] = []
    f_nodeports: list[str] = []
    f_firewall: list[str] = []
    # nat
    n_services: list[str] = []
    n_nodeports: list[str] = []
    n_decl: list[str] = []            # per-service chain declarations
    n_rules: list[str] = []           # per-service chain rules
    active: set[str] = set()
    skipped_rules = 0                 # rules of unchanged chains (still in the kernel)

    for p in ordered:
        spn = p.spn
        proto = p.proto
        mproto = f"-m {proto} -p {proto}"
        h = service_chain_suffix(spn, proto)
        svc_chain, svl_chain = "KUBE-SVC-" + h, "KUBE-SVL-" + h
        ext_chain, fw_chain = "KUBE-EXT-" + h, "KUBE-FW-" + h
        if any((":" in e.ip) != v6 for e in p.endpoints):      # other-family slices are not ours
            p = replace(p, endpoints=tuple(e for e in p.endpoints if (":" in e.ip) == v6))
        cluster, local, reachable, has_endpoints = _categorize(p, node_name)

        external_ips = [ip for ip in p.external_ips if (":" in ip) == v6]
        lb_ips = [ip for ip in p.load_balancer_ips if (":" in ip) == v6]
        node_port = p.node_port or 0
        accessible = bool(node_port or external_ips or lb_ips)
        ipol_local = p.internal_policy_local
        epol_local = p.external_policy_local and accessible

        uses_cluster_chain = bool(cluster)
        uses_local_chain = bool(local)
        internal_chain = svl_chain if ipol_local else svc_chain
        has_internal = has_endpoints and (not ipol_local or bool(local))
        external_policy_chain = svl_chain if epol_local else svc_chain
        has_external = has_endpoints and (not epol_local or bool(local))
        uses_ext = has_endpoints and accessible
        ranges = _source_ranges(p, v6) if lb_ips else []
        uses_fw = has_endpoints and bool(lb_ips) and bool(ranges)
        lb_chain = fw_chain if uses_fw else ext_chain

        if not has_endpoints:
            f_target_i = f_target_e = "REJECT"
            f_comment_i = f_comment_e = f'"{spn} has no endpoints"'
        else:
            f_target_i = f_target_e = "DROP"
            f_comment_i = f_comment_e = f'"{spn} has no local endpoints"'

        port_s = p.port
        # ClusterIP
        if has_internal:
            n_services.append(f'-A KUBE-SERVICES -m comment --comment "{spn} cluster IP" {mproto} '
                              f'-d {p.cluster_ip} --dport {port_s} -j {internal_chain}')
        else:
            f_services.append(f'-A KUBE-SERVICES -m comment --comment {f_comment_i} {mproto} '
                              f'-d {p.cluster_ip} --dport {port_s} -j {f_target_i}')
        # externalIPs
        for eip in external_ips:
            if has_endpoints:
                n_services.append(f'-A KUBE-SERVICES -m comment --comment "{spn} external IP" {mproto} '
                                  f'-d {eip} --dport {port_s} -j {ext_chain}')
            if not has_external:
                f_external.append(f'-A KUBE-EXTERNAL-SERVICES -m comment --comment {f_comment_e} {mproto} '
                                  f'-d {eip} --dport {port_s} -j {f_target_e}')
        # LoadBalancer ingress IPs
        for lbip in lb_ips:
            if has_endpoints:
                n_services.append(f'-A KUBE-SERVICES -m comment --comment "{spn} loadbalancer IP" {mproto} '
                                  f'-d {lbip} --dport {port_s} -j {lb_chain}')
            if uses_fw:
                f_firewall.append(f'-A KUBE-PROXY-FIREWALL -m comment --comment "{spn} traffic not accepted '
                                  f'by {fw_chain}" {mproto} -d {lbip} --dport {port_s} -j DROP')
        if not has_external:
            for lbip in lb_ips:
                f_external.append(f'-A KUBE-EXTERNAL-SERVICES -m comment --comment {f_comment_e} {mproto} '
                                  f'-d {lbip} --dport {port_s} -j {f_target_e}')
        # NodePort
        if node_port:
            if has_endpoints:
                n_nodeports.append(f'-A KUBE-NODEPORTS -m comment --comment {spn} {mproto} '
                                   f'--dport {node_port} -j {ext_chain}')
            if not has_external:
                f_external.append(f'-A KUBE-EXTERNAL-SERVICES -m comment --comment {f_comment_e} '
                                  f'-m addrtype --dst-type LOCAL {mproto} --dport {node_port} -j {f_target_e}')
        # health-check node port (only set for LoadBalancer eTP=Local services)
        hc = getattr(p, "health_check_node_port", None)
        if hc:
            f_nodeports.append(f'-A KUBE-NODEPORTS -m comment --comment "{spn} health check node port" '
                               f'-m tcp -p tcp --dport {hc} -j ACCEPT')

        # -- the service port's own chains ----------------------------------------------
        mine: list[str] = []
        if uses_ext:
            mine.append(ext_chain)
        if uses_fw:
            mine.append(fw_chain)
        if uses_cluster_chain:
            mine.append(svc_chain)
        if uses_local_chain:
            mine.append(svl_chain)
        sep = {}
        for ep in reachable:
            es = endpoint_string(ep)
            c = "KUBE-SEP-" + endpoint_chain_suffix(spn, proto, es)
            sep[es] = c
            mine.append(c)
        active.update(mine)

        write = full or port_key(p) in changed or not existing.issuperset(mine)
        if not write:
            # Count what is in the kernel without rendering it.
            affinity_mul = 2 if p.affinity_timeout is not None else 1
            n = 0
            if has_internal and (masq_all or detector):
                n += 1
            if uses_ext:
                if not epol_local:
                    n += 1
                else:
                    n += (1 if detector else 0) + 2
                n += 1 if has_external else 0
            if uses_fw:
                n += len(ranges) + 1 + (len(lb_ips) if _allow_from_node(ranges, node_ips) else 0)
            n += affinity_mul * (len(cluster) + len(local)) + 2 * len(reachable)
            skipped_rules += n
            continue

        for c in mine:
            n_decl.append(f":{c} - [0:0]")
        out = n_rules
        # internal traffic: masquerade off-cluster sources (first rule of the internal chain)
        internal_masq = None
        if has_internal:
            base = f'-A {internal_chain} -m comment --comment "{spn} cluster IP" {mproto} -d {p.cluster_ip} --dport {port_s}'
            if masq_all:
                internal_masq = f"{base} -j KUBE-MARK-MASQ"
            elif detector:
                internal_masq = f"{base} {if_not_local} -j KUBE-MARK-MASQ"
        if uses_ext:
            if not epol_local:
                out.append(f'-A {ext_chain} -m comment --comment "masquerade traffic for {spn} external destinations" '
                           f'-j KUBE-MARK-MASQ')
            else:
                if detector:
                    out.append(f'-A {ext_chain} -m comment --comment "pod traffic for {spn} external destinations" '
                               f'{if_local} -j {svc_chain}')
                out.append(f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {spn} external '
                           f'destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ')
                out.append(f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {spn} external '
                           f'destinations" -m addrtype --src-type LOCAL -j {svc_chain}')
            if has_external:
                out.append(f"-A {ext_chain} -j {external_policy_chain}")
        if uses_fw:
            fw_base = f'-A {fw_chain} -m comment --comment "{spn} loadbalancer IP"'
            for net in ranges:
                out.append(f"{fw_base} -s {net} -j {ext_chain}")
            if _allow_from_node(ranges, node_ips):
                for lbip in lb_ips:
                    out.append(f"{fw_base} -s {lbip} -j {ext_chain}")
            out.append(f'-A {fw_chain} -m comment --comment "other traffic to {spn} will be dropped by '
                       f'KUBE-PROXY-FIREWALL"')
        affinity = p.affinity_timeout
        if uses_cluster_chain:
            if internal_masq and internal_chain == svc_chain:
                out.append(internal_masq)
            _lb_rules(out, svc_chain, spn, cluster, sep, affinity, large)
        if uses_local_chain:
            if internal_masq and internal_chain == svl_chain:
                out.append(internal_masq)
            _lb_rules(out, svl_chain, spn, local, sep, affinity, large)
        sep_comment = "" if large else f" -m comment --comment {spn}"
        for ep in reachable:
            c = sep[endpoint_string(ep)]
            out.append(f"-A {c}{sep_comment} -s {ep.ip} -j KUBE-MARK-MASQ")
            rec = f" -m recent --name {c} --set" if affinity is not None else ""
            out.append(f"-A {c}{sep_comment}{rec} {mproto} -j DNAT --to-destination {endpoint_string(ep)}")

    # -- stale chains -----------------------------------------------------------------------
    stale = tuple(sorted(c for c in existing if c not in active and is_service_chain(c)))

    # -- the catch-all and the global chains ------------------------------------------------
    dest = "-m addrtype --dst-type LOCAL"
    if v6:
        dest += " ! -d ::1/128"
    elif not node.localhost_nodeports:
        dest += " ! -d 127.0.0.0/8"
    n_services.append(f"-A KUBE-SERVICES -m comment --comment {_NODEPORTS_COMMENT} {dest} -j KUBE-NODEPORTS")
    masquerade = '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
    if node.random_fully:
        masquerade += " --random-fully"
    n_global = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
        masquerade,
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}",
    ]
    f_forward = [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    f_kubelet = []
    filter_chains = list(FILTER_TOP_LEVEL)
    if localhost_np:
        filter_chains.append(KUBE_FIREWALL)
        f_kubelet.append('-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" '
                         "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")

    # -- assemble -------------------------------------------------------------------------------
    lines: list[str] = []
    if full:
        lines += ["*mangle", f":{KUBE_PROXY_CANARY} - [0:0]", "COMMIT"]
    lines.append("*filter")
    lines += [f":{c} - [0:0]" for c in filter_chains]
    if full:
        lines.append(f":{KUBE_PROXY_CANARY} - [0:0]")
    filter_rules = f_services + f_external + f_forward + f_nodeports + f_firewall + f_kubelet
    lines += filter_rules
    lines.append("COMMIT")
    lines.append("*nat")
    lines += [f":{c} - [0:0]" for c in NAT_TOP_LEVEL]
    if full:
        lines.append(f":{KUBE_PROXY_CANARY} - [0:0]")
    lines += n_decl
    lines += [f":{c} - [0:0]" for c in stale]
    lines += n_services
    lines += n_nodeports
    lines += n_global
    lines += n_rules
    lines += [f"-X {c}" for c in stale]
    lines.append("COMMIT")
    text = "\n".join(lines) + "\n"

    nat_written = len(n_services) + len(n_nodeports) + len(n_global) + len(n_rules)
    by_table = {
        "filter": frozenset(filter_chains + [KUBE_PROXY_CANARY]),
        "nat": frozenset(NAT_TOP_LEVEL + (KUBE_PROXY_CANARY,)) | active,
        "mangle": frozenset((KUBE_PROXY_CANARY,)),
    }
    return Ruleset(
        text=text,
        chains=frozenset().union(*by_table.values()),
        rule_count=len(filter_rules) + nat_written + skipped_rules,
        stale=stale,
        full=full,
        chains_by_table=MappingProxyType(by_table),
        rules_written=len(filter_rules) + nat_written,
    )


def _allow_from_node(ranges, node_ips) -> bool:
    """Some source range contains a node IP: the LB IP itself must be allowed (hairpin)."""
    return any(ip in net for net in ranges for ip in node_ips)


def _lb_rules(out: list[str], chain: str, spn: str, endpoints: list[Endpoint], sep: dict[str, str],
              affinity: int | None, large: bool) -> None:
    """``writeServiceToEndpointRules``: affinity checks, then the statistic cascade."""
    strs = [endpoint_string(ep) for ep in endpoints]
    if affinity is not None:
        for es in strs:
            c = sep[es]
            comment = "" if large else f' -m comment --comment "{spn} -> {es}"'
            out.append(f"-A {chain}{comment} -m recent --name {c} --rcheck --seconds {affinity} --reap -j {c}")
    n = len(strs)
    last = n - 1
    for i, es in enumerate(strs):
        comment = "" if large else f' -m comment --comment "{spn} -> {es}"'
        if i < last:
            out.append(f"-A {chain}{comment} -m statistic --mode random --probability {probability(n - i)} -j {sep[es]}")
        else:
            out.append(f"-A {chain}{comment} -j {sep[es]}")


def render_text(ports: Sequence[ServicePort], node: NodeContext) -> str:
    """What ``netsim proxy render --mode iptables`` prints: the built-in jumps as comments,
    then the full-sync ``iptables-restore`` input."""
    ruleset = render(ports, node)
    head = [f"# kube-proxy (iptables mode) on {node.name}: {ruleset.rule_count} rules; "
            f"jumps from the built-in chains, ensured with iptables -C/-I:"]
    head += ["# -t " + table + " -I " + chain + " " + " ".join(f'"{w}"' if " " in w else w for w in words)
             for table, chain, words in jump_rules()]
    return "\n".join(head) + "\n" + ruleset.text
