"""netsim graph without a lab: the demo's plan drawn as text and as Graphviz (no root)."""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest

from netsim.probes import graph



def test_text_shows_every_node_pod_tunnel_and_service(demo):
    plan, res = demo
    out = graph.text(plan, res, live=False)
    for node in plan.nodes:
        assert f"node {node.name}  eth0 {node.address}" in out
        assert f"cni0 {node.gateway}/24" in out
    for pod in plan.pods:
        assert f"{pod.host_veth} ══ {pod.key} {pod.ip}" in out
    assert "flannel.1 10.244.1.0  VNI 1 UDP 8472 → node-2" in out
    lb = res.port("default", "web-lb", "http")
    assert f"NodePort {lb.node_port} eTP=Local  LB {lb.load_balancer_ips[0]}:80" in out


def test_dot_links_services_to_their_backends(demo):
    plan, res = demo
    src = graph.dot(plan, res, live=False)
    web = [p for p in plan.pods if p.labels.get("app") == "web"]
    for pod in web:
        assert f'"pod_{pod.key}" -- "svc_default/web"' in src
    assert src.count('style=dashed, color="#e08a00"') == 3          # a VXLAN tunnel per node pair


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed")
def test_svg_renders(demo):
    plan, res = demo
    svg = graph.render(graph.dot(plan, res, live=False), "svg")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    texts = "".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    assert "underlay switch br-underlay" in texts and "default/web-lb" in texts
