"""``netsim selftest``: check a running lab's basic paths with real traffic.

Each check runs from inside the source namespace with plain sockets and compares what
the far side reports (its name, the source address it saw) with what Kubernetes
networking promises: no NAT between pods, masquerade to the node IP towards the outside.
"""
from __future__ import annotations

from dataclasses import dataclass

from .dns.objects import is_dns_port
from .plan.state import LabPlan, PodPlan
from .probes.connect import ask, http_get, ping, udp_ask
from .runtime.podcheck import answers


@dataclass
class Check:
    name: str
    source: str
    target: str
    expect: str
    got: str = ""
    ok: bool = False


def run(plan: LabPlan, services=None) -> list[Check]:
    """Every check; ``services`` (a proxy ``Resolution``) adds the Service paths."""
    checks: list[Check] = []
    node_ns = {n.name: n.netns for n in plan.nodes}
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
    if services is not None:
        checks += service_checks(plan, services)
        checks += dns_checks(plan, services)
    for ext in plan.externals:
        for node in plan.nodes:
            checks.append(_do(Check("external→node IP", ext.name, f"{node.name} {node.address}", "echo reply"),
                              lambda e=ext, ip=node.address: ("reply", ping(e.netns, ip))))
    return checks


def service_checks(plan: LabPlan, res) -> list[Check]:
    """ClusterIP from a pod on every node; NodePort on every node and the LB IP from the
    first external host. The answer must come from one of the Service's endpoints, and
    the source it saw must be what kube-proxy promises."""
    from .proxy.endpoints import categorize
    checks: list[Check] = []
    names = {p.ip: p.key for p in plan.pods}
    for port in res.ports:
        backends = {names.get(e.ip, e.ip) for e in port.endpoints if e.ready}
        if not backends or is_dns_port(port):
            continue
        short = {b.split("/")[-1] for b in backends}
        for node in plan.nodes:
            client = next((p for p in plan.pods if p.node == node.name and p.key not in backends), None)
            if client is None:
                continue
            target = f"{port.spn} {port.cluster_ip}:{port.port}/{port.protocol}"
            checks.append(_do(Check(f"pod→ClusterIP ({port.protocol})", client.key, target,
                                    f"a backend, source {client.ip} (no NAT)"),
                              lambda c=client, p=port: _via_service(c.netns, p.cluster_ip, p.port, p.protocol,
                                                                     short, c.ip)))
        for ext in plan.externals[:1]:
            if port.node_port and port.protocol == "TCP":
                for node in plan.nodes:
                    local = bool(categorize(port, node.name).local)
                    target = f"{port.spn} {node.name} {node.address}:{port.node_port}"
                    if port.external_policy_local and not local:
                        checks.append(_do(Check("external→NodePort, eTP=Local, no local endpoint", ext.name,
                                                target, "dropped"),
                                          lambda e=ext, n=node, p=port: _refused(e.netns, n.address, p.node_port)))
                        continue
                    want = ext.address if port.external_policy_local else None
                    checks.append(_do(Check(f"external→NodePort, eTP={'Local' if want else 'Cluster'}", ext.name,
                                            target, f"a backend, source {want or 'SNATed (not the client)'}"),
                                      lambda e=ext, n=node, p=port, w=want: _via_service(
                                          e.netns, n.address, p.node_port, "TCP", short, w,
                                          not_source=None if w else e.address)))
            for lb in port.load_balancer_ips if port.protocol == "TCP" else ():
                checks.append(_do(Check("external→LoadBalancer IP", ext.name, f"{port.spn} {lb}:{port.port}",
                                        "a backend"),
                                  lambda e=ext, ip=lb, p=port: _via_service(e.netns, ip, p.port, "TCP", short, None)))
    return checks


def dns_checks(plan: LabPlan, res) -> list[Check]:
    """From a pod on every node, a short Service name through the pod's resolv.conf (search
    path, then the kube-dns ClusterIP, then a dnsmasq replica); once, a name that does not
    exist must get NXDOMAIN."""
    from .apply.dns import dns_pods, server_ip
    if not dns_pods(plan):
        return []
    dns = server_ip(plan)
    target = next((p for p in res.ports if p.endpoints and not is_dns_port(p)), None)
    short, namespace = (target.name, target.namespace) if target else ("kube-dns", "kube-system")
    want = res.cluster_ips[f"{namespace}/{short}"]
    checks = []
    for node in plan.nodes:
        client = next((p for p in plan.pods if p.node == node.name and p.namespace == namespace), None)
        name = short
        if client is None:
            client = next((p for p in plan.pods if p.node == node.name), None)
            name = f"{short}.{namespace}"
        if client is None:
            continue
        checks.append(_do(Check("pod→cluster DNS, search path", client.key, f"{name} via {dns}", want),
                          lambda c=client, n=name: _resolved(c.netns, n, want)))
    client = next((p for p in plan.pods if not p.namespace == "kube-system"), plan.pods[0])
    checks.append(_do(Check("pod→cluster DNS, unknown name", client.key, f"no-such-service.{client.namespace}"
                            f".svc.cluster.local via {dns}", "NXDOMAIN"),
                      lambda c=client: _resolved(c.netns, f"no-such-service.{c.namespace}.svc.cluster.local.", None)))
    return checks


def _resolved(ns: str, name: str, want: str | None) -> tuple[str, bool]:
    from .dns.resolver import lookup
    fqdn, answer = lookup(ns, name)
    if want is None:
        return answer.rcode, answer.rcode == "NXDOMAIN"
    got = answer.values()
    return f"{fqdn} {', '.join(got) or answer.rcode}", got == [want]


def _via_service(ns: str, ip: str, port: int, proto: str, backends: set[str], source: str | None,
                 not_source: str | None = None) -> tuple[str, bool]:
    answer = ask(ns, ip, port, proto.lower(), timeout=2.0)      # name and source from one flow
    seen = answer.seen.rsplit(":", 1)[0]
    ok = answer.hostname in backends and (source is None or seen == source) and seen != not_source
    return f"{answer.hostname}, source {seen}", ok


def _refused(ns: str, ip: str, port: int) -> tuple[str, bool]:
    try:
        http_get(ns, ip, port, "/hostname", timeout=0.5)
    except OSError as exc:
        return f"no answer ({exc.strerror or exc})", True
    return "answered", False


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
