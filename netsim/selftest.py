"""``netsim selftest``: check a running lab's basic paths with real traffic.

Each check runs from inside the source namespace with plain sockets and compares what
the far side reports (its name, the source address it saw) with what Kubernetes
networking promises: no NAT between pods, masquerade to the node IP towards the outside.
"""
from __future__ import annotations

from dataclasses import dataclass

from .plan.state import LabPlan, PodPlan
from .runtime.podcheck import answers, http_get, ping, udp_ask


@dataclass
class Check:
    name: str
    source: str
    target: str
    expect: str
    got: str = ""
    ok: bool = False


def run(plan: LabPlan) -> list[Check]:
    checks: list[Check] = []
    node_ns = {n.name: n.netns for n in plan.nodes}
    node_ip = {n.name: n.address for n in plan.nodes}
    for pod in plan.pods:
        checks.append(_do(Check("pod answers its node", pod.node, pod.key, "its own name"),
                          lambda pod=pod: ("answered", answers(pod, node_ns[pod.node], timeout=1.0))))
    for node in plan.nodes:
        here = [p for p in plan.pods if p.node == node.name]
        tcp = [p for p in here if _port(p, "TCP")]
        udp = [p for p in here if _port(p, "UDP")]
        for client in here[:1]:
            for server in [p for p in here if p is not client][:1]:
                checks.append(_do(Check("same-node pod→pod ICMP", client.key, server.ip, "echo reply"),
                                  lambda c=client, s=server: ("reply", ping(c.netns, s.ip))))
            for server in [p for p in tcp if p is not client][:1]:
                checks.append(_clientip("same-node pod→pod TCP, no NAT", client, server, "TCP", client.ip))
            for server in [p for p in udp if p is not client][:1]:
                checks.append(_clientip("same-node pod→pod UDP, no NAT", client, server, "UDP", client.ip))
        for ext in plan.externals[:1]:
            for client in here[:1]:
                checks.append(_do(Check("pod→external, masqueraded", client.key, f"{ext.name}:8080",
                                        f"source {node.address} (node IP)"),
                                  lambda c=client, e=ext, want=node.address: _seen(
                                      http_get(c.netns, e.address, 8080, "/clientip"), want)))
    # Across nodes (the overlay): one client per node to a server on each other node.
    for node in plan.nodes:
        clients = [p for p in plan.pods if p.node == node.name][:1]
        for client in clients:
            for other in plan.nodes:
                if other is node:
                    continue
                there = [p for p in plan.pods if p.node == other.name]
                for server in there[:1]:
                    checks.append(_do(Check(f"cross-node pod→pod ICMP ({plan.overlay})", client.key, f"{server.ip} on {other.name}",
                                            "echo reply"), lambda c=client, s=server: ("reply", ping(c.netns, s.ip))))
                for server in [p for p in there if _port(p, "TCP")][:1]:
                    checks.append(_clientip(f"cross-node pod→pod TCP, no NAT ({plan.overlay})", client, server, "TCP", client.ip))
                for server in [p for p in there if _port(p, "UDP")][:1]:
                    checks.append(_clientip(f"cross-node pod→pod UDP, no NAT ({plan.overlay})", client, server, "UDP", client.ip))
    for ext in plan.externals:
        for node in plan.nodes:
            checks.append(_do(Check("external→node IP", ext.name, f"{node.name} {node.address}", "echo reply"),
                              lambda e=ext, ip=node.address: ("reply", ping(e.netns, ip))))
    return checks


def _port(pod: PodPlan, proto: str):
    return next((p.port for p in pod.ports if p.protocol == proto), None)


def _clientip(name: str, client: PodPlan, server: PodPlan, proto: str, want: str) -> Check:
    port = _port(server, proto)
    check = Check(name, client.key, f"{server.key}:{port}/{proto}", f"source {want}")
    if proto == "TCP":
        return _do(check, lambda: _seen(http_get(client.netns, server.ip, port, "/clientip"), want))
    return _do(check, lambda: _seen(udp_ask(client.netns, server.ip, port, b"clientip"), want))


def _seen(reply: str, want: str) -> tuple[str, bool]:
    ip = reply.rsplit(":", 1)[0]
    return f"source {ip}", ip == want


def _do(check: Check, probe) -> Check:
    try:
        check.got, check.ok = probe()
    except OSError as exc:
        check.got, check.ok = f"error: {exc.strerror or exc}", False
    return check
