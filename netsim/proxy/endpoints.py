"""Which endpoints of a Service port one node uses: kube-proxy's ``CategorizeEndpoints``
(``pkg/proxy/topology.go``) without topology hints, and the health-check count. Pure.

* **Cluster endpoints** (when the Service uses them): every *ready* endpoint; if none is
  ready anywhere, the endpoints that are *serving and terminating* (KEP-1669).
* **Local endpoints** (when the Service uses them): the ready endpoints on this node; if
  none, the serving-and-terminating ones on this node.
* The Service uses cluster endpoints unless ``internalTrafficPolicy: Local`` (an
  externally reachable Service always does: eTP=Cluster traffic, and the pod/host
  short-circuits of eTP=Local, need them); it uses local endpoints with iTP=Local, or
  with eTP=Local when it is externally reachable.
* ``all_endpoints`` is kube-proxy's ``hasAnyEndpoints``: some endpoint *anywhere* is
  usable (ready, or serving and terminating). False means "REJECT", while True with
  nothing usable on this node means "DROP".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .model import Endpoint, ServicePort


@dataclass(frozen=True)
class Categorized:
    cluster: tuple[Endpoint, ...] = ()      # empty when the Service does not use them
    local: tuple[Endpoint, ...] = ()        # empty when the Service does not use them
    all_endpoints: bool = False             # hasAnyEndpoints: usable somewhere in the cluster
    uses_cluster: bool = True
    uses_local: bool = False

    @property
    def reachable(self) -> tuple[Endpoint, ...]:
        """``allReachableEndpoints``: cluster ∪ local, sorted by ``IP:port``."""
        merged = {e.address: e for e in self.cluster}
        merged.update({e.address: e for e in self.local})
        return tuple(sorted(merged.values(), key=lambda e: e.address))


def uses_cluster_endpoints(port: ServicePort) -> bool:
    return not port.internal_policy_local or port.externally_accessible


def uses_local_endpoints(port: ServicePort) -> bool:
    return port.internal_policy_local or (port.external_policy_local and port.externally_accessible)


def _usable_fallback(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def categorize(port: ServicePort, node: str) -> Categorized:
    """The endpoints of ``port`` that ``node``'s kube-proxy programs, by traffic policy."""
    eps = port.endpoints
    use_cluster, use_local = uses_cluster_endpoints(port), uses_local_endpoints(port)
    is_local = (lambda ep: bool(node) and ep.node == node)
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    any_usable = False
    if use_cluster:
        cluster = tuple(ep for ep in eps if ep.ready) or tuple(ep for ep in eps if _usable_fallback(ep))
        any_usable = bool(cluster)
    if use_local:
        any_usable = any_usable or any(ep.ready or _usable_fallback(ep) for ep in eps)
        local = (tuple(ep for ep in eps if is_local(ep) and ep.ready)
                 or tuple(ep for ep in eps if is_local(ep) and _usable_fallback(ep)))
    return Categorized(cluster, local, any_usable, use_cluster, use_local)


def health_check_local_count(ports: ServicePort | Iterable[ServicePort], node: str) -> int:
    """What the health-check node port reports as ``localEndpoints``: the ready,
    non-terminating endpoints on ``node``, so a node whose pods terminate is drained.

    Pass one port, or every port of a Service as kube-proxy does (``LocalReadyEndpoints``
    counts per Service, by distinct IP: a pod behind ports 80 and 443 is one endpoint)."""
    if isinstance(ports, ServicePort):
        ports = (ports,)
    return len({ep.ip for port in ports for ep in port.endpoints
                if node and ep.node == node and ep.ready and not ep.terminating})
