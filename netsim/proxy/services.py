"""Services as kube-proxy sees them: the API server's allocations plus the EndpointSlice
controller's work, done once for the whole cluster. Pure, no root.

``resolve(topo, plan)`` plays three control-plane parts:

* the API server's allocators: a ClusterIP for every Service that gets one, a nodePort
  for every port of a NodePort/LoadBalancer Service, and (MetalLB style) an address of
  ``cluster.loadBalancerPool`` for every LoadBalancer Service;
* the EndpointSlice controller: a Service with a selector gets one endpoint per matching
  pod of the plan (same namespace), on the resolved targetPort;
* kube-proxy's EndpointSlice cache: hand-written slices of a Service are merged in, ports
  matched by name and protocol, de-duplicated by ``IP:port`` and sorted by that string.

The result is one ``ServicePort`` per Service port kube-proxy would program (headless
and ExternalName Services program nothing), plus the allocations, so that a later
``resolve(..., previous=...)`` keeps every Service's ClusterIP, nodePorts and LB IP.

Allocation is deterministic where Kubernetes is random. Like the API server, each
range has a *static band* at its bottom kept for addresses (ports) users pick by hand,
and a *dynamic band* above it where allocations go first:

* ClusterIPs: serviceCIDR minus network and broadcast address; static band
  ``min(max(16, size/16), 256)`` addresses (0 when the range has 16 or fewer). The
  first host (10.96.0.1, the ``kubernetes`` Service) and the tenth (10.96.0.10, kube-dns)
  are never allocated; the first host may only be asked for by ``default/kubernetes``.
* nodePorts: 30000–32767, static band ``min(max(16, size/32), 128)`` ports (30000–30085).

An allocation starts at an offset derived from a SHA-256 of the Service key
(``ns/name``, or ``ns/name:port/PROTO`` for a nodePort) inside the dynamic band and
probes linearly, wrapping; only when the dynamic band is full does it fall back to the
static band. Explicit values and previous allocations are honoured first.

nodePort uniqueness is checked per (port, protocol), as the topology validation does
(Kubernetes is stricter: one nodePort per Service, across protocols, except that one
Service may use it for the TCP and UDP variants of one port). Allocated nodePorts are
free in every protocol, and the ports of one Service that share a port number (TCP and
UDP 53, say) share the nodePort, as the API server does.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Iterator

from ..errors import Problem, TopologyError
from ..plan.state import LabPlan, PodPlan, from_data
from ..topology.model import EndpointSlice, Service, Topology
from ..topology.model import ServicePort as ManifestPort
from .model import Endpoint, ServicePort

NODE_PORT_RANGE = (30000, 32767)
KUBERNETES_SERVICE = "default/kubernetes"
KUBE_DNS_OFFSET = 9                  # the tenth host of serviceCIDR: 10.96.0.10
EXTERNAL_TYPES = ("NodePort", "LoadBalancer")
ANYWHERE = IPv4Network("0.0.0.0/0")

NodePortKey = tuple[str, str, str]   # ("ns/name", port name, protocol)


@dataclass(frozen=True)
class Resolution:
    """Every Service port kube-proxy programs, the allocations behind them, and notes."""

    ports: tuple[ServicePort, ...] = ()
    cluster_ips: dict[str, str] = field(default_factory=dict)          # "ns/name" → IP
    node_ports: dict[NodePortKey, int] = field(default_factory=dict)   # (svc, port name, proto) → port
    lb_ips: dict[str, str] = field(default_factory=dict)               # "ns/name" → LB IP
    warnings: tuple[Problem, ...] = ()

    def service(self, namespace: str, name: str) -> tuple[ServicePort, ...]:
        """The ports of one Service (empty if it programs nothing)."""
        return tuple(p for p in self.ports if p.namespace == namespace and p.name == name)

    def port(self, namespace: str, name: str, port_name: str = "", protocol: str = "TCP") -> ServicePort:
        return next(p for p in self.ports if (p.namespace, p.name, p.port_name, p.protocol)
                    == (namespace, name, port_name, protocol))

    def to_dict(self) -> dict:
        """JSON-friendly (node_ports keys become lists), for the lab state file."""
        return {"ports": [asdict(p) for p in self.ports],
                "cluster_ips": dict(self.cluster_ips),
                "node_ports": [[svc, name, proto, np] for (svc, name, proto), np in sorted(self.node_ports.items())],
                "lb_ips": dict(self.lb_ips),
                "warnings": [asdict(w) for w in self.warnings]}

    @staticmethod
    def from_dict(data: dict) -> "Resolution":
        return Resolution(
            ports=tuple(from_data(ServicePort, p) for p in data.get("ports", ())),
            cluster_ips=dict(data.get("cluster_ips", {})),
            node_ports={(svc, name, proto): int(np) for svc, name, proto, np in data.get("node_ports", ())},
            lb_ips=dict(data.get("lb_ips", {})),
            warnings=tuple(Problem(**w) for w in data.get("warnings", ())))


def resolve(topo: Topology, plan: LabPlan, previous: Resolution | None = None) -> Resolution:
    """Resolve every Service of ``topo`` against the pods of ``plan``.

    Raises ``TopologyError`` with every problem Kubernetes would refuse (taken or
    out-of-range ClusterIPs, nodePorts and LB IPs, exhausted ranges)."""
    prev = previous or Resolution()
    problems: list[Problem] = []
    warnings: list[Problem] = []
    in_order = [s for s in topo.services if _proxied(s, problems)]      # manifest order: who asked first
    services = sorted(in_order, key=_key)
    cluster_ips = _cluster_ips(topo.cluster.service_cidr, in_order, services, prev, problems)
    node_ports = _node_ports(in_order, services, prev, problems)
    reserved = {n.address: f"node {n.name}" for n in plan.nodes}
    reserved.update({e.address: f"external {e.name}" for e in plan.externals})
    lb_ips = _lb_ips(topo.cluster.load_balancer_pool, reserved, in_order, services, prev, problems, warnings)
    if problems:
        raise TopologyError(problems, topo.source)

    ports: list[ServicePort] = []
    for svc in services:
        ports.extend(_service_ports(svc, topo, plan, cluster_ips, node_ports, lb_ips, warnings))
    warnings.extend(_slice_warnings(topo))
    ports.sort(key=lambda p: (p.namespace, p.name, p.port_name, p.protocol))
    return Resolution(tuple(ports), cluster_ips, node_ports, lb_ips, tuple(warnings))


# -- helpers: which Services, where they are -----------------------------------

def _key(svc: Service) -> str:
    return f"{svc.namespace}/{svc.name}"


def _where(svc: Service) -> str:
    """The path prefix of a Service's fields, worded as the loader's cross-checks word it."""
    return f"{svc.source} Service {svc.name}: spec".strip()


def _proxied(svc: Service, problems: list[Problem]) -> bool:
    """Does kube-proxy program this Service? (Headless and ExternalName: no.)"""
    if svc.type == "ExternalName":
        if svc.cluster_ip not in (None, "None"):
            problems.append(Problem(f"{_where(svc)}.clusterIP", "may not be set for ExternalName services",
                                    "remove clusterIP; an ExternalName Service is a DNS alias"))
        return False
    if svc.cluster_ip == "None":
        if svc.type in EXTERNAL_TYPES:
            problems.append(Problem(f"{_where(svc)}.clusterIP", f"may not be None (headless) for {svc.type} services",
                                    "use type: ClusterIP for a headless Service, or remove clusterIP: None"))
        return False
    return True


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _static_band(size: int, lo: int, hi: int, step: int) -> int:
    """The API server's calculateRangeOffset: min(max(lo, size/step), hi), 0 for tiny ranges."""
    if size <= lo:
        return 0
    return min(max(lo, size // step), hi)


def _probe(size: int, static: int, key: str, usable: Callable[[int], bool]) -> int | None:
    """First usable offset: from a hash of ``key`` through the dynamic band (wrapping),
    then the static band from its start."""
    dynamic = size - static
    if dynamic > 0:
        start = _hash(key) % dynamic
        for i in range(dynamic):
            off = static + (start + i) % dynamic
            if usable(off):
                return off
    for off in range(static):
        if usable(off):
            return off
    return None


# -- ClusterIPs ---------------------------------------------------------------

def _cluster_ips(cidr: IPv4Network, in_order: list[Service], services: list[Service],
                 prev: Resolution, problems: list[Problem]) -> dict[str, str]:
    if cidr.prefixlen >= 31:
        base, size = int(cidr.network_address), cidr.num_addresses
    else:
        base, size = int(cidr.network_address) + 1, cidr.num_addresses - 2
    static = _static_band(size, 16, 256, 16)
    taken: dict[int, str] = {}                     # offset → "ns/name"

    def offset(ip: str) -> int | None:
        off = int(IPv4Address(ip)) - base
        return off if 0 <= off < size else None

    def reserved_for(off: int, key: str) -> bool:
        return off == 0 and key != KUBERNETES_SERVICE

    # Previous allocations stay with their Service, before anyone else may ask for them.
    for svc in services:
        key = _key(svc)
        if svc.cluster_ip is None and key in prev.cluster_ips:
            off = offset(prev.cluster_ips[key])
            if off is not None and not reserved_for(off, key) and off not in taken:
                taken[off] = key
    # Explicit addresses, in the order they were written.
    for svc in in_order:
        if svc.cluster_ip is None:
            continue
        key, path = _key(svc), f"{_where(svc)}.clusterIP"
        ip = IPv4Address(svc.cluster_ip)
        off = offset(svc.cluster_ip)
        if ip not in cidr:
            problems.append(Problem(path, f"{ip} is not inside serviceCIDR {cidr}",
                                    "pick an address in serviceCIDR, or leave clusterIP unset to have one allocated"))
        elif off is None:
            problems.append(Problem(path, f"{ip} is not a usable address of serviceCIDR {cidr} (network or broadcast address)",
                                    "leave clusterIP unset to have a free one allocated"))
        elif reserved_for(off, key):
            problems.append(Problem(path, f"{ip} is reserved for the kubernetes Service ({KUBERNETES_SERVICE})",
                                    "leave clusterIP unset to have a free one allocated"))
        elif off in taken:
            problems.append(Problem(path, f"{ip} is already allocated to Service {taken[off]}",
                                    "leave clusterIP unset to have a free one allocated"))
        else:
            taken[off] = key
    out = {key: str(IPv4Address(base + off)) for off, key in taken.items()}
    # Everything else: default/kubernetes gets the first host, as the API server gives it.
    for svc in services:
        key = _key(svc)
        if key in out or svc.cluster_ip is not None:
            continue
        first_host = key == KUBERNETES_SERVICE and size > 0 and 0 not in taken
        off = 0 if first_host else _probe(size, static, key,
                                          lambda o: o not in taken and o not in (0, KUBE_DNS_OFFSET))
        if off is None:
            problems.append(Problem(f"{_where(svc)}.clusterIP",
                                    f"serviceCIDR {cidr} is exhausted: no free ClusterIP left for Service {key}",
                                    "use a larger cluster.serviceCIDR, or fewer Services"))
            continue
        taken[off] = key
        out[key] = str(IPv4Address(base + off))
    return dict(sorted(out.items()))


# -- nodePorts ----------------------------------------------------------------

def _wants_node_ports(svc: Service) -> bool:
    return svc.type in EXTERNAL_TYPES


def _node_ports(in_order: list[Service], services: list[Service], prev: Resolution,
                problems: list[Problem]) -> dict[NodePortKey, int]:
    lo, hi = NODE_PORT_RANGE
    size = hi - lo + 1
    static = _static_band(size, 16, 128, 32)
    taken: dict[tuple[int, str], str] = {}           # (nodePort, protocol) → "ns/name"
    owners: dict[int, set[str]] = {}                 # nodePort → Services using it (any protocol)
    out: dict[NodePortKey, int] = {}

    def claim(key: str, port: ManifestPort, np: int) -> None:
        taken[(np, port.protocol)] = key
        owners.setdefault(np, set()).add(key)
        out[(key, port.name, port.protocol)] = np

    for svc in services:
        if not _wants_node_ports(svc):
            continue
        key = _key(svc)
        for port in svc.ports:
            np = prev.node_ports.get((key, port.name, port.protocol))
            if port.node_port is None and np is not None and lo <= np <= hi and (np, port.protocol) not in taken:
                claim(key, port, np)
    for svc in in_order:
        if not _wants_node_ports(svc):
            continue
        key = _key(svc)
        for i, port in enumerate(svc.ports):
            np = port.node_port
            if np is None:
                continue
            path = f"{_where(svc)}.ports[{i}].nodePort"
            if not lo <= np <= hi:
                problems.append(Problem(path, f"{np} is outside the node port range {lo}-{hi}",
                                        "the default --service-node-port-range is 30000-32767"))
            elif (np, port.protocol) in taken:
                problems.append(Problem(path, f"{np}/{port.protocol} is already used by Service {taken[(np, port.protocol)]}",
                                        "each nodePort can be allocated once; leave nodePort unset to have one allocated"))
            else:
                claim(key, port, np)
    for svc in services:
        if not _wants_node_ports(svc):
            continue
        key = _key(svc)
        for i, port in enumerate(svc.ports):
            if (key, port.name, port.protocol) in out:
                continue
            # Another port of this Service with the same number shares its nodePort.
            shared = next((out[(key, p.name, p.protocol)] for p in svc.ports
                           if p.port == port.port and (key, p.name, p.protocol) in out
                           and (out[(key, p.name, p.protocol)], port.protocol) not in taken), None)
            if shared is not None:
                claim(key, port, shared)
                continue
            off = _probe(size, static, f"{key}:{port.port}/{port.protocol}",
                         lambda o: not (owners.get(lo + o, set()) - {key}) and (lo + o, port.protocol) not in taken)
            if off is None:
                problems.append(Problem(f"{_where(svc)}.ports[{i}].nodePort",
                                        f"the node port range {lo}-{hi} is exhausted: no free {port.protocol} port left",
                                        "use fewer NodePort/LoadBalancer Services"))
                continue
            claim(key, port, lo + off)
    return dict(sorted(out.items()))


# -- LoadBalancer IPs ---------------------------------------------------------

def _pool_addresses(pool: tuple[IPv4Network, ...]) -> Iterator[IPv4Address]:
    """Addresses MetalLB would hand out, in pool order (no network/broadcast above /31)."""
    for net in pool:
        yield from (net.hosts() if net.prefixlen < 31 else iter(net))


def _lb_ips(pool: tuple[IPv4Network, ...], reserved: dict[str, str], in_order: list[Service],
            services: list[Service], prev: Resolution, problems: list[Problem],
            warnings: list[Problem]) -> dict[str, str]:
    lbs = [s for s in services if s.type == "LoadBalancer"]
    if not pool:
        for svc in lbs:
            asked = f" (loadBalancerIP {svc.load_balancer_ip} is not assigned either)" if svc.load_balancer_ip else ""
            warnings.append(Problem(f"{_where(svc)}.type",
                                    f"no cluster.loadBalancerPool: the LoadBalancer stays pending, reachable by "
                                    f"ClusterIP and nodePort only{asked}",
                                    "add cluster.loadBalancerPool, e.g. [192.168.100.240/28] inside underlayCIDR"))
        return {}
    pool_text = ", ".join(str(n) for n in pool)

    def usable(ip: IPv4Address) -> bool:
        return any(ip in n and (n.prefixlen >= 31 or ip not in (n.network_address, n.broadcast_address))
                   for n in pool) and str(ip) not in reserved

    taken: dict[str, str] = {}                     # IP → "ns/name"
    for svc in lbs:
        key = _key(svc)
        ip = prev.lb_ips.get(key)
        if svc.load_balancer_ip is None and ip is not None and usable(IPv4Address(ip)) and ip not in taken:
            taken[ip] = key
    for svc in in_order:
        if svc.type != "LoadBalancer" or svc.load_balancer_ip is None:
            continue
        ip, key, path = svc.load_balancer_ip, _key(svc), f"{_where(svc)}.loadBalancerIP"
        if not any(ip in n for n in pool):
            problems.append(Problem(path, f"{ip} is not in cluster.loadBalancerPool ({pool_text})",
                                    "pick an address of the pool, or leave loadBalancerIP unset"))
        elif str(ip) in reserved:
            problems.append(Problem(path, f"{ip} is the address of {reserved[str(ip)]}",
                                    "pick another address of the pool, or leave loadBalancerIP unset"))
        elif not usable(ip):
            problems.append(Problem(path, f"{ip} is the network or broadcast address of its pool ({pool_text})",
                                    "pick a host address of the pool, or leave loadBalancerIP unset"))
        elif str(ip) in taken:
            problems.append(Problem(path, f"{ip} is already assigned to Service {taken[str(ip)]}",
                                    "pick another address of the pool, or leave loadBalancerIP unset"))
        else:
            taken[str(ip)] = key
    out = {key: ip for ip, key in taken.items()}
    for svc in lbs:
        key = _key(svc)
        if key in out or svc.load_balancer_ip is not None:
            continue
        ip = next((str(a) for a in _pool_addresses(pool) if str(a) not in taken and str(a) not in reserved), None)
        if ip is None:
            problems.append(Problem(f"{_where(svc)}.type",
                                    f"cluster.loadBalancerPool ({pool_text}) is exhausted: no address left for Service {key}",
                                    "add addresses to cluster.loadBalancerPool, or use fewer LoadBalancer Services"))
            continue
        taken[ip] = key
        out[key] = ip
    return dict(sorted(out.items()))


# -- ports and endpoints ------------------------------------------------------

def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _target_port(pod: PodPlan, port: ManifestPort) -> int | None:
    """podutil.FindPort: a number as is; a name is the pod's containerPort of that name
    *and* the Service port's protocol."""
    if isinstance(port.target_port, int):
        return port.target_port
    return next((p.port for p in pod.ports if p.name == port.target_port and p.protocol == port.protocol), None)


def _slices_of(topo: Topology, svc: Service) -> list[EndpointSlice]:
    return sorted((s for s in topo.endpoint_slices
                   if s.namespace == svc.namespace and s.service_name == svc.name), key=lambda s: s.name)


def _service_ports(svc: Service, topo: Topology, plan: LabPlan, cluster_ips: dict[str, str],
                   node_ports: dict[NodePortKey, int], lb_ips: dict[str, str],
                   warnings: list[Problem]) -> list[ServicePort]:
    key, where = _key(svc), _where(svc)
    if key not in cluster_ips:          # not allocated: only after an error, which was raised
        return []
    # An empty selector is no selector: the API stores {} as nothing.
    pods = [p for p in plan.pods if p.namespace == svc.namespace and _matches(svc.selector, p.labels)] \
        if svc.selector else []
    slices = _slices_of(topo, svc)
    if svc.selector and not pods:
        sel = ", ".join(f"{k}={v}" for k, v in sorted(svc.selector.items()))
        warnings.append(Problem(f"{where}.selector", f"{sel} matches no pod in namespace {svc.namespace}",
                                "the Service has no endpoints; connections to it are rejected"))
    if not svc.selector and not slices:
        warnings.append(Problem(where, "the Service has no selector and no EndpointSlice names it, so it has no endpoints",
                                f"add a selector, or an EndpointSlice labelled kubernetes.io/service-name: {svc.name}"))
    if svc.selector:
        for sl in slices:
            warnings.append(Problem(f"{sl.source} EndpointSlice {sl.name}".strip(),
                                    f"Service {key} has a selector: kube-proxy merges this hand-written slice "
                                    f"with the endpoints derived from its pods",
                                    "remove the Service's selector to manage its endpoints by hand, or drop the slice"))
    externally = svc.type in EXTERNAL_TYPES or bool(svc.external_ips)
    ranges = tuple(str(r) for r in svc.load_balancer_source_ranges) if svc.type == "LoadBalancer" else ()
    if ANYWHERE in svc.load_balancer_source_ranges:
        ranges = ()
    out = []
    for i, port in enumerate(svc.ports):
        found: dict[str, Endpoint] = {}
        for pod in pods:
            number = _target_port(pod, port)
            if number is not None:
                ep = Endpoint(pod.ip, number, pod.node, True, True, False, pod.key)
                found.setdefault(ep.address, ep)
        if pods and not found and isinstance(port.target_port, str):
            warnings.append(Problem(f"{where}.ports[{i}].targetPort",
                                    f"no pod selected by the Service declares a {port.protocol} port named {port.target_port!r}",
                                    f"name a containerPort {port.target_port!r} with protocol {port.protocol}, "
                                    f"or give targetPort as a number"))
        for sl in slices:
            for sp in sl.ports:
                if sp.name != port.name or sp.protocol != port.protocol:
                    continue
                for e in sl.endpoints:
                    if not e.addresses:
                        continue
                    ep = Endpoint(str(e.addresses[0]), sp.port, e.node_name, e.ready, e.serving, e.terminating,
                                  f"{sl.namespace}/{e.target_pod}" if e.target_pod else None)
                    found.setdefault(ep.address, ep)
        np = node_ports.get((key, port.name, port.protocol)) if svc.type in EXTERNAL_TYPES else None
        out.append(ServicePort(
            namespace=svc.namespace, name=svc.name, port_name=port.name, protocol=port.protocol,
            port=port.port, cluster_ip=cluster_ips[key], node_port=np,
            external_ips=tuple(str(a) for a in svc.external_ips),
            load_balancer_ips=(lb_ips[key],) if key in lb_ips else (),
            load_balancer_source_ranges=ranges,
            external_policy_local=externally and svc.external_traffic_policy == "Local",
            internal_policy_local=svc.internal_traffic_policy == "Local",
            affinity_timeout=svc.affinity_timeout if svc.session_affinity == "ClientIP" else None,
            endpoints=tuple(sorted(found.values(), key=lambda e: e.address))))
    return out


def _slice_warnings(topo: Topology) -> list[Problem]:
    """Slices kube-proxy would read but never use: no such Service, or no matching port."""
    services = {(s.namespace, s.name): s for s in topo.services}
    out = []
    for sl in sorted(topo.endpoint_slices, key=lambda s: (s.namespace, s.name)):
        where = f"{sl.source} EndpointSlice {sl.name}".strip()
        svc = services.get((sl.namespace, sl.service_name))
        if svc is None:
            out.append(Problem(f"{where}: metadata.labels",
                               f"no Service {sl.namespace}/{sl.service_name} in this topology: the slice is not used",
                               "kubernetes.io/service-name must name a Service in the slice's namespace"))
            continue
        if svc.type == "ExternalName" or svc.cluster_ip == "None":
            continue
        wanted = {(p.name, p.protocol) for p in svc.ports}
        for i, sp in enumerate(sl.ports):
            if (sp.name, sp.protocol) not in wanted:
                names = ", ".join(f"{n or '(unnamed)'}/{proto}" for n, proto in sorted(wanted))
                out.append(Problem(f"{where}: ports[{i}]",
                                   f"port {sp.name or '(unnamed)'}/{sp.protocol} matches no port of Service "
                                   f"{sl.namespace}/{svc.name} ({names}): its endpoints are not used",
                                   "slice ports are matched to Service ports by name and protocol"))
    return out
