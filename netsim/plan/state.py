"""Desired kernel state, as plain frozen data. The planner builds it; the applier programs it.

A lab is a list of network namespaces. Each declares its links, addresses, routes,
sysctls and iptables-restore text. A veth is declared once, in the namespace of its
near end, with the namespace its peer end is moved into.
"""
from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from .overlay import PeerPlan, VxlanDevice


@dataclass(frozen=True)
class Link:
    name: str
    kind: str                          # bridge | veth
    mtu: int
    master: str | None = None          # bridge to enslave to
    hairpin: bool = False              # bridge port hairpin mode (pods reaching themselves)
    peer: str | None = None            # veth: the other end's name ...
    peer_netns: str | None = None      # ... and the namespace it lives in
    peer_mtu: int | None = None


@dataclass(frozen=True)
class Address:
    dev: str
    cidr: str                          # "10.244.1.1/24"


@dataclass(frozen=True)
class Route:
    dst: str                           # "default" or a CIDR
    dev: str
    via: str | None = None
    onlink: bool = False


@dataclass(frozen=True)
class Namespace:
    name: str                          # netns name under /run/netns
    role: str                          # underlay | node | external | pod
    owner: str                         # the machine or pod it belongs to
    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    sysctls: tuple[tuple[str, str], ...] = ()
    iptables: str = ""                 # iptables-restore --noflush input


@dataclass(frozen=True)
class PortPlan:
    port: int
    protocol: str
    name: str | None


@dataclass(frozen=True)
class NodePlan:
    name: str
    netns: str
    address: str                       # underlay IP
    subnet: str                        # pod subnet, flannel lease
    gateway: str                       # cni0 address (first IP of the subnet)
    mtu: int                           # pod and bridge MTU
    labels: dict[str, str] = field(default_factory=dict)
    vtep_mac: str = ""                 # flannel.1's MAC (vxlan), published in the lease


@dataclass(frozen=True)
class PodPlan:
    name: str
    namespace: str
    node: str
    netns: str
    ip: str
    host_veth: str
    labels: dict[str, str]
    ports: tuple[PortPlan, ...]
    owner: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ExternalPlan:
    name: str
    netns: str
    address: str
    ports: tuple[PortPlan, ...] = ()   # the built-in server runs here too, for return checks


@dataclass(frozen=True)
class NodeOverlay:
    """What the node's flannel agent will program, given the planned leases."""

    node: str
    subnet_env: str
    iptables: str                      # FLANNEL-POSTRTG / FLANNEL-FWD (iptables-restore)
    device: VxlanDevice | None
    peers: tuple[PeerPlan, ...]


@dataclass(frozen=True)
class LabPlan:
    lab: str
    pod_cidr: str
    service_cidr: str
    underlay_cidr: str
    overlay: str
    proxy_mode: str
    iptables_backend: str
    underlay_netns: str
    nodes: tuple[NodePlan, ...]
    externals: tuple[ExternalPlan, ...]
    pods: tuple[PodPlan, ...]
    namespaces: tuple[Namespace, ...]  # build order: underlay, nodes, externals, node bridges, pods
    registry: str = "embedded"
    network_config: str = ""           # flannel's /coreos.com/network/config JSON
    lease_ttl: int = 86400
    renew_margin: int = 3600
    underlay_mtu: int = 1500
    direct_routing: bool = False
    bridge: str = "cni0"
    overlay_state: tuple[NodeOverlay, ...] = ()
    registry_endpoint: str = ""        # a user's etcd, used instead of starting one
    min_sync_period: float = 1.0       # kube-proxy agents' --min-sync-period
    ipvs_scheduler: str = "rr"         # kube-proxy --ipvs-scheduler (proxyMode: ipvs)

    def to_dict(self) -> dict:
        return asdict(self)

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    def find(self, name: str):
        """A node, external or pod by name (``pod`` or ``namespace/pod``); None if unknown."""
        for group in (self.nodes, self.externals):
            for item in group:
                if item.name == name:
                    return item
        for pod in self.pods:
            if name in (pod.name, pod.key):
                return pod
        return None

    @staticmethod
    def from_dict(data: dict) -> "LabPlan":
        return from_data(LabPlan, data)


def from_data(cls, data):
    """Rebuild a (nested) frozen dataclass from ``asdict`` output, guided by its type hints."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _value(hints[f.name], data[f.name])
    return cls(**kwargs)


def _value(hint, value):
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value) if len(inner) == 1 else value
    if origin is tuple:
        item = args[0]
        return tuple(_value(item, v) for v in value)
    if is_dataclass(hint):
        return from_data(hint, value)
    return value
