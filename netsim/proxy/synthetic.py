"""Synthetic Services for scale tests and benchmarks: N ClusterIP Services with E endpoints each.

Addresses are laid out so that nothing collides up to 60,000 Services: ClusterIPs from
172.30.0.0/16, endpoints from 10.180.0.0/14 (250 per /24). Endpoint 0 of each Service is
on ``local_node``, the others on ``node-2``, so eTP/iTP=Local have something to pick.
"""
from __future__ import annotations

from .model import Endpoint, ServicePort


def endpoint_ip(k: int) -> str:
    return f"10.{180 + k // 62500}.{k // 250 % 250}.{k % 250 + 1}"


def cluster_ip(i: int) -> str:
    return f"172.30.{i // 250}.{i % 250 + 1}"


def synthetic_ports(n: int, per: int = 2, local_node: str = "test-node", namespace: str = "ns",
                    port: int = 80, target_port: int = 80) -> list[ServicePort]:
    """``n`` Services ``ns/svc<i>:p80`` (TCP), each with ``per`` ready endpoints."""
    out = []
    for i in range(n):
        eps = sorted((Endpoint(endpoint_ip(i * per + j), target_port, local_node if j == 0 else "node-2")
                      for j in range(per)), key=lambda e: e.address)
        out.append(ServicePort(namespace, f"svc{i}", "p80", "TCP", port, cluster_ip(i), endpoints=tuple(eps)))
    return out


def endpoint(ip: str, port: int = 80, node: str | None = None, **kw) -> Endpoint:
    """One endpoint, for hand-written test and benchmark cases."""
    return Endpoint(ip, port, node, **kw)


def service_port(ns: str, name: str, cip: str, *eps: Endpoint, port_name: str = "p80", proto: str = "TCP",
                 port: int = 80, cls=ServicePort, **kw) -> ServicePort:
    """One Service port with ``eps`` sorted as the resolver sorts them (by ``IP:port``)."""
    return cls(ns, name, port_name, proto, port, cip, endpoints=tuple(sorted(eps, key=lambda e: e.address)), **kw)
