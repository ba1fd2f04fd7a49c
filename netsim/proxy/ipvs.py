"""kube-proxy's IPVS mode as a pure function: Service ports → one node's desired kernel state.

``render()`` returns what kube-proxy's IPVS proxier (``pkg/proxy/ipvs/proxier.go``,
``syncProxyRules``) makes a node hold, for the IPv4 proxier:

* the dummy device ``kube-ipvs0`` (created, left down) holding every ClusterIP, externalIP
  and LoadBalancer IP as a /32, except addresses already on another local interface;
* virtual servers: one per ClusterIP:port, externalIP:port, LB IP:port and, for NodePorts,
  one per node address; real servers are the endpoints, masquerade (NAT) forwarding,
  weight 1; ``sessionAffinity: ClientIP`` makes the virtual server persistent with the
  affinity timeout; the scheduler is ``--ipvs-scheduler`` (``NodeContext.ipvs_scheduler``);
* the ipsets, with upstream's names, types, create options and entry strings
  (``ipset.go``: ``ipsetInfo``); every set exists even when empty, as upstream creates them;
* the iptables rules that remain in IPVS mode (``writeIptablesRules``): nat KUBE-SERVICES,
  KUBE-POSTROUTING (hairpin masquerade via KUBE-LOOP-BACK, then the 0x4000 mark),
  KUBE-NODE-PORT, KUBE-LOAD-BALANCER, KUBE-MARK-MASQ; filter KUBE-FORWARD, KUBE-NODE-PORT,
  KUBE-PROXY-FIREWALL, KUBE-SOURCE-RANGES-FIREWALL, KUBE-IPVS-FILTER, KUBE-IPVS-OUT-FILTER;
* the sysctls the proxier ensures.

Endpoint choice per virtual server follows ``syncEndpoint``: ClusterIP virtual servers use
the local endpoints when ``internalTrafficPolicy: Local``, externalIP/LB/NodePort ones when
``externalTrafficPolicy: Local``; with no local endpoint both fall back to the cluster
endpoints (PR #97081, a known difference from iptables mode, which drops).

Where this clone chooses (upstream is not deterministic or the model lacks an input):

* output order is sorted (virtual servers by protocol, address, port; set members as
  strings); upstream iterates Go maps;
* NodePort virtual servers go on ``NodeContext.node_ips`` (the agent passes every local
  non-loopback IPv4 address, as ``GetAllLocalAddressesExcept(kube-ipvs0)`` does);
* a ``0.0.0.0/0`` source range turns the LB firewall off, as in iptables mode (a
  ``hash:ip,port,net`` set cannot hold a /0 entry, so upstream's add would fail);
* the mark is printed ``0x4000`` (upstream formats ``%#08x``; the kernel stores a number);
* serving-and-terminating endpoints used as the fallback (KEP-1669) get weight 1, as
  upstream; weight 0 is what graceful termination gives a real server that went away
  (``ipvs_apply``).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Sequence

from .endpoints import categorize
from .model import MASQ_MARK, Endpoint, NodeContext, ServicePort

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh")

# IP_VS_SVC_F_* (include/uapi/linux/ip_vs.h) as kube-proxy uses them
FLAG_PERSISTENT = 0x0001
FLAG_HASHED = 0x0002             # set by the kernel on every service it holds
FLAG_SOURCE_HASH = 0x0010        # IP_VS_SVC_F_SCHED2: "mh-port" for the mh scheduler

FWD_MASQ = 0                     # IP_VS_CONN_F_MASQ
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ")
FILTER_CHAINS = ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL",
                 "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER")

# -- ipsets (pkg/proxy/ipvs/ipset.go) ---------------------------------------------------------
LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

# name, type, comment: upstream's ipsetInfo order
IPSET_INFO = (
    (LOOP_BACK, "hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    (CLUSTER_IP, "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    (EXTERNAL_IP, "hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    (EXTERNAL_IP_LOCAL, "hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER, "hash:ip,port", "Kubernetes service lb portal"),
    (LOAD_BALANCER_FW, "hash:ip,port",
     "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    (LOAD_BALANCER_LOCAL, "hash:ip,port",
     "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER_SOURCE_IP, "hash:ip,port,ip",
     "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    (LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net",
     "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    (NODE_PORT_TCP, "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    (NODE_PORT_LOCAL_TCP, "bitmap:port", "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    (NODE_PORT_UDP, "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    (NODE_PORT_LOCAL_UDP, "bitmap:port", "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    (NODE_PORT_SCTP, "hash:ip,port", "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    (NODE_PORT_LOCAL_SCTP, "hash:ip,port",
     "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
    (HEALTH_CHECK_NODE_PORT, "bitmap:port", "Kubernetes health check node port"),
    (IPVS_IPS, "hash:ip", "Addresses on the ipvs interface"),
)
IPSET_NAMES = tuple(name for name, _, _ in IPSET_INFO)
_COMMENTS = {name: comment for name, _, comment in IPSET_INFO}

# (set, table, from chain, target, match type, protocol match): ipsetWithIptablesChain
_SET_RULES = (
    (LOOP_BACK, "nat", "KUBE-POSTROUTING", "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", "KUBE-SERVICES", "KUBE-LOAD-BALANCER", "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", "KUBE-LOAD-BALANCER", "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", "KUBE-NODE-PORT", "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", "KUBE-NODE-PORT", "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", "KUBE-NODE-PORT", "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst,dst", "sctp"),
    (LOAD_BALANCER_FW, "filter", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL", "dst,dst", ""),
    (LOAD_BALANCER_SOURCE_CIDR, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
    (LOAD_BALANCER_SOURCE_IP, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
)

# Jumps from the built-in chains (iptablesJumpChain), ensured with -C / -I (prepend).
_JUMPS = (
    ("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    ("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    ("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
    ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter"),
)


def jump_rules() -> list[tuple[str, str, list[str]]]:
    """``(table, built-in chain, rule words)``; the last word is the target chain."""
    return [(table, chain, ["-m", "comment", "--comment", comment, "-j", target])
            for table, chain, target, comment in _JUMPS]


def ipset_name(name: str, v6: bool = False) -> str:
    """The IPv6 proxier's sets are ``KUBE-6-…`` (at most 31 characters)."""
    return name.replace("KUBE-", "KUBE-6-", 1)[:31] if v6 else name


