"""Cluster state as kube-proxy agents receive it: one registry key per Service.

The lab's controller (``netsim up`` and ``netsim apply``) plays the API server and the
EndpointSlice controller: it resolves Services and their endpoints and writes each
Service, with its ports and endpoints, under ``/netsim/proxy/services/<ns>/<name>``. Every
node's kube-proxy agent watches that prefix, as real kube-proxy watches Services and
EndpointSlices.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict

from ..plan.state import from_data
from .model import ServicePort

PREFIX = "/netsim/proxy/services/"


def key(namespace: str, name: str) -> str:
    return f"{PREFIX}{namespace}/{name}"


def encode(ports: list[ServicePort], announce: dict[str, str] | None = None,
           written_at: float | None = None) -> str:
    """The value for one Service: its ports with endpoints, which node answers ARP for each
    LoadBalancer IP (L2 mode), and ``written_at`` so agents can measure programming latency."""
    return json.dumps({"written_at": time.time() if written_at is None else written_at,
                       "announce": dict(sorted((announce or {}).items())),
                       "ports": [asdict(p) for p in ports]}, separators=(",", ":"))


def decode(value: str) -> tuple[list[ServicePort], dict[str, str], float]:
    data = json.loads(value)
    return ([from_data(ServicePort, p) for p in data["ports"]], dict(data.get("announce", {})),
            float(data.get("written_at", 0.0)))


def group(ports) -> dict[str, list[ServicePort]]:
    """Ports by their Service's registry key."""
    out: dict[str, list[ServicePort]] = {}
    for p in ports:
        out.setdefault(key(p.namespace, p.name), []).append(p)
    return out


def publish(registry, ports, announce: dict[str, str] | None = None) -> set[str]:
    """Write every Service whose value changed and delete those that went away; returns
    the keys written or deleted. Unchanged Services are not rewritten (agents see nothing)."""
    announce = announce or {}
    wanted = group(ports)
    current = {kv.key: kv.value for kv in registry.range(PREFIX)}
    touched = set()
    for k, svc_ports in wanted.items():
        mine = {ip: node for ip, node in announce.items()
                if any(ip in p.load_balancer_ips for p in svc_ports)}
        old = current.get(k)
        if old is None or decode(old)[:2] != (svc_ports, mine):
            registry.put(k, encode(svc_ports, mine))
            touched.add(k)
    for k in set(current) - set(wanted):
        registry.delete(k)
        touched.add(k)
    return touched
