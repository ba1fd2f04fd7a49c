"""Kernel tests for the kube-proxy clone: real traffic through real rules, in each proxy mode.

The module-scoped lab runs once per mode in ``MODES``; tests of one mode's kernel objects
(``iptables-save`` shapes, the ``ip kube-proxy`` table) read them with that mode's tool.
Lab names are ``<prefix><pid><mode>``; ``NETSIM_TEST_LAB_PREFIX`` sets the prefix
(default ``t``) so parallel runs on one machine never collide.
"""
from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import pytest

from labs import machine_snapshot, netsim, status

pytestmark = pytest.mark.root

# IPVS mode needs ip_vs (the ipvs marker skips it elsewhere; scripts/test-uml.sh runs it in UML,
# where only the legacy iptables backend exists).
MODES = ("iptables", "nftables", pytest.param("ipvs", marks=pytest.mark.ipvs))
IPTABLES_BACKEND = {"ipvs": "legacy"}

TOPOLOGY = """
name: {lab}
cluster: {{minSyncPeriod: 0.1, loadBalancerPool: [192.168.100.240/28], proxyMode: {mode},
           iptablesBackend: {backend}}}
nodes: [n1, n2]
externals: [ext]
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
  - {{apiVersion: v1, kind: Pod, metadata: {{name: client, labels: {{app: client}}}},
     spec: {{nodeName: n1, containers: [{{name: c}}]}}}}
  - {{apiVersion: v1, kind: Pod, metadata: {{name: solo, labels: {{app: solo}}}},
     spec: {{nodeName: n1, containers: [{{name: c, ports: [{{containerPort: 9000}}]}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: web}},
     spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: http}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: sticky}},
     spec: {{selector: {{app: web}}, sessionAffinity: ClientIP, ports: [{{port: 80, targetPort: 8080}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: solo}},
     spec: {{selector: {{app: solo}}, ports: [{{port: 90, targetPort: 9000}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: empty}},
     spec: {{selector: {{app: nobody}}, ports: [{{port: 80}}]}}}}
  - {{apiVersion: v1, kind: Service, metadata: {{name: lb}},
     spec: {{type: LoadBalancer, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080, nodePort: 30100}}]}}}}
"""


