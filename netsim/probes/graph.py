"""``netsim graph``: the running topology as a picture (Graphviz) or as text.

Drawn from the lab's plan and Service resolution: the underlay switch, each node with
its uplink, bridge, VXLAN device and pods, the overlay tunnels between nodes, external
hosts, and every Service with its access paths (ClusterIP, NodePort, LB IP) and the
pods behind it. A namespace that is gone is drawn red.
"""
from __future__ import annotations

import shutil
import subprocess

from .. import naming
from ..apply import netns
from ..errors import NetsimError
from ..plan.state import LabPlan

SERVICE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _id(*parts: str) -> str:
    return _q("_".join(parts))


def dot(plan: LabPlan, res, live: bool = True) -> str:
    """The Graphviz source."""
    alive = (lambda ns: netns.exists(ns)) if live else (lambda ns: True)
    out = ["graph netsim {",
           '  graph [rankdir=TB, fontname="DejaVu Sans", fontsize=11, nodesep=0.25, ranksep=0.55, newrank=true,'
           f' label={_q(f"lab {plan.lab}: overlay {plan.overlay}, kube-proxy {plan.proxy_mode}")}, labelloc=t];',
           '  node [fontname="DejaVu Sans", fontsize=10, shape=box, style="rounded,filled", fillcolor=white];',
           '  edge [fontname="DejaVu Sans", fontsize=9];',
           f'  {_id("underlay")} [label={_q(f"underlay switch {naming.UNDERLAY_BRIDGE}" + chr(10) + plan.underlay_cidr)}, '
           f'shape=box, fillcolor="#e8e8e8", width=6];']
    for ext in plan.externals:
        colour = "#fff3d6" if alive(ext.netns) else "#ffb0b0"
        out.append(f'  {_id("ext", ext.name)} [label={_q(f"external {ext.name}" + chr(10) + ext.address)}, fillcolor="{colour}"];')
        out.append(f'  {_id("underlay")} -- {_id("ext", ext.name)} [label={_q(naming.underlay_port(ext.name))}];')
    for node in plan.nodes:
        colour = "#eef5ff" if alive(node.netns) else "#ffb0b0"
        out.append(f'  subgraph {_q("cluster_" + node.name)} {{')
        out.append(f'    label={_q(f"node {node.name}  {node.address}  pods {node.subnet}")}; style="rounded,filled"; fillcolor="{colour}";')
        out.append(f'    {_id(node.name, "eth0")} [label={_q(f"eth0 {node.address}")}, fillcolor="#dddddd"];')
        if plan.overlay == "vxlan":
            vtep = node.subnet.split("/")[0]
            out.append(f'    {_id(node.name, "vxlan")} [label={_q(f"{naming.VXLAN_DEVICE} {vtep}" + chr(10) + "VNI 1, UDP 8472")}, fillcolor="#fde9c9"];')
        out.append(f'    {_id(node.name, "bridge")} [label={_q(f"{plan.bridge} {node.gateway}")}, fillcolor="#d9f2d9"];')
        for pod in (p for p in plan.pods if p.node == node.name):
            ports = ",".join(f"{p.port}/{p.protocol}" for p in pod.ports) or "no ports"
            fill = "white" if alive(pod.netns) else "#ffb0b0"
            out.append(f'    {_id("pod", pod.key)} [label={_q(f"{pod.name}" + chr(10) + f"{pod.ip}  {ports}")}, fillcolor="{fill}"];')
            out.append(f'    {_id(node.name, "bridge")} -- {_id("pod", pod.key)} [label={_q(pod.host_veth)}, fontsize=8];')
        if plan.overlay == "vxlan":
            out.append(f'    {_id(node.name, "eth0")} -- {_id(node.name, "vxlan")} [style=dotted];')
            out.append(f'    {_id(node.name, "vxlan")} -- {_id(node.name, "bridge")} [style=dotted, label="routed"];')
        else:
            out.append(f'    {_id(node.name, "eth0")} -- {_id(node.name, "bridge")} [style=dotted, label="routed"];')
        out.append("  }")
        out.append(f'  {_id("underlay")} -- {_id(node.name, "eth0")} [label={_q(naming.underlay_port(node.name))}];')
    if plan.overlay == "vxlan":
        for i, a in enumerate(plan.nodes):
            for b in plan.nodes[i + 1:]:
                out.append(f'  {_id(a.name, "vxlan")} -- {_id(b.name, "vxlan")} [style=dashed, color="#e08a00", '
                           f'constraint=false, label="VXLAN"];')
    if res is not None:
        services: dict[str, list] = {}
        for sp in res.ports:
            services.setdefault(f"{sp.namespace}/{sp.name}", []).append(sp)
        out.append('  subgraph cluster_services { label="Services (kube-proxy)"; style="rounded,dashed";')
        for i, (key, ports) in enumerate(services.items()):
            colour = SERVICE_COLOURS[i % len(SERVICE_COLOURS)]
            lines = [key]
            for sp in ports:
                lines.append(f"ClusterIP {sp.cluster_ip}:{sp.port}/{sp.protocol}")
                if sp.node_port:
                    lines.append(f"NodePort :{sp.node_port}" + (" (eTP=Local)" if sp.external_policy_local else ""))
                for lb in sp.load_balancer_ips:
                    lines.append(f"LB {lb}:{sp.port}")
            if not any(sp.endpoints for sp in ports):
                lines.append("no endpoints: REJECT")
            out.append(f'    {_id("svc", key)} [label={_q(chr(10).join(dict.fromkeys(lines)))}, shape=note, '
                       f'color="{colour}", fontcolor="{colour}"];')
        out.append("  }")
        keys = {p.ip: p.key for p in plan.pods}
        for i, (key, ports) in enumerate(services.items()):
            colour = SERVICE_COLOURS[i % len(SERVICE_COLOURS)]
            for ip in dict.fromkeys(e.ip for sp in ports for e in sp.endpoints if e.ready):
                if ip in keys:
                    out.append(f'  {_id("pod", keys[ip])} -- {_id("svc", key)} [color="{colour}", penwidth=1.2];')
    out.append("}")
    return "\n".join(out) + "\n"


