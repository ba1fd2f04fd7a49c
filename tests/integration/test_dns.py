"""Kernel tests for the cluster DNS: dnsmasq replicas behind the kube-dns Service, asked
from pods on every node through their resolv.conf (``netsim exec`` is ``ip netns exec``,
which bind-mounts /etc/netns/<pod netns>/resolv.conf), then the connection through
kube-proxy's rules."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from labs import netsim, running_lab

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: bind9-dnsutils)")]

TOPOLOGY = """
name: {lab}
cluster: {{minSyncPeriod: 0.1}}
nodes: [n1, n2, n3]
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web}}
    spec:
      replicas: 3
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec: {{containers: [{{name: web, ports: [{{name: http, containerPort: 8080}}]}}]}}
  - {{apiVersion: v1, kind: Pod, metadata: {{name: c1}}, spec: {{nodeName: n1, containers: [{{name: c}}]}}}}
  - {{apiVersion: v1, kind: Pod, metadata: {{name: c2}}, spec: {{nodeName: n2, containers: [{{name: c}}]}}}}
  - {{apiVersion: v1, kind: Pod, metadata: {{name: c3}}, spec: {{nodeName: n3, containers: [{{name: c}}]}}}}
  - {{apiVersion: v1, kind: Pod, metadata: {{name: other, namespace: shop}}, spec: {{nodeName: n2, containers: [{{name: c}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: web}},
     spec: {{selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: http}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: web-hl}},
     spec: {{clusterIP: None, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: http}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: ext}},
     spec: {{type: ExternalName, externalName: www.example.com}}}}
"""
CLIENTS = ("c1", "c2", "c3")          # one client pod per node


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    name = f"dn-dns{os.getpid() % 10000}"
    topo = tmp_path_factory.mktemp("dns") / "dns.yaml"
    topo.write_text(TOPOLOGY.format(lab=name))
    with running_lab(topo, name) as lab:
        yield lab
    assert not [d for d in os.listdir("/etc/netns") if d.startswith(f"netsim.{name}.")] \
        if os.path.isdir("/etc/netns") else True


def run(lab: str, target: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return netsim("exec", "--lab", lab, target, "--", *cmd, check=check)


def dig(lab: str, pod: str, *args: str) -> tuple[str, list[str]]:
    """(status, answer values) of a dig from inside ``pod`` through its resolv.conf."""
    out = run(lab, pod, "dig", "+tries=2", "+time=2", "+noall", "+comments", "+answer", *args, check=False).stdout
    status = next((l.split("status: ")[1].split(",")[0] for l in out.splitlines() if "status: " in l), "no reply")
    values = [l.split()[-1] if "SRV" not in l.split()[3:4] else " ".join(l.split()[4:])
              for l in out.splitlines() if l and not l.startswith(";")]
    return status, values


def web_pods(lab: str) -> dict[str, str]:
    plan = json.loads(Path(f"/run/netsim/{lab}/plan.json").read_text())
    return {p["name"]: p["ip"] for p in plan["pods"] if p["labels"].get("app") == "web"}


def cluster_ip(lab: str, key: str) -> str:
    return json.loads(Path(f"/run/netsim/{lab}/services.json").read_text())["cluster_ips"][key]


def test_every_pod_points_at_the_cluster_dns(lab):
    for pod in CLIENTS:
        conf = run(lab, pod, "cat", "/etc/resolv.conf").stdout
        assert "nameserver 10.96.0.10" in conf
        assert "search default.svc.cluster.local svc.cluster.local cluster.local" in conf
        assert "options ndots:5" in conf
    assert "search shop.svc.cluster.local svc.cluster.local cluster.local" in run(lab, "other", "cat", "/etc/resolv.conf").stdout


def test_status_shows_the_dns_replicas(lab):
    data = json.loads(netsim("status", lab, "-o", "json").stdout)["clusterDNS"]
    assert data["ip"] == "10.96.0.10" and len(data["replicas"]) == 2
    assert all(r["dnsmasq"] for r in data["replicas"])
    assert "cluster DNS 10.96.0.10 (kube-system/kube-dns): 2/2 dnsmasq replicas up" in netsim("status", lab).stdout


def test_name_to_cluster_ip_to_backend_from_every_node(lab):
    backends = set(web_pods(lab))
    ip = cluster_ip(lab, "default/web")
    for pod in CLIENTS:
        assert dig(lab, pod, "web.default.svc.cluster.local") == ("NOERROR", [ip])
        for url in ("web.default.svc.cluster.local/hostname", "web/hostname"):        # FQDN, then the search path
            got = run(lab, pod, "curl", "-s", "--max-time", "3", url, check=False).stdout
            assert got in backends, (pod, url, got)
    # Another namespace needs the namespace in the name; the short name is not there.
    assert run(lab, "other", "curl", "-s", "--max-time", "3", "web.default/hostname").stdout in backends
    assert dig(lab, "other", "+search", "web")[0] == "NXDOMAIN"


def test_queries_cross_the_kube_dns_service_unnated(lab):
    """The query reaches a dnsmasq replica from the client pod's own address (DNAT only)."""
    run(lab, "c3", "dig", "+short", "c3-was-here.default.svc.cluster.local")
    logs = "".join(p.read_text() for p in Path(f"/run/netsim/{lab}/logs").glob("dnsmasq-*.log"))
    plan = json.loads(Path(f"/run/netsim/{lab}/plan.json").read_text())
    c3 = next(p["ip"] for p in plan["pods"] if p["name"] == "c3")
    assert f"query[A] c3-was-here.default.svc.cluster.local from {c3}" in logs