# -- the result ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealServer:
    ip: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class VirtualServer:
    protocol: str                      # "TCP" | "UDP"
    ip: str
    port: int
    scheduler: str = DEFAULT_SCHEDULER
    timeout: int = 0                   # persistence timeout (seconds) when FLAG_PERSISTENT
    flags: int = 0
    reals: tuple[RealServer, ...] = ()
    spn: str = ""                      # the service port it belongs to
    kind: str = ""                     # cluster-ip | external-ip | load-balancer | node-port

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.protocol, self.ip, self.port)

    @property
    def persistent(self) -> bool:
        return bool(self.flags & FLAG_PERSISTENT)

    @property
    def name(self) -> str:
        """``IP:port/PROTO``, kube-proxy's ``VirtualServer.String()``."""
        return f"{self.ip}:{self.port}/{self.protocol}"

    def ipvsadm_lines(self) -> list[str]:
        """``ipvsadm -Sn`` form (also ``ipvsadm -R`` input)."""
        t = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[self.protocol]
        head = f"-A {t} {self.ip}:{self.port} -s {self.scheduler}"
        if self.flags & FLAG_SOURCE_HASH:
            head += " -b sh-port" if self.scheduler == "sh" else " -b mh-port"
        if self.persistent:
            head += f" -p {self.timeout}"
        return [head] + [f"-a {t} {self.ip}:{self.port} -r {r.ip}:{r.port} -m -w {r.weight}" for r in self.reals]


@dataclass(frozen=True)
class IPSet:
    name: str
    type: str
    comment: str
    entries: tuple[str, ...] = ()

    @property
    def create_options(self) -> str:
        """``ipset create`` options as kube-proxy passes them (``createSet``)."""
        if self.type == "bitmap:port":
            return "range 0-65535"
        return "family inet hashsize 1024 maxelem 65536"

    def save_lines(self) -> list[str]:
        return [f"create {self.name} {self.type} {self.create_options}"] + [f"add {self.name} {e}" for e in self.entries]


