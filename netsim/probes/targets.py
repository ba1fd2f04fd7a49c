"""What FROM and TARGET name on a lab. Pure: reads a ``LabPlan`` and a proxy ``Resolution``.

FROM is a pod (``name`` or ``ns/name``), a node or an external host. TARGET is one of

* a pod: ``web-abc``, ``default/web-abc``, ``pod/web-abc`` or its IP, with ``:PORT``;
* a Service by name: ``web``, ``default/web``, ``svc/web`` (its ClusterIP), or
  ``ClusterIP:port``; a bare name that is a pod and a Service means the pod;
* a NodePort: ``NodeIP:nodePort`` or ``node-1:nodePort``;
* a LoadBalancer IP: ``LB-IP:port``;
* a node (``node-1``, its IP; ICMP) or an external host (``ext-client``, its IP, its
  built-in server's port).

(A DNS name — ``dns:web``, ``web.default.svc.cluster.local`` — is looked up from the source
pod first, by ``dnsname``, and its answer's address is then resolved here.)

``--proto`` and ``--port`` pick among a Service's ports (``--port`` may be the port's
number or name). The answer says which pods may answer (``backends``) so a caller can
check the reply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from ..errors import NetsimError
from ..plan.state import LabPlan
from ..proxy.model import ServicePort

PROTOS = ("tcp", "udp", "icmp")
KIND_PREFIXES = {"pod": "pod", "svc": "service", "service": "service", "node": "node",
                 "ext": "external", "external": "external"}


class ProbeError(NetsimError):
    """A probe could not be set up: unknown source or target, unusable port or protocol."""


@dataclass(frozen=True)
class Source:
    kind: str                  # pod | node | external
    name: str                  # pod key, node or external name
    netns: str
    ip: str                    # its own address (a node's underlay IP)
    node: str | None = None    # the node it runs on (pods) or is (nodes)


@dataclass(frozen=True)
class Target:
    kind: str                  # pod | clusterip | nodeport | loadbalancer | node | external | ip
    ip: str
    port: int | None           # None for ICMP
    proto: str                 # tcp | udp | icmp
    label: str                 # for people: "default/web:http ClusterIP 10.96.x.y:80/TCP"
    service: str | None = None            # "ns/name" of the Service, if any
    port_name: str = ""
    node: str | None = None               # the node a NodePort is addressed to, or a pod runs on
    backends: tuple[str, ...] = ()        # keys (pod "ns/name", or external name) that may answer
    local_backends: tuple[str, ...] = ()  # of those, the ones on ``node`` (eTP=Local)
    external_policy_local: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}" if self.port else self.ip


def resolve_source(text: str, plan: LabPlan) -> Source:
    kind, name = _split_kind(text)
    item = plan.find(name) if kind in (None, "pod", "node", "external") else None
    if item is None and is_ip(name):
        item = _by_ip(plan, name)
    if item is None:
        raise ProbeError(f"no pod, node or external named {text!r} in lab {plan.lab} (known: {_known(plan)})")
    if hasattr(item, "host_veth"):
        return Source("pod", item.key, item.netns, item.ip, item.node)
    if hasattr(item, "subnet"):
        return Source("node", item.name, item.netns, item.address, item.name)
    return Source("external", item.name, item.netns, item.address)


def resolve_target(text: str, plan: LabPlan, res, proto: str | None = None,
                   port: str | int | None = None) -> Target:
    """Parse TARGET; ``res`` is the lab's proxy ``Resolution`` (None: no Services)."""
    if proto is not None and proto not in PROTOS:
        raise ProbeError(f"unknown protocol {proto!r} (one of {', '.join(PROTOS)})")
    ports = tuple(res.ports) if res is not None else ()
    host, sep, tail = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if not sep:
        host, tail = text, ""
    if tail:
        if not tail.isdigit():
            raise ProbeError(f"{text!r}: the part after ':' must be a port number")
        if port is not None and str(port) != tail:
            raise ProbeError(f"{text!r} names port {tail} but --port says {port}")
        port = tail
    kind, name = _split_kind(host)

    if is_ip(name):
        return _by_address(name, port, proto, plan, ports, text)
    pod = next((p for p in plan.pods if name in (p.name, p.key)), None) if kind in (None, "pod") else None
    svc = _service_ports(name, ports) if kind in (None, "service") else ()
    if pod is not None:                  # a bare name that is both: the pod (svc/NAME for the Service)
        return _pod_target(pod, port, proto)
    if svc:
        sp = _pick_port(svc, port, proto, text)
        return _clusterip(sp, proto, plan)
    machine = plan.find(name) if kind in (None, "node", "external") else None
    if machine is not None and not hasattr(machine, "host_veth"):
        address = getattr(machine, "address")
        return _by_address(address, port, proto, plan, ports, text)
    if kind == "service" or (kind is None and "/" in name):
        known = sorted({f"{p.namespace}/{p.name}" for p in ports})
        raise ProbeError(f"no Service {name!r} with ports in lab {plan.lab} (Services: {', '.join(known) or 'none'})")
    raise ProbeError(f"no pod, Service, node or external named {name!r} in lab {plan.lab} (known: {_known(plan, ports)})")