def test_headless_name_returns_the_pod_ips(lab):
    ips = sorted(web_pods(lab).values())
    for pod in CLIENTS:
        status, got = dig(lab, pod, "web-hl.default.svc.cluster.local")
        assert status == "NOERROR" and sorted(got) == ips
    status, srv = dig(lab, "c1", "SRV", "_http._tcp.web-hl.default.svc.cluster.local")
    assert status == "NOERROR"
    assert sorted(s.split()[-1] for s in srv) == sorted(f"{ip.replace('.', '-')}.web-hl.default.svc.cluster.local."
                                                       for ip in ips)
    assert {s.split()[2] for s in srv} == {"8080"}


def test_external_name_is_a_cname(lab):
    for pod in CLIENTS:
        status, got = dig(lab, pod, "ext.default.svc.cluster.local")
        assert got[:1] == ["www.example.com."], (pod, status, got)


def test_srv_and_pod_records(lab):
    status, srv = dig(lab, "c2", "SRV", "_http._tcp.web.default.svc.cluster.local")
    assert (status, srv) == ("NOERROR", ["0 100 80 web.default.svc.cluster.local."])
    ip = next(iter(web_pods(lab).values()))
    assert dig(lab, "c2", f"{ip.replace('.', '-')}.default.pod.cluster.local") == ("NOERROR", [ip])


def test_unknown_names_get_nxdomain_and_nothing_is_forwarded(lab):
    for pod in CLIENTS:
        assert dig(lab, pod, "nope.default.svc.cluster.local")[0] == "NXDOMAIN"
    assert run(lab, "c1", "getent", "hosts", "nope", check=False).returncode != 0
    assert dig(lab, "c1", "example.com")[0] == "REFUSED"            # no upstream: nothing leaves the lab


def test_live_changes_are_reflected(lab, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: extra}\n"
                     "spec: {selector: {app: web}, ports: [{name: http, port: 8000, targetPort: http}]}\n")
    out = netsim("apply", "--lab", lab, "-f", str(extra)).stdout
    assert "DNS names served by every cluster DNS replica in" in out
    ip = cluster_ip(lab, "default/extra")
    for pod in CLIENTS:
        assert dig(lab, pod, "extra.default.svc.cluster.local") == ("NOERROR", [ip])
        assert run(lab, pod, "curl", "-s", "--max-time", "3", "extra:8000/hostname").stdout in web_pods(lab)
    assert dig(lab, "c1", "SRV", "_http._tcp.extra.default.svc.cluster.local")[1] == [
        "0 100 8000 extra.default.svc.cluster.local."]
    netsim("delete", "--lab", lab, "-f", str(extra))
    for pod in CLIENTS:
        assert dig(lab, pod, "extra.default.svc.cluster.local")[0] == "NXDOMAIN"
    # Scaling changes the headless answer; the replicas keep running (a rolling restart
    # for the SRV records) and the status still shows them up.
    netsim("scale", "--lab", lab, "deployment/web", "--replicas", "5")
    try:
        assert sorted(dig(lab, "c3", "web-hl.default.svc.cluster.local")[1]) == sorted(web_pods(lab).values())
        assert len(web_pods(lab)) == 5
    finally:
        netsim("scale", "--lab", lab, "deployment/web", "--replicas", "3")
    assert sorted(dig(lab, "c3", "web-hl.default.svc.cluster.local")[1]) == sorted(web_pods(lab).values())
    state = json.loads(Path(f"/run/netsim/{lab}/state.json").read_text())
    assert all(Path(f).exists() for f in state["files"])
    plan = json.loads(Path(f"/run/netsim/{lab}/plan.json").read_text())
    assert sorted(state["files"]) == sorted(f"/etc/netns/{p['netns']}/resolv.conf" for p in plan["pods"])
    assert all(r["dnsmasq"] for r in json.loads(netsim("status", lab, "-o", "json").stdout)["clusterDNS"]["replicas"])


