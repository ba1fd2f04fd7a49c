"""What kube-proxy knows about the cluster, as frozen data shared by every proxy mode.

``ServicePort`` is one port of one Service with everything kube-proxy reads from the
Service (and its LoadBalancer status); ``Endpoint`` is one address of its EndpointSlices.
Both are built by ``netsim.proxy.services`` from a topology and a lab plan; the
renderers (``iptables``, and later ``ipvs`` and ``nftables``) turn them into rules for
one node, described by ``NodeContext``.
"""
from __future__ import annotations

from dataclasses import dataclass

MASQ_MARK = 0x4000            # 1 << masqueradeBit (14), kube-proxy's default


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    node: str | None = None          # nodeName: decides "local"
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    pod: str | None = None           # "namespace/name" of the backing pod, if any

    @property
    def address(self) -> str:
        """``IP:port``, the string endpoints are sorted and hashed by."""
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    name: str
    port_name: str                   # "" when the Service port has no name
    protocol: str                    # "TCP" | "UDP"
    port: int
    cluster_ip: str                  # allocated; headless/ExternalName services are not ServicePorts
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()          # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_policy_local: bool = False              # externalTrafficPolicy: Local
    internal_policy_local: bool = False              # internalTrafficPolicy: Local
    affinity_timeout: int | None = None              # ClientIP affinity timeout; None = no affinity
    endpoints: tuple[Endpoint, ...] = ()             # sorted by "IP:port"

    @property
    def spn(self) -> str:
        """The service-port name kube-proxy hashes and prints: ``ns/name:port`` or ``ns/name``."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port_name}" if self.port_name else base

    @property
    def proto(self) -> str:
        return self.protocol.lower()

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)


@dataclass(frozen=True)
class NodeContext:
    """The node a ruleset is rendered for."""

    name: str
    node_ips: tuple[str, ...]
    pod_cidr: str                    # the local-traffic detector (ClusterCIDR mode)
    random_fully: bool = True        # iptables >= 1.6.2
    localhost_nodeports: bool = True
    service_cidrs: tuple[str, ...] = ()   # nftables mode drops traffic to unallocated ClusterIPs
    ipvs_scheduler: str = "rr"       # IPVS mode: --ipvs-scheduler
    ipvs_strict_arp: bool = True     # IPVS mode: --ipvs-strict-arp (needed beside an L2 announcer)
