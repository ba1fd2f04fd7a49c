"""Kernel tests: probe, trace and verify in each kube-proxy mode of the host kernel, and the
trace of a DNS name (the query first, then the connection).

One small lab per mode (two nodes, two web replicas behind a NodePort Service, a client
pod, an external host; the cluster DNS), brought up once for the module. In each mode:
a probe to the Service is DNATed to a web pod; the trace's rule list names that mode's
own chains (iptables: KUBE-SVC-…/KUBE-SEP-… and KUBE-POSTROUTING's MASQUERADE;
nftables: service-…/endpoint-… and the masquerading chain); the default verify matrix
passes; a DNS name is resolved by a real query from the pod to the kube-dns ClusterIP,
DNATed to a coredns replica, whose A answer names the ClusterIP the connection then
goes to; tshark decodes the DNS in the pcapng; an unknown name is one line and exit 1.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from labs import lab_name, netsim, running_lab, services

pytestmark = pytest.mark.root

MODES = ("iptables", "nftables")
KUBE_DNS = "10.96.0.10"


def topology(name: str, mode: str) -> str:
    return f"""name: {name}
cluster:
  proxyMode: {mode}
nodes:
  - name: node-1
  - name: node-2
externals:
  - name: ext
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web}}
    spec:
      replicas: 2
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec:
          nodeName: node-2
          containers:
            - name: web
              ports: [{{containerPort: 8080, name: http}}]
  - apiVersion: v1
    kind: Pod
    metadata: {{name: client, labels: {{app: client}}}}
    spec:
      nodeName: node-1
      containers: [{{name: c}}]
  - apiVersion: v1
    kind: Service
    metadata: {{name: web}}
    spec:
      type: NodePort
      selector: {{app: web}}
      ports: [{{name: http, port: 80, targetPort: http, nodePort: 30080}}]
"""


@pytest.fixture(scope="module", params=MODES)
def lab(request, tmp_path_factory):
    mode = request.param
    name = lab_name(mode[:3])
    path = tmp_path_factory.mktemp(mode) / f"{name}.yaml"
    path.write_text(topology(name, mode))
    with running_lab(path, name) as lab:
        plan = json.loads(Path(f"/run/netsim/{lab}/plan.json").read_text())
        yield {"lab": lab, "mode": mode, "plan": plan}


def j(*args: str, check: bool = True) -> dict:
    return json.loads(netsim(*args, "-o", "json", check=check).stdout)


def pod_keys(lab, prefix: str) -> set[str]:
    return {f"{p['namespace']}/{p['name']}" for p in lab["plan"]["pods"] if p["name"].startswith(prefix)}


def pod_ips(lab, prefix: str) -> set[str]:
    return {p["ip"] for p in lab["plan"]["pods"] if p["name"].startswith(prefix)}


def chains(trace: dict) -> list[tuple[str, str, str]]:
    return [(r["table"], r["chain"], r["rule"]) for p in trace["rules"] for r in p["rules"]]


def test_probe_is_dnated_to_a_web_pod(lab):
    r = j("probe", "--lab", lab["lab"], "client", "web")
    assert r["reached"] and r["dnat"] and not r["snat"]
    assert r["backend"] in pod_keys(lab, "web-")


def test_trace_names_the_modes_own_chains(lab):
    t = j("trace", "--lab", lab["lab"], "client", "web", "-w", "/dev/null")
    assert t["reached"] and t["path"]["delivered"]
    dnat = [e for e in t["nat"] if "DNAT" in e["kinds"] and e["leg"] == "forward"]
    assert dnat and dnat[0]["between"][1] == "node-1 cni0"
    seen = chains(t)
    if lab["mode"] == "iptables":
        assert any(c.startswith("KUBE-SVC-") for _, c, _ in seen)
        assert any(c.startswith("KUBE-SEP-") and "dnat to" in rule for _, c, rule in seen)
    else:
        assert any(tbl == "kube-proxy" and c.startswith("service-") and "default/web/tcp/http" in c for tbl, c, _ in seen)
        assert any(c.startswith("endpoint-") and "dnat to" in rule for _, c, rule in seen)
    # the NodePort from outside is masqueraded by the mode's own postrouting chain
    np = j("trace", "--lab", lab["lab"], "ext", "node-1:30080", "-w", "/dev/null")
    masq = [(c, rule) for _, c, rule in chains(np) if "masquerade" in rule.lower() and "jump" not in rule]
    want = "KUBE-POSTROUTING" if lab["mode"] == "iptables" else "masquerading"
    assert masq and all(c == want for c, _ in masq), masq


def test_verify_default_matrix_passes(lab):
    v = j("verify", lab["lab"], "--matrix-only")
    assert v["failed"] == 0 and v["passed"] >= 6, [r for r in v["results"] if not r["ok"]]


@pytest.mark.parametrize("name", ["web", "web.default.svc.cluster.local"])
def test_trace_of_a_dns_name_shows_the_query_then_the_connection(lab, name, tmp_path):
    target = name if "." in name else f"dns:{name}"
    pcap = tmp_path / "dns.pcapng"
    t = j("trace", "--lab", lab["lab"], "client", target, "-w", str(pcap))
    vip = services(lab["lab"])["cluster_ips"]["default/web"]
    dns = t["dns"]
    assert (dns["server"], dns["answeredAs"], dns["addresses"]) == (KUBE_DNS, "web.default.svc.cluster.local", [vip])
    q = dns["trace"]
    steps = q["steps"]
    first = steps[0]
    assert (first["src"], first["dst"], first["dport"], first["proto"]) == (
        next(iter(pod_ips(lab, "client"))), KUBE_DNS, 53, "udp")
    assert first["info"] == "DNS query A web.default.svc.cluster.local"
    replicas = pod_ips(lab, "coredns-")
    dnat = [e for e in q["nat"] if "DNAT" in e["kinds"] and e["leg"] == "forward"]
    assert dnat and any(f"{KUBE_DNS}:53 → " in c and c.split("→ ")[1].split(":")[0] in replicas
                        for c in dnat[0]["changes"])
    answers = [s for s in steps if s["leg"] == "reply"]
    assert answers and answers[-1]["info"] == f"DNS answer NOERROR A {vip}" and answers[-1]["src"] == KUBE_DNS
    # then the connection to the ClusterIP from the answer, DNATed to a web pod
    assert (t["address"], t["reached"]) == (f"{vip}:80", True)
    conn = [e for e in t["nat"] if "DNAT" in e["kinds"] and e["leg"] == "forward"]
    assert conn and any(c.split("→ ")[1].split(":")[0] in pod_ips(lab, "web-") for c in conn[0]["changes"])
    assert steps[-1]["tsNs"] < t["steps"][0]["tsNs"]
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "dns.flags.response",
                              "-e", "dns.qry.name", "-e", "dns.a", "-e", "tcp.flags.syn"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        rows = [line.split("\t") for line in out]
        decoded = [r for r in rows if r[1] == "web.default.svc.cluster.local"]
        assert {r[0] for r in decoded} in ({"False", "True"}, {"0", "1"})      # the query and the answer
        assert any(r[2] == vip for r in decoded)
        first_tcp = next(i for i, r in enumerate(rows) if r[3])
        assert all(r[1] for r in rows[:first_tcp]) and rows[0][0] in ("False", "0")   # DNS first


def test_an_unknown_name_is_one_line_and_exit_1(lab):
    done = netsim("trace", "--lab", lab["lab"], "client", "dns:nosuchsvc", check=False)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "NXDOMAIN" in lines[0] and "nosuchsvc.default.svc.cluster.local" in lines[0]