# -- by address -------------------------------------------------------------------------
def _by_address(ip: str, port, proto, plan: LabPlan, ports: tuple[ServicePort, ...], text: str) -> Target:
    num = _port_number(port, text)
    want = (proto or "").upper()
    cluster = [p for p in ports if p.cluster_ip == ip]
    if cluster:
        chosen = [p for p in cluster if (num is None or p.port == num) and (not want or want == "ICMP" or p.protocol == want)]
        if not chosen:
            raise ProbeError(f"ClusterIP {ip} has no port {num}/{want or 'TCP'} "
                             f"(ports: {', '.join(f'{p.port}/{p.protocol}' for p in cluster)})")
        return _clusterip(_prefer_tcp(chosen), proto, plan)
    lb = [p for p in ports if ip in p.load_balancer_ips]
    if lb:
        chosen = [p for p in lb if (num is None or p.port == num) and (not want or want == "ICMP" or p.protocol == want)]
        if not chosen:
            raise ProbeError(f"LoadBalancer IP {ip} has no port {num}/{want or 'TCP'}")
        sp = _prefer_tcp(chosen)
        return _service_target("loadbalancer", sp, ip, sp.port, proto, plan, None,
                               f"{sp.spn} LoadBalancer {ip}:{sp.port}/{sp.protocol}")
    node = next((n for n in plan.nodes if n.address == ip), None)
    if node is not None:
        if num is None:
            return Target("node", ip, None, proto or "icmp", f"node {node.name} {ip}", node=node.name)
        np = [p for p in ports if p.node_port == num and (not want or want == "ICMP" or p.protocol == want)]
        if not np:
            raise ProbeError(f"{ip}:{num} is node {node.name}, but no Service has nodePort {num}"
                             f"{'/' + want if want else ''} (nodePorts: "
                             f"{', '.join(sorted({f'{p.node_port}/{p.protocol}' for p in ports if p.node_port})) or 'none'})")
        sp = _prefer_tcp(np)
        return _service_target("nodeport", sp, ip, num, proto, plan, node.name,
                               f"{sp.spn} NodePort {node.name} {ip}:{num}/{sp.protocol}")
    pod = next((p for p in plan.pods if p.ip == ip), None)
    if pod is not None:
        return _pod_target(pod, port, proto)
    ext = next((e for e in plan.externals if e.address == ip), None)
    if ext is not None:
        p = _default_port(ext.ports, num, proto)
        pr = proto or (p[1].lower() if p else "icmp")
        return Target("external", ip, p[0] if p and pr != "icmp" else None, pr,
                      f"external {ext.name} {ip}", backends=(ext.name,))
    if not _inside_lab(ip, plan, ports):
        raise ProbeError(f"{ip} is outside lab {plan.lab}: probes only go to the lab's own pod, Service, "
                         f"underlay and load-balancer addresses")
    if num is None and proto not in (None, "icmp"):
        raise ProbeError(f"{text!r}: give a port for {proto} to an address outside the lab's plan")
    return Target("ip", ip, num, proto or ("tcp" if num else "icmp"), ip if num is None else f"{ip}:{num}")


def _inside_lab(ip: str, plan: LabPlan, ports) -> bool:
    """Is ``ip`` one of the lab's own ranges? (Probes never aim anywhere else.)"""
    from ipaddress import IPv4Network
    addr = IPv4Address(ip)
    ranges = [plan.pod_cidr, plan.service_cidr, plan.underlay_cidr]
    if any(addr in IPv4Network(r) for r in ranges):
        return True
    return any(ip in p.load_balancer_ips or ip in p.external_ips for p in ports)


