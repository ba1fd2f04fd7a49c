"""The cluster DNS zone, computed from the Services and pods: pure, no root.

``zone(topo, plan, res)`` gives the records the Kubernetes DNS specification asks for
(github.com/kubernetes/dns, docs/specification.md), under ``cluster.local``:

* ``<svc>.<ns>.svc.cluster.local``  A   the ClusterIP;
* headless Services (``clusterIP: None``): A records with the ready endpoints' IPs, and
  one A record per endpoint, ``<a-b-c-d>.<svc>.<ns>.svc.cluster.local`` (CoreDNS's name for
  an endpoint without a hostname);
* ExternalName Services: a CNAME to ``spec.externalName``;
* named ports: ``_<port>._<proto>.<svc>.<ns>.svc.cluster.local`` SRV, to the Service name
  and port for a ClusterIP Service, to every endpoint (its name and target port) for a
  headless one;
* every pod: ``<a-b-c-d>.<ns>.pod.cluster.local`` A (CoreDNS ``pods verified``: only
  addresses of pods that exist).

``render_hosts`` and ``render_config`` turn a zone into what dnsmasq reads: a hosts file
(A and PTR records; dnsmasq watches its ``--hostsdir`` with inotify, so these change
without a restart) and option lines (``cname=``, ``srv-host=``; dnsmasq reads those only at
start, so a change there means restarting the replicas one at a time).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan.state import LabPlan, PodPlan
from ..proxy.services import Resolution
from ..topology.model import Service, Topology
from .objects import DOMAIN

TTL = 5                          # CoreDNS's kubernetes plugin default TTL, seconds


@dataclass(frozen=True)
class Srv:
    name: str
    target: str
    port: int
    priority: int = 0
    weight: int = 100


@dataclass(frozen=True)
class Zone:
    hosts: tuple[tuple[str, str], ...] = ()        # (IP, name), in file order
    cnames: tuple[tuple[str, str], ...] = ()       # (alias, target)
    srvs: tuple[Srv, ...] = ()

    def addresses(self, name: str) -> list[str]:
        return [ip for ip, n in self.hosts if n == name]

    def names(self) -> set[str]:
        """Every name that has a record."""
        return {n for _, n in self.hosts} | {a for a, _ in self.cnames} | {s.name for s in self.srvs}


def service_name(namespace: str, name: str) -> str:
    return f"{name}.{namespace}.svc.{DOMAIN}"


def dashed(ip: str) -> str:
    return ip.replace(".", "-")


def pod_name(namespace: str, ip: str) -> str:
    return f"{dashed(ip)}.{namespace}.pod.{DOMAIN}"


def srv_name(port_name: str, protocol: str, namespace: str, service: str) -> str:
    return f"_{port_name}._{protocol.lower()}.{service_name(namespace, service)}"


def zone(topo: Topology, plan: LabPlan, res: Resolution) -> Zone:
    """The records of every Service and pod, in a stable order."""
    hosts: list[tuple[str, str]] = []
    cnames: list[tuple[str, str]] = []
    srvs: list[Srv] = []
    for svc in sorted(topo.services, key=lambda s: (s.namespace, s.name)):
        fqdn = service_name(svc.namespace, svc.name)
        if svc.type == "ExternalName":
            if svc.external_name:
                cnames.append((fqdn, svc.external_name.rstrip(".")))
            continue
        named = [p for p in svc.ports if p.name]
        if svc.cluster_ip != "None":
            ip = res.cluster_ips.get(f"{svc.namespace}/{svc.name}")
            if ip is None:
                continue
            hosts.append((ip, fqdn))
            srvs.extend(Srv(srv_name(p.name, p.protocol, svc.namespace, svc.name), fqdn, p.port) for p in named)
            continue
        endpoints = headless_endpoints(svc, topo, plan)
        ips = sorted({ip for ip, _ in endpoints.values()}, key=_ip_key)
        hosts.extend((ip, f"{dashed(ip)}.{fqdn}") for ip in ips)
        hosts.extend((ip, fqdn) for ip in ips)
        for p in named:
            targets = sorted((v for (_, pname, proto), v in endpoints.items() if (pname, proto) == (p.name, p.protocol)),
                             key=lambda t: (_ip_key(t[0]), t[1]))
            weight = 100 // len(targets) if targets else 100
            srvs.extend(Srv(srv_name(p.name, p.protocol, svc.namespace, svc.name), f"{dashed(ip)}.{fqdn}",
                            port, 0, weight) for ip, port in targets)
    for pod in sorted(plan.pods, key=lambda p: (p.namespace, _ip_key(p.ip))):
        hosts.append((pod.ip, pod_name(pod.namespace, pod.ip)))
    return Zone(tuple(hosts), tuple(cnames), tuple(srvs))


def headless_endpoints(svc: Service, topo: Topology, plan: LabPlan) -> dict[tuple[str, str, str], tuple[str, int]]:
    """(IP, port name, protocol) → (IP, target port) for the ready endpoints of a headless
    Service: the pods its selector matches, or its EndpointSlices' ready endpoints (all
    endpoints with ``publishNotReadyAddresses``). A port ``""`` stands for the address
    alone (a headless Service may have no ports)."""
    out: dict[tuple[str, str, str], tuple[str, int]] = {}
    if svc.selector:
        pods = [p for p in plan.pods if p.namespace == svc.namespace
                and all(p.labels.get(k) == v for k, v in svc.selector.items())]
        for pod in pods:
            out[(pod.ip, "", "")] = (pod.ip, 0)
            for port in svc.ports:
                number = _target_port(pod, port.target_port, port.protocol)
                if number is not None:
                    out[(pod.ip, port.name, port.protocol)] = (pod.ip, number)
        return out
    for sl in topo.endpoint_slices:
        if sl.namespace != svc.namespace or sl.service_name != svc.name:
            continue
        for e in sl.endpoints:
            if not e.addresses or not (e.ready or svc.publish_not_ready):
                continue
            ip = str(e.addresses[0])
            out[(ip, "", "")] = (ip, 0)
            for sp in sl.ports:
                out[(ip, sp.name, sp.protocol)] = (ip, sp.port)
    return out


def _target_port(pod: PodPlan, target: int | str, protocol: str) -> int | None:
    if isinstance(target, int):
        return target
    return next((p.port for p in pod.ports if p.name == target and p.protocol == protocol), None)


def _ip_key(ip: str) -> tuple[int, ...]:
    return tuple(int(x) for x in ip.split("."))


# -- what dnsmasq reads -------------------------------------------------------------

def render_hosts(z: Zone) -> str:
    """A hosts file: one ``IP name`` line per A record (dnsmasq answers PTR with the first
    name of an address: the Service's, before the pod's)."""
    lines = ["# cluster DNS A records (netsim): IP name"]
    lines += [f"{ip} {name}" for ip, name in z.hosts]
    return "\n".join(lines) + "\n"


def render_config(z: Zone) -> str:
    """dnsmasq options for the records hosts files cannot hold: CNAME and SRV."""
    lines = ["# cluster DNS CNAME and SRV records (netsim); read by dnsmasq at start"]
    lines += [f"cname={alias},{target},{TTL}" for alias, target in z.cnames]
    lines += [f"srv-host={s.name},{s.target},{s.port},{s.priority},{s.weight}" for s in z.srvs]
    return "\n".join(lines) + "\n"


def resolv_conf(namespace: str, server: str) -> str:
    """A pod's /etc/resolv.conf under dnsPolicy ClusterFirst, as the kubelet writes it."""
    return (f"search {namespace}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\n"
            f"nameserver {server}\n"
            f"options ndots:5\n")