@dataclass(frozen=True)
class IPVSState:
    node: str
    bind_addresses: tuple[str, ...]                 # on kube-ipvs0, as /32
    virtual_servers: tuple[VirtualServer, ...]
    ipsets: tuple[IPSet, ...]
    iptables: str                                   # iptables-restore --noflush input
    sysctls: tuple[tuple[str, str], ...]
    scheduler: str = DEFAULT_SCHEDULER

    @property
    def real_server_count(self) -> int:
        return sum(len(vs.reals) for vs in self.virtual_servers)

    def ipset(self, name: str) -> IPSet:
        return next(s for s in self.ipsets if s.name == name)

    def ipvsadm_text(self) -> str:
        return "".join(line + "\n" for vs in self.virtual_servers for line in vs.ipvsadm_lines())

    def ipset_text(self) -> str:
        return "".join(line + "\n" for s in self.ipsets for line in s.save_lines())


# -- render ----------------------------------------------------------------------------------
def _v4(ip: str) -> bool:
    return ":" not in ip


def _ranges(port: ServicePort) -> list[ipaddress.IPv4Network] | None:
    """Parsed IPv4 source ranges; None when there are none or one allows everything."""
    nets = []
    for text in port.load_balancer_source_ranges:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            continue                          # invalid entries are ignored
        if net.version == 4:
            nets.append(net)
    if not nets or any(n.prefixlen == 0 for n in nets):
        return None
    return nets


def sysctls(node: NodeContext, kernel: tuple[int, int] | None = None) -> tuple[tuple[str, str], ...]:
    """The sysctls the IPVS proxier ensures. ``conn_reuse_mode`` is set to 0 only on
    kernels older than 5.9 (``kernel`` = (major, minor); None = unknown, left out)."""
    out = [("net/ipv4/vs/conntrack", "1")]
    if kernel is not None and kernel < (5, 9):
        out.append(("net/ipv4/vs/conn_reuse_mode", "0"))
    out += [("net/ipv4/vs/expire_nodest_conn", "1"),
            ("net/ipv4/vs/expire_quiescent_template", "1"),
            ("net/ipv4/ip_forward", "1")]
    if node.ipvs_strict_arp:
        out += [("net/ipv4/conf/all/arp_ignore", "1"), ("net/ipv4/conf/all/arp_announce", "2")]
    return tuple(out)


def _reals(endpoints: Sequence[Endpoint]) -> tuple[RealServer, ...]:
    unique = {e.address: e for e in endpoints if _v4(e.ip)}
    return tuple(RealServer(e.ip, e.port) for _, e in sorted(unique.items()))


