"""Names of every kernel object netsim creates, in one place.

All names carry the lab's marker so that cleanup finds exactly what netsim made:
network namespaces are ``netsim.<lab>.<kind>.<name>`` (dots cannot appear in the
DNS-1123 labels used for lab, node and pod names, so the parts never run together).
Interface names must fit IFNAMSIZ (15 bytes).
"""
from __future__ import annotations

import hashlib

IFNAMSIZ = 15
NETNS_PREFIX = "netsim."
UNDERLAY_BRIDGE = "br-underlay"
UPLINK = "eth0"                         # a node's or external's underlay interface
POD_IFACE = "eth0"
VXLAN_DEVICE = "flannel.1"
UNDERLAY_PORT_SUFFIX = "-eth0"          # switch-side port, Mininet style: "<node>-eth0"
HOST_NAME_MAX = IFNAMSIZ - len(UNDERLAY_PORT_SUFFIX)   # 10 bytes for node/external names


def lab_prefix(lab: str) -> str:
    return f"{NETNS_PREFIX}{lab}."


def underlay_netns(lab: str) -> str:
    return f"{lab_prefix(lab)}underlay"


def node_netns(lab: str, node: str) -> str:
    return f"{lab_prefix(lab)}node.{node}"


def external_netns(lab: str, name: str) -> str:
    return f"{lab_prefix(lab)}ext.{name}"


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    return f"{lab_prefix(lab)}pod.{namespace}.{pod}"


def underlay_port(host: str) -> str:
    return f"{host}{UNDERLAY_PORT_SUFFIX}"


def pod_host_veth(lab: str, namespace: str, pod: str) -> str:
    """Host-side veth of a pod: ``veth`` + 8 hex digits, as the CNI bridge plugin names it
    (derived from the pod's identity instead of random, so plans are reproducible)."""
    digest = hashlib.sha256(f"{lab}/{namespace}/{pod}".encode()).hexdigest()
    return f"veth{digest[:8]}"
