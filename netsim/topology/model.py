"""The validated topology: frozen dataclasses, built only by ``netsim.topology.load``.

Field names follow Kubernetes (camelCase in YAML, snake_case here). Everything in here
has passed validation, so the planner can trust it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

PROXY_MODES = ("iptables", "ipvs", "nftables")
OVERLAYS = ("vxlan", "host-gw")
REGISTRIES = ("embedded", "etcd")
IPTABLES_BACKENDS = ("nft", "legacy")
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh")  # --ipvs-scheduler


@dataclass(frozen=True)
class Cluster:
    """Cluster-wide settings (the ``cluster:`` section)."""

    pod_cidr: IPv4Network = IPv4Network("10.244.0.0/16")
    service_cidr: IPv4Network = IPv4Network("10.96.0.0/12")
    node_subnet_length: int = 24
    underlay_cidr: IPv4Network = IPv4Network("192.168.100.0/24")
    underlay_mtu: int = 1500
    proxy_mode: str = "iptables"
    overlay: str = "vxlan"
    registry: str = "embedded"
    registry_endpoint: str | None = None
    load_balancer_pool: tuple[IPv4Network, ...] = ()
    bridge: str = "cni0"
    iptables_backend: str = "nft"
    direct_routing: bool = False          # vxlan: plain routes to peers on the same L2 segment
    lease_ttl: int = 86400                # flannel subnet lease TTL (seconds)
    renew_margin: int = 3600              # renew when less than this remains
    min_sync_period: float = 1.0          # kube-proxy --min-sync-period (seconds)
    ipvs_scheduler: str = "rr"            # kube-proxy --ipvs-scheduler (proxyMode: ipvs)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    address: IPv4Address | None = None


@dataclass(frozen=True)
class ExternalSpec:
    """A client host outside the cluster, attached to the underlay."""

    name: str
    address: IPv4Address | None = None


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str = "TCP"
    name: str | None = None


@dataclass(frozen=True)
class Pod:
    """A pod to run: from a Pod manifest or expanded from a Deployment."""

    name: str
    namespace: str
    labels: dict[str, str]
    ports: tuple[ContainerPort, ...]
    node_name: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    owner: str | None = None          # "Deployment/<name>" for replicas
    source: str = ""                  # manifest path used in messages


@dataclass(frozen=True)
class Deployment:
    name: str
    namespace: str
    replicas: int
    selector: dict[str, str]
    template_labels: dict[str, str]
    ports: tuple[ContainerPort, ...]
    node_name: str | None
    node_selector: dict[str, str]
    template_hash: str
    source: str = ""


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    protocol: str = "TCP"
    name: str = ""
    node_port: int | None = None


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    type: str
    ports: tuple[ServicePort, ...]
    selector: dict[str, str] | None = None
    cluster_ip: str | None = None          # None = allocate; "None" = headless
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    session_affinity: str = "None"
    affinity_timeout: int = 10800
    load_balancer_source_ranges: tuple[IPv4Network, ...] = ()
    external_ips: tuple[IPv4Address, ...] = ()
    load_balancer_ip: IPv4Address | None = None
    external_name: str | None = None
    publish_not_ready: bool = False
    source: str = ""


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[IPv4Address, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    target_pod: str | None = None


@dataclass(frozen=True)
class SlicePort:
    port: int
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True)
class EndpointSlice:
    name: str
    namespace: str
    service_name: str
    endpoints: tuple[Endpoint, ...]
    ports: tuple[SlicePort, ...]
    source: str = ""


@dataclass(frozen=True)
class Topology:
    """A whole lab: cluster settings, machines and the Kubernetes objects to run."""

    name: str
    cluster: Cluster
    nodes: tuple[NodeSpec, ...]
    externals: tuple[ExternalSpec, ...] = ()
    pods: tuple[Pod, ...] = ()                  # standalone Pods and Deployment replicas
    deployments: tuple[Deployment, ...] = ()
    services: tuple[Service, ...] = ()
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    source: str = ""

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)