def render(ports: Sequence[ServicePort], node: NodeContext,
           kernel: tuple[int, int] | None = None) -> IPVSState:
    """kube-proxy's IPVS ``syncProxyRules`` for ``node`` (IPv4)."""
    scheduler = node.ipvs_scheduler or DEFAULT_SCHEDULER
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown IPVS scheduler {scheduler!r} (one of {', '.join(SCHEDULERS)})")
    node_ips = tuple(ip for ip in node.node_ips if _v4(ip) and not ipaddress.ip_address(ip).is_loopback)
    local_addrs = set(node_ips)
    primary = ipaddress.ip_address(node_ips[0]) if node_ips else None
    sets: dict[str, set[str]] = {name: set() for name in IPSET_NAMES}
    servers: dict[tuple, VirtualServer] = {}
    bind: set[str] = set()
    no_node_access: list[tuple[str, str, int]] = []      # (LB IP, proto, port) for KUBE-IPVS-OUT-FILTER

    for p in sorted(ports, key=lambda p: (p.spn, p.proto, p.port)):
        proto, spn = p.proto, p.spn
        if not _v4(p.cluster_ip):
            continue
        c = categorize(p, node.name)

        def chosen(only_local: bool) -> tuple[RealServer, ...]:
            return _reals(c.local if only_local and c.local else c.cluster)

        flags, timeout = 0, 0
        if p.affinity_timeout is not None:
            flags, timeout = FLAG_PERSISTENT, p.affinity_timeout
        if scheduler == "mh":
            flags |= FLAG_SOURCE_HASH

        def add(ip: str, port: int, reals, kind: str) -> None:
            vs = VirtualServer(p.protocol, ip, port, scheduler, timeout, flags, reals, spn, kind)
            servers.setdefault(vs.key, vs)

        # hairpin: every local endpoint, as "IP,proto:port,IP"
        for e in p.endpoints:
            if node.name and e.node == node.name and _v4(e.ip):
                sets[LOOP_BACK].add(f"{e.ip},{proto}:{e.port},{e.ip}")
        # ClusterIP
        sets[CLUSTER_IP].add(f"{p.cluster_ip},{proto}:{p.port}")
        add(p.cluster_ip, p.port, chosen(p.internal_policy_local), "cluster-ip")
        bind.add(p.cluster_ip)
        epl = p.external_policy_local
        # externalIPs
        for eip in filter(_v4, p.external_ips):
            sets[EXTERNAL_IP_LOCAL if epl else EXTERNAL_IP].add(f"{eip},{proto}:{p.port}")
            add(eip, p.port, chosen(epl), "external-ip")
            if eip not in local_addrs:
                bind.add(eip)
        # LoadBalancer ingress IPs
        ranges = _ranges(p)
        for lb in filter(_v4, p.load_balancer_ips):
            entry = f"{lb},{proto}:{p.port}"
            sets[LOAD_BALANCER].add(entry)
            if epl:
                sets[LOAD_BALANCER_LOCAL].add(entry)
            if ranges:
                sets[LOAD_BALANCER_FW].add(entry)
                for net in ranges:
                    sets[LOAD_BALANCER_SOURCE_CIDR].add(f"{entry},{net}")
                if primary is not None and any(primary in net for net in ranges):
                    sets[LOAD_BALANCER_SOURCE_IP].add(f"{entry},{lb}")
                else:
                    no_node_access.append((lb, proto, p.port))
            add(lb, p.port, chosen(epl), "load-balancer")
            if lb not in local_addrs:
                bind.add(lb)
        # NodePort: a bitmap entry, and a virtual server on every node address
        if p.node_port and node_ips:
            upper = p.protocol.upper()
            if upper in ("TCP", "UDP"):
                sets[f"KUBE-NODE-PORT-{upper}"].add(str(p.node_port))
                if epl:
                    sets[f"KUBE-NODE-PORT-LOCAL-{upper}"].add(str(p.node_port))
            for ip in node_ips:
                add(ip, p.node_port, chosen(epl), "node-port")
        hc = getattr(p, "health_check_node_port", None)
        if hc:
            sets[HEALTH_CHECK_NODE_PORT].add(str(hc))

    sets[IPVS_IPS] = set(bind)
    ipsets = tuple(IPSet(name, typ, comment, tuple(sorted(sets[name], key=_entry_key)))
                   for name, typ, comment in IPSET_INFO)
    ordered = tuple(sorted(servers.values(), key=lambda v: (v.protocol, ipaddress.ip_address(v.ip), v.port)))
    return IPVSState(
        node=node.name,
        bind_addresses=tuple(sorted(bind, key=ipaddress.ip_address)),
        virtual_servers=ordered,
        ipsets=ipsets,
        iptables=_iptables(sets, node, no_node_access),
        sysctls=sysctls(node, kernel),
        scheduler=scheduler,
    )


def _entry_key(entry: str):
    """Sort set members numerically where they are ports or start with an address."""
    head = entry.split(",", 1)[0]
    if head.isdigit():
        return (0, int(head), entry)
    try:
        return (1, int(ipaddress.ip_address(head)), entry)
    except ValueError:
        return (2, 0, entry)


