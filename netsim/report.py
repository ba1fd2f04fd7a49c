"""Human-readable tables and JSON for ``up`` and ``status``."""
from __future__ import annotations

import json

from .apply import labstate, netns
from .apply.lab import process_running
from .apply.labstate import LabState
from .plan.state import LabPlan


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header] + rows)


def ports_text(ports) -> str:
    return ",".join(f"{p.port}/{p.protocol}" + (f"({p.name})" if p.name else "") for p in ports) or "-"


def flannel_status(lab: str, node: str) -> dict:
    try:
        return json.loads((labstate.lab_dir(lab) / "flannel" / node / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def status_dict(plan: LabPlan, st: LabState | None) -> dict:
    procs = st.processes if st else []
    def alive(ns: str, role: str = "podserver") -> bool:
        rec = next((p for p in reversed(procs) if p.netns == ns and p.role == role), None)
        return bool(rec and process_running(rec))
    return {
        "lab": plan.lab, "status": st.status if st else "planned",
        "podCIDR": plan.pod_cidr, "serviceCIDR": plan.service_cidr,
        "underlayCIDR": plan.underlay_cidr, "overlay": plan.overlay, "proxyMode": plan.proxy_mode,
        "nodes": [{"name": n.name, "address": n.address, "podSubnet": n.subnet, "bridge": n.gateway,
                   "mtu": n.mtu, "netns": n.netns, "present": netns.exists(n.netns),
                   "podServer": alive(n.netns), "labels": n.labels,
                   "flannel": {"alive": alive(n.netns, "flannel"), "vtepMAC": n.vtep_mac,
                               "lease": flannel_status(plan.lab, n.name).get("subnet"),
                               "peers": sorted(flannel_status(plan.lab, n.name).get("peers", {}))}}
                  for n in plan.nodes],
        "externals": [{"name": e.name, "address": e.address, "netns": e.netns,
                       "present": netns.exists(e.netns)} for e in plan.externals],
        "clusterDNS": _cluster_dns(plan, alive),
        "pods": [{"name": p.name, "namespace": p.namespace, "node": p.node, "ip": p.ip,
                  "hostVeth": p.host_veth, "netns": p.netns, "present": netns.exists(p.netns),
                  "ports": [{"port": x.port, "protocol": x.protocol, "name": x.name} for x in p.ports]}
                 for p in plan.pods],
    }


def _cluster_dns(plan: LabPlan, alive) -> dict | None:
    """The kube-dns Service and its dnsmasq replicas, if the lab runs the cluster DNS."""
    from .apply.dns import dns_pods, server_ip
    pods = dns_pods(plan)
    if not pods:
        return None
    return {"service": "kube-system/kube-dns", "ip": server_ip(plan),
            "replicas": [{"pod": p.key, "node": p.node, "ip": p.ip, "dnsmasq": alive(p.netns, "dnsmasq")}
                         for p in pods]}


def _dns_line(dns: dict) -> str:
    up = sum(r["dnsmasq"] for r in dns["replicas"])
    where = ", ".join(r["ip"] + " on " + r["node"] + ("" if r["dnsmasq"] else " DOWN") for r in dns["replicas"])
    return f"cluster DNS {dns['ip']} ({dns['service']}): {up}/{len(dns['replicas'])} dnsmasq replicas up ({where})"


def _state(n: dict) -> str:
    if not n["present"]:
        return "missing"
    return "ok" if n["podServer"] else "no pod server"


def status_text(plan: LabPlan, st: LabState | None) -> str:
    d = status_dict(plan, st)
    lines = [f"lab {plan.lab}: {d['status']} — {len(plan.nodes)} nodes, {len(plan.externals)} externals, "
             f"{len(plan.pods)} pods (podCIDR {plan.pod_cidr}, overlay {plan.overlay}, proxy {plan.proxy_mode})", ""]
    lines.append(table([[n["name"], n["address"], n["podSubnet"], f"cni0 {n['bridge']}", str(n["mtu"]),
                         str(sum(1 for p in plan.pods if p.node == n["name"])),
                         f"{'up' if n['flannel']['alive'] else 'DOWN'}, {len(n['flannel']['peers'])} peers",
                         _state(n)]
                        for n in d["nodes"]],
                       ["NODE", "ADDRESS", "POD SUBNET", "BRIDGE", "MTU", "PODS", "FLANNEL", "STATE"]))
    if plan.externals:
        lines += ["", table([[e["name"], e["address"], "ok" if e["present"] else "missing"] for e in d["externals"]],
                            ["EXTERNAL", "ADDRESS", "STATE"])]
    if d["clusterDNS"]:
        lines += ["", _dns_line(d["clusterDNS"])]
    if plan.pods:
        lines += ["", table([[p.key, p.node, p.ip, ports_text(p.ports), p.host_veth] for p in plan.pods],
                            ["POD", "NODE", "IP", "PORTS", "HOST VETH"])]
    return "\n".join(lines)


def as_json(data) -> str:
    return json.dumps(data, indent=2)