# -- builders ---------------------------------------------------------------------------
def _pod_target(pod, port, proto) -> Target:
    num = _port_number(port, pod.key)
    chosen = _default_port(pod.ports, num, proto, by_name=port)
    if proto not in (None, "icmp") and chosen is None:
        if num is None:
            raise ProbeError(f"pod {pod.key} declares no {proto.upper()} port; give one with --port")
        chosen = (num, proto.upper())
    pr = proto or (chosen[1].lower() if chosen else "icmp")
    if pr == "icmp":
        return Target("pod", pod.ip, None, "icmp", f"pod {pod.key} {pod.ip}", node=pod.node, backends=(pod.key,))
    return Target("pod", pod.ip, chosen[0], pr, f"pod {pod.key} {pod.ip}:{chosen[0]}/{pr.upper()}",
                  node=pod.node, backends=(pod.key,))


def _clusterip(sp: ServicePort, proto, plan: LabPlan) -> Target:
    return _service_target("clusterip", sp, sp.cluster_ip, sp.port, proto, plan, None,
                           f"{sp.spn} ClusterIP {sp.cluster_ip}:{sp.port}/{sp.protocol}")


def _service_target(kind, sp: ServicePort, ip, port, proto, plan, node, label) -> Target:
    keys = {p.ip: p.key for p in plan.pods}
    backends = tuple(keys.get(e.ip, e.ip) for e in sp.endpoints if e.ready)
    local = tuple(keys.get(e.ip, e.ip) for e in sp.endpoints if e.ready and node and e.node == node)
    pr = proto or sp.proto
    if pr == "icmp":
        label = label.rsplit(":", 1)[0] + " (ICMP)"
    return Target(kind, ip, None if pr == "icmp" else port, pr, label, f"{sp.namespace}/{sp.name}",
                  sp.port_name, node, backends, local, sp.external_policy_local,
                  extra={"target_port": sorted({e.port for e in sp.endpoints}) or None})


def _default_port(ports, num, proto, by_name=None):
    """(port, PROTO) among declared ports matching the request, or None."""
    for p in ports:
        if proto and proto != "icmp" and p.protocol.lower() != proto:
            continue
        if num is not None and p.port != num:
            continue
        if by_name is not None and num is None and getattr(p, "name", None) != by_name:
            continue
        return p.port, p.protocol
    return None


def _service_ports(name: str, ports) -> tuple[ServicePort, ...]:
    ns, _, short = name.rpartition("/")
    return tuple(p for p in ports if p.name == short and (not ns or p.namespace == ns))


def _pick_port(svc: tuple[ServicePort, ...], port, proto, text: str) -> ServicePort:
    chosen = [p for p in svc if port is None or str(p.port) == str(port) or p.port_name == str(port)]
    if proto and proto != "icmp":
        chosen = [p for p in chosen if p.proto == proto]
    if not chosen:
        have = ", ".join(f"{p.port_name + '=' if p.port_name else ''}{p.port}/{p.protocol}" for p in svc)
        raise ProbeError(f"Service {svc[0].namespace}/{svc[0].name} has no port "
                         f"{port if port is not None else ''}{'/' + proto.upper() if proto else ''} (ports: {have})")
    return _prefer_tcp(chosen)


def _prefer_tcp(ports: list[ServicePort]) -> ServicePort:
    return next((p for p in ports if p.protocol == "TCP"), ports[0])


def _port_number(port, text: str) -> int | None:
    if port is None:
        return None
    if isinstance(port, int) or str(port).isdigit():
        n = int(port)
        if not 1 <= n <= 65535:
            raise ProbeError(f"{text}: port must be 1–65535, got {n}")
        return n
    return None                     # a port name: matched where names exist


def _split_kind(text: str) -> tuple[str | None, str]:
    head, sep, rest = text.partition("/")
    if sep and head in KIND_PREFIXES:
        return KIND_PREFIXES[head], rest
    return None, text


def is_ip(text: str) -> bool:
    try:
        IPv4Address(text)
        return True
    except ValueError:
        return False


def _by_ip(plan: LabPlan, ip: str):
    for group, attr in ((plan.pods, "ip"), (plan.nodes, "address"), (plan.externals, "address")):
        for item in group:
            if getattr(item, attr) == ip:
                return item
    return None


def _known(plan: LabPlan, ports=()) -> str:
    names = [n.name for n in plan.nodes] + [e.name for e in plan.externals] + [p.name for p in plan.pods]
    names += sorted({p.name for p in ports})
    return ", ".join(names[:14]) + (", ..." if len(names) > 14 else "")