def test_srv_changes_hand_dnsmasq_over_without_losing_a_query(lab, tmp_path):
    """SRV records are dnsmasq options: a change starts new dnsmasq processes (on the other
    port, port 53 redirected to them); a client asking all along gets every answer."""
    def servers() -> set[int]:
        st = json.loads(Path(f"/run/netsim/{lab}/state.json").read_text())
        return {p["pid"] for p in st["processes"] if p["role"] == "dnsmasq"}
    before = servers()
    stop = tmp_path / "stop"
    plan = json.loads(Path(f"/run/netsim/{lab}/plan.json").read_text())
    c1 = next(p["netns"] for p in plan["pods"] if p["name"] == "c1")
    loop = (f"while [ ! -e {stop} ]; do dig +tries=1 +time=1 +short kube-dns.kube-system.svc.cluster.local "
            f"|| echo FAIL; done")
    client = subprocess.Popen(["ip", "netns", "exec", c1, "sh", "-c", loop], stdout=subprocess.PIPE, text=True)
    try:
        svc = tmp_path / "named.yaml"
        svc.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: named}\n"
                       "spec: {selector: {app: web}, ports: [{name: web, port: 81, targetPort: http}]}\n")
        for _ in range(2):
            netsim("apply", "--lab", lab, "-f", str(svc))
            netsim("delete", "--lab", lab, "-f", str(svc))
    finally:
        stop.touch()
        out, _ = client.communicate(timeout=30)
    answers = out.split()
    assert len(answers) > 10 and set(answers) == {"10.96.0.10"}, answers
    assert servers() and not servers() & before                   # every replica was replaced
    assert len(servers()) == 2


def test_selftest_includes_dns_checks(lab):
    data = json.loads(netsim("selftest", lab, "-o", "json").stdout)
    checks = data["checks"] if isinstance(data, dict) else data
    dns = [c for c in checks if c["name"].startswith("pod→cluster DNS")]
    assert len(dns) == 4 and all(c["ok"] for c in dns)


def test_a_lab_without_cluster_dns(tmp_path):
    name = f"dn-nodns{os.getpid() % 10000}"
    topo = tmp_path / "nodns.yaml"
    topo.write_text(f"name: {name}\ncluster: {{dns: false}}\nnodes: [n1]\nmanifests:\n"
                    "  - {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: c}]}}\n")
    netsim("up", str(topo))
    try:
        plan = json.loads(Path(f"/run/netsim/{name}/plan.json").read_text())
        assert [p["name"] for p in plan["pods"]] == ["p"]
        assert not Path(f"/etc/netns/netsim.{name}.pod.default.p").exists()
        assert json.loads(netsim("status", name, "-o", "json").stdout)["clusterDNS"] is None
    finally:
        netsim("down", name)


def test_replica_rescheduled_by_node_removal_serves_the_current_zone(tmp_path):
    """A coredns replica on a removed node comes back on another node (same name, new
    namespace) with the port-53 redirect and the records of that moment."""
    name = f"dn-move{os.getpid() % 10000}"
    topo = tmp_path / "move.yaml"
    topo.write_text(TOPOLOGY.format(lab=name))
    netsim("up", str(topo))
    try:
        plan = json.loads(Path(f"/run/netsim/{name}/plan.json").read_text())
        moved = next(p for p in plan["pods"] if p["namespace"] == "kube-system")
        netsim("node", "remove", "--lab", name, moved["node"])
        data = json.loads(netsim("status", name, "-o", "json").stdout)["clusterDNS"]
        assert all(r["dnsmasq"] for r in data["replicas"]) and moved["node"] not in {r["node"] for r in data["replicas"]}
        client = next(c for c in CLIENTS if c != {"n1": "c1", "n2": "c2", "n3": "c3"}[moved["node"]])
        ips = sorted(web_pods(name).values())
        for _ in range(6):               # both replicas, whichever kube-proxy picks
            status, srv = dig(name, client, "SRV", "_http._tcp.web-hl.default.svc.cluster.local")
            assert status == "NOERROR"
            assert sorted(s.split()[-1] for s in srv) == sorted(
                f"{ip.replace('.', '-')}.web-hl.default.svc.cluster.local." for ip in ips)
    finally:
        netsim("down", name)
    assert not [d for d in os.listdir("/etc/netns") if d.startswith(f"netsim.{name}.")] \
        if os.path.isdir("/etc/netns") else True