def render(source: str, fmt: str) -> bytes:
    """SVG or PNG from Graphviz ``dot`` (Debian's graphviz package)."""
    if shutil.which("dot") is None:
        raise NetsimError("graphviz's 'dot' is not installed (apt-get install graphviz, or run scripts/bootstrap.sh); "
                          "'-o text' and '-o dot' work without it")
    done = subprocess.run(["dot", f"-T{fmt}"], input=source.encode(), capture_output=True)
    if done.returncode != 0:
        raise NetsimError(f"dot failed: {done.stderr.decode(errors='replace').strip()[:200]}")
    return done.stdout


def text(plan: LabPlan, res, live: bool = True) -> str:
    """The same picture as an indented tree."""
    alive = (lambda ns: netns.exists(ns)) if live else (lambda ns: True)
    gone = lambda ns: "" if alive(ns) else "  [namespace gone]"
    out = [f"lab {plan.lab}: overlay {plan.overlay}, kube-proxy {plan.proxy_mode}",
           f"underlay switch {naming.UNDERLAY_BRIDGE} {plan.underlay_cidr}"]
    machines = list(plan.nodes) + list(plan.externals)
    for i, m in enumerate(machines):
        last = i == len(machines) - 1
        branch, pad = ("└─ ", "   ") if last else ("├─ ", "│  ")
        if hasattr(m, "subnet"):
            out.append(f"{branch}node {m.name}  eth0 {m.address}  (port {naming.underlay_port(m.name)}){gone(m.netns)}")
            if plan.overlay == "vxlan":
                peers = ", ".join(f"{p.name} {p.address}" for p in plan.nodes if p is not m)
                out.append(f"{pad}├─ {naming.VXLAN_DEVICE} {m.subnet.split('/')[0]}  VNI 1 UDP 8472 → {peers or 'no peers'}")
            pods = [p for p in plan.pods if p.node == m.name]
            out.append(f"{pad}└─ {plan.bridge} {m.gateway}/{m.subnet.split('/')[1]}")
            for j, pod in enumerate(pods):
                b = "└─ " if j == len(pods) - 1 else "├─ "
                ports = ",".join(f"{p.port}/{p.protocol}" for p in pod.ports) or "-"
                out.append(f"{pad}   {b}{pod.host_veth} ══ {pod.key} {pod.ip}  {ports}{gone(pod.netns)}")
        else:
            out.append(f"{branch}external {m.name}  eth0 {m.address}  (port {naming.underlay_port(m.name)}){gone(m.netns)}")
    if res is not None and res.ports:
        out += ["", "Services"]
        names = {p.ip: p.key.split("/")[-1] for p in plan.pods}
        for sp in res.ports:
            paths = [f"ClusterIP {sp.cluster_ip}:{sp.port}/{sp.protocol}"]
            if sp.node_port:
                paths.append(f"NodePort {sp.node_port}" + (" eTP=Local" if sp.external_policy_local else ""))
            paths += [f"LB {ip}:{sp.port}" for ip in sp.load_balancer_ips]
            backends = ", ".join(f"{names.get(e.ip, e.ip)}:{e.port}" for e in sp.endpoints if e.ready) or "none (REJECT)"
            out.append(f"  {sp.spn}  {'  '.join(paths)}")
            out.append(f"      → {backends}")
    return "\n".join(out)