@pytest.fixture(scope="module", params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def lab(tmp_path_factory, mode):
    name = f"{os.environ.get('NETSIM_TEST_LAB_PREFIX', 't')}{os.getpid() % 10000}{mode[:2]}"
    before = machine_snapshot(name)
    topo = tmp_path_factory.mktemp("kp") / "kp.yaml"
    topo.write_text(TOPOLOGY.format(lab=name, mode=mode, backend=IPTABLES_BACKEND.get(mode, "nft")))
    netsim("up", str(topo), "--timeout", "60")
    try:
        yield name
    finally:
        netsim("down", name, check=False)
    assert machine_snapshot(name) == before


def services(lab: str) -> dict:
    return json.loads(open(f"/run/netsim/{lab}/services.json").read())


def run(lab: str, target: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return netsim("exec", "--lab", lab, target, "--", *cmd, check=check)


def curl(lab: str, target: str, url: str, timeout: float = 2) -> str:
    return run(lab, target, "curl", "-s", "--max-time", str(timeout), url, check=False).stdout


def programmed(lab: str, node: str, mode: str) -> str:
    """The node's kube-proxy state as its mode's own tool prints it."""
    if mode == "nftables":            # affinity sets' dynamic elements expire: left out
        table = json.loads(run(lab, node, "nft", "-j", "list", "table", "ip", "kube-proxy").stdout)["nftables"]
        objs = [{k: {f: x for f, x in v.items() if not (k == "set" and f == "elem" and v["name"].startswith("affinity-"))}
                 for k, v in o.items()} for o in table if "metainfo" not in o]
        return "\n".join(sorted(json.dumps(o, sort_keys=True) for o in objs))
    if mode == "ipvs":
        return run(lab, node, "ipvsadm", "-Sn").stdout + run(lab, node, "ipset", "save").stdout
    return run(lab, node, "iptables-nft-save", "-t", "nat").stdout


def service_chain(mode: str, namespace: str, name: str, port_name: str = "", proto: str = "tcp") -> str:
    """The name of a Service port's load-balancing chain in ``mode``."""
    from netsim.proxy.model import ServicePort
    sp = ServicePort(namespace, name, port_name, proto.upper(), 0, "")
    if mode == "nftables":
        from netsim.proxy.nftables import port_base
        return "service-" + port_base(sp)
    if mode == "ipvs":                # no per-service chains: the test's only port-8081 virtual server
        return ":8081 -s rr"
    from netsim.proxy.iptables import service_chain_suffix
    return "KUBE-SVC-" + service_chain_suffix(sp.spn, proto)


def test_selftest_covers_every_service_path(lab):
    data = json.loads(netsim("selftest", lab, "-o", "json").stdout)
    assert all(c["ok"] for c in data), [c for c in data if not c["ok"]]
    names = {c["name"] for c in data}
    assert {"pod→ClusterIP (TCP)", "external→NodePort, eTP=Cluster", "external→LoadBalancer IP"} <= names


def test_node_to_clusterip_is_masqueraded_and_pods_are_not(lab):
    ip = services(lab)["cluster_ips"]["default/web"]
    pods = {p["ip"] for p in status(lab)["pods"]}
    seen = curl(lab, "n1", f"http://{ip}/clientip").rsplit(":", 1)[0]
    assert seen and seen not in pods and not seen.startswith("192.168.100.")  # cni0 or flannel.1 address
    client = next(p for p in status(lab)["pods"] if p["name"] == "client")
    assert curl(lab, "client", f"http://{ip}/clientip").rsplit(":", 1)[0] == client["ip"]


def test_icmp_to_a_clusterip_gets_no_answer(lab, mode):
    """No echo reply in any mode. In IPVS mode the node holds the ClusterIP (kube-ipvs0), so
    the node itself answers: port unreachable from KUBE-IPVS-FILTER (kube-proxy >= 1.27)."""
    ip = services(lab)["cluster_ips"]["default/web"]
    done = run(lab, "client", "ping", "-c", "1", "-W", "1", ip, check=False)
    assert done.returncode != 0
    answered = f"From {ip}" in done.stdout
    assert answered == (mode == "ipvs"), done.stdout


def test_service_without_endpoints_is_refused_at_once(lab, mode):
    ip = services(lab)["cluster_ips"]["default/empty"]
    done = run(lab, "client", "curl", "-s", "--max-time", "5", f"http://{ip}/", check=False)
    # refused (REJECT, or IPVS with no real server): curl exit 7; a drop would be 28 at --max-time
    assert done.returncode == 7
    if mode == "nftables":
        elements = run(lab, "n1", "nft", "list", "map", "ip", "kube-proxy", "no-endpoint-services").stdout
        assert f'{ip} . tcp . 80 comment "default/empty" : goto reject-chain' in elements
    elif mode == "ipvs":              # a virtual server without real servers: IPVS itself refuses
        listing = run(lab, "n1", "ipvsadm", "-Ln", "-t", f"{ip}:80").stdout
        assert f"TCP  {ip}:80 rr" in listing and "Masq" not in listing
    else:
        rules = run(lab, "n1", "iptables-nft-save", "-t", "filter").stdout
        assert '"default/empty has no endpoints"' in rules and "-j REJECT" in rules


def test_hairpin_to_own_service_is_masqueraded(lab):
    ip = services(lab)["cluster_ips"]["default/solo"]
    seen = curl(lab, "solo", f"http://{ip}:90/clientip").rsplit(":", 1)[0]
    assert seen == "10.244.1.1"                              # the cni0 bridge address, not the pod


def test_session_affinity_pins_a_client(lab):
    sticky = services(lab)["cluster_ips"]["default/sticky"]
    web = services(lab)["cluster_ips"]["default/web"]
    pinned = {curl(lab, "client", f"http://{sticky}/hostname") for _ in range(15)}
    spread = {curl(lab, "client", f"http://{web}/hostname") for _ in range(30)}
    assert len(pinned) == 1 and pinned != {""}
    assert len(spread) > 1


def test_load_is_spread_evenly(lab):
    ip = services(lab)["cluster_ips"]["default/web"]
    script = ("import urllib.request, collections\n"
              f"c = collections.Counter(urllib.request.urlopen('http://{ip}/hostname', timeout=2).read() "
              "for _ in range(300))\nprint(sorted(c.values()))")
    counts = json.loads(run(lab, "client", "python3", "-c", script).stdout)
    assert len(counts) == 3
    expected = sum(counts) / 3
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 13.8, counts                              # 0.999 quantile, 2 degrees of freedom


def test_loadbalancer_ip_is_announced_by_arp(lab):
    lb = services(lab)["lb_ips"]["default/lb"]
    assert curl(lab, "ext", f"http://{lb}/hostname").startswith("web-")
    neigh = run(lab, "ext", "ip", "neigh", "show", lb).stdout
    speaker = [n for n in ("n1", "n2")
               if lb in json.loads(open(f"/run/netsim/{lab}/kube-proxy/{n}.json").read()).get("announcing", [])]
    assert len(speaker) == 1 and "lladdr" in neigh


def test_iptables_save_shows_kube_proxy_shapes(lab, mode):
    if mode != "iptables":
        pytest.skip("iptables mode's rule shapes")
    from netsim.proxy.iptables import service_chain_suffix
    nat = run(lab, "n2", "iptables-nft-save", "-t", "nat").stdout
    assert f"KUBE-SVC-{service_chain_suffix('default/web', 'tcp')}" in nat
    assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in nat
    assert "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0" in nat
    assert "--probability 0.33333333349" in nat
    services_rules = [l for l in nat.splitlines() if l.startswith("-A KUBE-SERVICES")]
    assert "--dst-type LOCAL -j KUBE-NODEPORTS" in services_rules[-1]


def test_ipvsadm_and_ipset_show_kube_proxy_state(lab, mode):
    if mode != "ipvs":
        pytest.skip("IPVS mode's virtual servers and sets")
    web = services(lab)["cluster_ips"]["default/web"]
    sticky = services(lab)["cluster_ips"]["default/sticky"]
    listing = run(lab, "n2", "ipvsadm", "-Ln").stdout
    assert f"TCP  {web}:80 rr" in listing and f"TCP  {sticky}:80 rr persistent 10800" in listing
    assert listing.count("Masq    1") >= 3
    assert f"{web}/32" in run(lab, "n2", "ip", "-o", "addr", "show", "dev", "kube-ipvs0").stdout
    sets = run(lab, "n2", "ipset", "list", "-n").stdout.split()
    assert {"KUBE-CLUSTER-IP", "KUBE-LOOP-BACK", "KUBE-NODE-PORT-TCP", "KUBE-LOAD-BALANCER"} <= set(sets)
    assert f"{web},tcp:80" in run(lab, "n2", "ipset", "list", "KUBE-CLUSTER-IP").stdout
    nat = run(lab, "n2", "iptables-legacy-save", "-t", "nat").stdout
    assert "-m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE" in nat
    assert "KUBE-SVC-" not in nat                            # no per-service chains in IPVS mode


def test_nft_list_shows_kube_proxy_layout(lab, mode):
    if mode != "nftables":
        pytest.skip("nftables mode's table")
    table = run(lab, "n2", "nft", "list", "table", "ip", "kube-proxy").stdout
    web = services(lab)["cluster_ips"]["default/web"]
    for want in ("type filter hook prerouting priority dstnat - 10;", "type nat hook postrouting priority srcnat;",
                 "map service-ips {", "map service-nodeports {", "set cluster-ips {", "set nodeport-ips {",
                 f"{web} . tcp . 80 : goto {service_chain('nftables', 'default', 'web')}",
                 "numgen random mod 3 vmap {", "meta mark set meta mark | 0x00004000", "masquerade fully-random",
                 "flags dynamic,timeout", "tcp . 30100 : goto external-"):
        assert want in table, want
    assert "KUBE-" not in run(lab, "n2", "iptables-nft-save").stdout


def test_apply_and_delete_reprogram_every_node_and_bad_input_changes_nothing(lab, mode, tmp_path):
    chain = service_chain(mode, "default", "extra")
    extra = tmp_path / "extra.yaml"
    extra.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: extra}\n"
                     "spec: {selector: {app: web}, ports: [{port: 8081, targetPort: 8080}]}\n")
    out = netsim("apply", "-f", str(extra), "--lab", lab).stdout
    assert "reprogrammed on every node" in out
    for node in ("n1", "n2"):
        assert chain in programmed(lab, node, mode)
    before = programmed(lab, "n1", mode)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: clash}\n"
                   "spec: {type: NodePort, selector: {app: web}, ports: [{port: 80, nodePort: 30100}]}\n")
    done = netsim("apply", "-f", str(bad), "--lab", lab, check=False)
    assert done.returncode == 2 and "30100" in done.stderr and "nothing was changed" in done.stderr
    after = programmed(lab, "n1", mode)
    strip = lambda text: [l for l in text.splitlines() if not l.startswith(("#", ":"))]
    assert strip(after) == strip(before)
    netsim("delete", "-f", str(extra), "--lab", lab)
    for node in ("n1", "n2"):
        assert chain not in programmed(lab, node, mode)