def _iptables(sets: dict[str, set[str]], node: NodeContext, no_node_access) -> str:
    """``writeIptablesRules``: nat then filter, each chain's rules in upstream's order."""
    mark = f"{MASQ_MARK:#x}"
    nat: list[str] = ["-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN"]
    flt: list[str] = []

    def q(name: str) -> str:
        return f'"{_COMMENTS[name]}"'

    for name, table, src, target, match, proto in _SET_RULES:
        if not sets[name]:
            continue
        p = f" -p {proto}" if proto else ""
        rule = f"-A {src}{p} -m comment --comment {q(name)} -m set --match-set {name} {match} -j {target}"
        (nat if table == "nat" else flt).append(rule)
    if sets[CLUSTER_IP]:
        base = f"-A KUBE-SERVICES -m comment --comment {q(CLUSTER_IP)} -m set --match-set {CLUSTER_IP}"
        if getattr(node, "masquerade_all", False):
            nat.append(f"{base} dst,dst -j KUBE-MARK-MASQ")
        elif node.pod_cidr:
            nat.append(f"{base} dst,dst ! -s {node.pod_cidr} -j KUBE-MARK-MASQ")
        else:
            nat.append(f"{base} src,dst -j KUBE-MARK-MASQ")

    def external_accepts(base: str) -> None:
        nat.append(f"{base} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
        nat.append(f"{base} -m addrtype --dst-type LOCAL -j ACCEPT")

    if sets[EXTERNAL_IP]:
        base = f"-A KUBE-SERVICES -m comment --comment {q(EXTERNAL_IP)} -m set --match-set {EXTERNAL_IP} dst,dst"
        nat.append(f"{base} -j KUBE-MARK-MASQ")
        external_accepts(base)
    if sets[EXTERNAL_IP_LOCAL]:
        external_accepts(f"-A KUBE-SERVICES -m comment --comment {q(EXTERNAL_IP_LOCAL)} "
                         f"-m set --match-set {EXTERNAL_IP_LOCAL} dst,dst")
    nat.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    nat.append("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ")
    flt.append("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    for lb, proto, port in no_node_access:
        flt.append(f"-A KUBE-IPVS-OUT-FILTER -s {lb} -m ipvs --vaddr {lb} --vproto {proto} --vport {port} -j DROP")
    for name in (CLUSTER_IP, LOAD_BALANCER):                     # acceptIPVSTraffic
        if sets[name]:
            nat.append(f"-A KUBE-SERVICES -m set --match-set {name} dst,dst -j ACCEPT")
    flt += [
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A KUBE-NODE-PORT -m comment --comment {q(HEALTH_CHECK_NODE_PORT)} "
        f"-m set --match-set {HEALTH_CHECK_NODE_PORT} dst -j ACCEPT",
    ]
    for name in (LOAD_BALANCER, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL):
        flt.append(f"-A KUBE-IPVS-FILTER -m set --match-set {name} dst,dst -j RETURN")
    flt.append(f"-A KUBE-IPVS-FILTER -m set --match-set {HEALTH_CHECK_NODE_PORT} dst -j RETURN")
    flt.append(f"-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set {IPVS_IPS} dst -j REJECT")
    masq = '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
    if node.random_fully:
        masq += " --random-fully"
    nat += [f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
            masq,
            f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}"]
    # Group by chain, keeping each chain's order (iptables-restore appends per chain).
    nat = _by_chain(nat, NAT_CHAINS)
    flt = _by_chain(flt, FILTER_CHAINS)
    lines = (["*nat"] + [f":{c} - [0:0]" for c in NAT_CHAINS] + nat + ["COMMIT"]
             + ["*filter"] + [f":{c} - [0:0]" for c in FILTER_CHAINS] + flt + ["COMMIT"])
    return "\n".join(lines) + "\n"


def _by_chain(rules: list[str], chains: Sequence[str]) -> list[str]:
    order = {c: i for i, c in enumerate(chains)}
    return sorted(rules, key=lambda r: order[r.split()[1]])     # sorted() is stable


def render_text(ports: Sequence[ServicePort], node: NodeContext) -> str:
    """What ``netsim proxy render --mode ipvs`` prints: ``ipvsadm -Sn``, ``ipset save`` and the
    ``iptables-restore`` input, each under a comment header; deterministic."""
    st = render(ports, node)
    out = [f"# kube-proxy (ipvs mode) on {node.name}: {len(st.virtual_servers)} virtual servers, "
           f"{st.real_server_count} real servers, scheduler {st.scheduler}",
           "# sysctls: " + " ".join(f"{k}={v}" for k, v in st.sysctls)
           + " (net/ipv4/vs/conn_reuse_mode=0 only on kernels < 5.9)",
           f"# {DUMMY_DEVICE} (dummy, down) addresses: " + (" ".join(f"{a}/32" for a in st.bind_addresses) or "none"),
           "# jumps from the built-in chains, ensured with iptables -C/-I:"]
    out += [f"#   -t {t} -I {c} " + " ".join(f'"{w}"' if " " in w else w for w in words)
            for t, c, words in jump_rules()]
    out.append("# --- ipvsadm -Sn ---")
    text = "\n".join(out) + "\n" + st.ipvsadm_text()
    text += "# --- ipset save ---\n"
    for s in st.ipsets:
        text += f"# {s.name}: {s.comment}\n" + "".join(line + "\n" for line in s.save_lines())
    text += "# --- iptables-restore --noflush ---\n" + st.iptables
    return text
