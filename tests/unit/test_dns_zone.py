"""The cluster DNS, without root: the objects netsim adds, the zone it computes (goldens
in tests/golden/dns/), what dnsmasq is given, the resolver logic, and the real dnsmasq
serving a rendered zone on loopback.

Regenerate the goldens after a deliberate change with

    NETSIM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_dns.py

and review the diff.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from netsim.apply import dns as dns_apply
from netsim.apply.labstate import LabState
from netsim.dns import objects
from netsim.dns.query import Answer, build_query, encode_name, parse_response, query
from netsim.dns.records import Zone, render_config, render_hosts, resolv_conf, zone
from netsim.dns.resolver import ResolvConf, candidates, parse
from netsim.errors import TopologyError
from netsim.plan.lab import plan_lab
from netsim.proxy.services import resolve
from netsim.runtime.wait import wait_for
from netsim.topology import load, load_text

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "dns"
UPDATE = os.environ.get("NETSIM_UPDATE_GOLDEN") == "1"


def zone_of(path: Path) -> Zone:
    topo = load(path)
    plan = plan_lab(topo)
    return zone(topo, plan, resolve(topo, plan))


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"no golden {name}: run with NETSIM_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text()


@pytest.mark.parametrize("case,path", [("records", GOLDEN / "records.yaml"),
                                       ("demo", REPO / "topologies" / "demo.yaml")])
def test_zone_matches_golden(case, path):
    z = zone_of(path)
    check_golden(f"{case}.hosts", render_hosts(z))
    check_golden(f"{case}.conf", render_config(z))
    assert zone_of(path) == z                                   # deterministic


@pytest.fixture(scope="module")
def records():
    topo = load(GOLDEN / "records.yaml")
    plan = plan_lab(topo)
    res = resolve(topo, plan)
    return topo, plan, res, zone(topo, plan, res)


def test_cluster_ip_service_is_an_a_record_with_srv_per_named_port(records):
    _, _, res, z = records
    ip = res.cluster_ips["default/web"]
    assert z.addresses("web.default.svc.cluster.local") == [ip]
    srv = {(s.name, s.target, s.port) for s in z.srvs if s.name.endswith(".web.default.svc.cluster.local")}
    assert srv == {("_http._tcp.web.default.svc.cluster.local", "web.default.svc.cluster.local", 80),
                   ("_dns._udp.web.default.svc.cluster.local", "web.default.svc.cluster.local", 53)}
    # An unnamed port gives no SRV record.
    assert z.addresses("plain.data.svc.cluster.local") == [res.cluster_ips["data/plain"]]
    assert not [s for s in z.srvs if "plain.data" in s.name]


def test_headless_service_answers_with_the_ready_pods(records):
    _, plan, _, z = records
    web = sorted(p.ip for p in plan.pods if p.labels.get("app") == "web")
    assert sorted(z.addresses("web-hl.default.svc.cluster.local")) == web
    for ip in web:
        assert z.addresses(f"{ip.replace('.', '-')}.web-hl.default.svc.cluster.local") == [ip]
    srv = sorted((s.target, s.port, s.weight) for s in z.srvs if s.name == "_http._tcp.web-hl.default.svc.cluster.local")
    assert srv == sorted((f"{ip.replace('.', '-')}.web-hl.default.svc.cluster.local", 8080, 50) for ip in web)
    # Without a selector: the slice's ready endpoints only, SRV on the slice's port.
    assert z.addresses("legacy.data.svc.cluster.local") == ["192.168.100.50"]
    assert [(s.target, s.port) for s in z.srvs if s.name == "_pg._tcp.legacy.data.svc.cluster.local"] == [
        ("192-168-100-50.legacy.data.svc.cluster.local", 15432)]


def test_publish_not_ready_addresses_includes_unready_endpoints():
    doc = yaml.safe_load((GOLDEN / "records.yaml").read_text())
    legacy = next(o for o in doc["manifests"] if o["metadata"]["name"] == "legacy" and o["kind"] == "Service")
    legacy["spec"]["publishNotReadyAddresses"] = True
    topo = load_text(yaml.safe_dump(doc))
    plan = plan_lab(topo)
    z = zone(topo, plan, resolve(topo, plan))
    assert z.addresses("legacy.data.svc.cluster.local") == ["192.168.100.50", "192.168.100.51"]


def test_external_name_is_a_cname_and_nothing_else(records):
    _, _, res, z = records
    assert z.cnames == (("search.data.svc.cluster.local", "search.example.org"),)
    assert z.addresses("search.data.svc.cluster.local") == []
    assert "data/search" not in res.cluster_ips


def test_every_pod_has_a_dashed_a_record(records):
    _, plan, _, z = records
    for pod in plan.pods:
        assert z.addresses(f"{pod.ip.replace('.', '-')}.{pod.namespace}.pod.cluster.local") == [pod.ip]


def test_kube_dns_is_the_tenth_address_and_its_own_name_resolves(records):
    topo, plan, res, z = records
    assert res.cluster_ips["kube-system/kube-dns"] == "10.100.0.10"
    assert z.addresses("kube-dns.kube-system.svc.cluster.local") == ["10.100.0.10"]
    dns_pods = [p for p in plan.pods if objects.is_dns_pod(p)]
    assert len(dns_pods) == objects.REPLICAS and {p.node for p in dns_pods} == {"n1", "n2"}
    kube_dns = {(p.port_name, p.protocol): p for p in res.service("kube-system", "kube-dns")}
    assert set(kube_dns) == {("dns", "UDP"), ("dns-tcp", "TCP"), ("metrics", "TCP")}
    assert sorted(e.ip for e in kube_dns[("dns", "UDP")].endpoints) == sorted(p.ip for p in dns_pods)
    assert {e.port for e in kube_dns[("dns", "UDP")].endpoints} == {53}
    # The replicas declare only the metrics port: 53 is dnsmasq's, not the pod server's.
    assert all([x.port for x in p.ports] == [9153] for p in dns_pods)


def test_dns_false_adds_nothing():
    topo = load_text("name: t\ncluster: {dns: false}\nnodes: [n1]\n")
    assert topo.services == () and topo.pods == () and not topo.cluster.dns


@pytest.mark.parametrize("text,line", [
    ("name: t\ncluster: {dns: yes please}\nnodes: [n1]\n", "cluster.dns: must be true or false, got 'yes please'"),
    ("name: t\ncluster: {serviceCIDR: 10.96.0.0/29}\nnodes: [n1]\n",
     "cluster.serviceCIDR: 10.96.0.0/29 has no tenth address for the kube-dns Service"),
])
def test_bad_dns_settings_are_refused(text, line):
    with pytest.raises(TopologyError) as exc:
        load_text(text)
    assert any(l.startswith(line) for l in exc.value.lines()), exc.value.lines()


def test_small_service_cidr_is_fine_without_dns():
    assert load_text("name: t\ncluster: {serviceCIDR: 10.96.0.0/29, dns: false}\nnodes: [n1]\n")


def test_resolv_conf_is_the_kubelet_cluster_first_file():
    assert resolv_conf("shop", "10.96.0.10") == ("search shop.svc.cluster.local svc.cluster.local cluster.local\n"
                                                 "nameserver 10.96.0.10\noptions ndots:5\n")


def test_search_list_and_ndots_as_glibc_applies_them():
    conf = parse(resolv_conf("default", "10.96.0.10") + "# a comment\n")
    assert conf == ResolvConf(("10.96.0.10",), ("default.svc.cluster.local", "svc.cluster.local", "cluster.local"), 5)
    assert candidates("web", conf)[0] == "web.default.svc.cluster.local"
    assert candidates("web", conf)[-1] == "web"
    # Four dots are fewer than ndots:5: the search list still comes first.
    assert candidates("web.default.svc.cluster.local", conf)[0] == "web.default.svc.cluster.local.default.svc.cluster.local"
    assert candidates("a.b.c.d.e.f", conf)[0] == "a.b.c.d.e.f"
    assert candidates("web.default.svc.cluster.local.", conf) == ["web.default.svc.cluster.local"]


def test_update_check_names_what_changed():
    old = Zone((("10.96.1.1", "a.default.svc.cluster.local"), ("10.96.1.2", "b.default.svc.cluster.local")),
               (("x.default.svc.cluster.local", "example.org"),))
    new = Zone((("10.96.1.1", "a.default.svc.cluster.local"), ("10.96.1.3", "b.default.svc.cluster.local"),
                ("10.96.1.4", "c.default.svc.cluster.local")))
    assert dns_apply.changed_names(old, new) == {
        "b.default.svc.cluster.local": ("A", frozenset({"10.96.1.3"})),
        "c.default.svc.cluster.local": ("A", frozenset({"10.96.1.4"})),
        "x.default.svc.cluster.local": None}
    assert dns_apply.answers_as_expected(Answer("NXDOMAIN"), None)
    assert not dns_apply.answers_as_expected(Answer("NOERROR", (("b", "A", "10.96.1.2"),)), ("A", frozenset({"10.96.1.3"})))


def test_query_wire_format_round_trip():
    q = build_query("web.default.svc.cluster.local", "SRV", 0x1234)
    assert q[:4] == b"\x12\x34\x01\x00" and q[10:12] == b"\x00\x01"          # one OPT record (EDNS)
    assert q.endswith(b"\x00\x21\x00\x01" + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00")
    # A reply with a compressed answer name pointing at the question (offset 12).
    name = encode_name("web.default.svc.cluster.local")
    reply = (b"\x12\x34\x81\x80\x00\x01\x00\x02\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"
             + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + socket.inet_aton("10.96.0.20")
             + b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x05" + len(encode_name("x.org")).to_bytes(2, "big") + encode_name("x.org"))
    got = parse_response(reply, 0x1234)
    assert got.rcode == "NOERROR"
    assert got.records == (("web.default.svc.cluster.local", "A", "10.96.0.20"),
                           ("web.default.svc.cluster.local", "CNAME", "x.org"))
    with pytest.raises(ValueError):
        parse_response(reply, 0x4321)


def test_resolv_conf_files_are_recorded_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("NETSIM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(dns_apply, "ETC_NETNS", tmp_path / "etc-netns")
    topo = load_text("name: dn-unit\nnodes: [n1]\nmanifests:\n"
                     "  - {apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {containers: [{name: c}]}}\n")
    plan = plan_lab(topo)
    st = LabState("dn-unit")
    (tmp_path / "state" / "dn-unit").mkdir(parents=True)
    dns_apply.write_resolv(st, plan, list(plan.pods))
    assert LabState.load("dn-unit").files == [str(dns_apply.resolv_path(p)) for p in plan.pods]
    pod = plan.find("a")
    text = dns_apply.resolv_path(pod).read_text()
    assert "nameserver 10.96.0.10" in text and "search default.svc.cluster.local" in text
    dns_apply.forget_pod(st, pod)
    assert not (tmp_path / "etc-netns" / pod.netns).exists()
    assert str(dns_apply.resolv_path(pod)) not in LabState.load("dn-unit").files
    # A sweep by namespace name removes only files netsim wrote.
    dns_apply.write_resolv(st, plan, list(plan.pods))
    foreign = tmp_path / "etc-netns" / "someone-else" / "resolv.conf"
    foreign.parent.mkdir()
    foreign.write_text("nameserver 9.9.9.9\n")
    dns_apply.sweep([p.netns for p in plan.pods] + ["someone-else"])
    assert list((tmp_path / "etc-netns").iterdir()) == [foreign.parent]


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed (Debian: dnsmasq-base)")
def test_real_dnsmasq_serves_the_rendered_zone_on_loopback(records, tmp_path):
    """The rendered files are what Debian's dnsmasq reads: run it on a free loopback port."""
    _, plan, res, z = records
    (tmp_path / "hosts").mkdir()
    (tmp_path / "hosts" / "cluster").write_text(render_hosts(z))
    many = [f"srv-host=_p._tcp.big.default.svc.cluster.local,{i}-endpoint-with-a-long-name.big.default.svc.cluster.local,"
            f"8080,0,5" for i in range(20)]                        # more than 512 bytes of answers
    (tmp_path / "records.conf").write_text(render_config(z) + "\n".join(many) + "\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = ["--user=root"] if os.geteuid() == 0 else []
    args = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--local=/cluster.local/",
            "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}", "--pid-file=",
            f"--hostsdir={tmp_path / 'hosts'}", f"--conf-file={tmp_path / 'records.conf'}", "--local-ttl=5", *user]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ask = lambda name, qtype="A": query("127.0.0.1", name, qtype, port=port, timeout=0.5)

        def up() -> bool:
            try:
                return ask("kube-dns.kube-system.svc.cluster.local").rcode == "NOERROR"
            except OSError:
                return False
        wait_for(up, "dnsmasq on loopback to answer", 10)
        assert ask("web.default.svc.cluster.local").values() == [res.cluster_ips["default/web"]]
        web = sorted(p.ip for p in plan.pods if p.labels.get("app") == "web")
        assert sorted(ask("web-hl.default.svc.cluster.local").values()) == web
        assert ask("search.data.svc.cluster.local").values("CNAME") == ["search.example.org"]
        assert sorted(ask("_http._tcp.web-hl.default.svc.cluster.local", "SRV").values("SRV")) == sorted(
            f"0 50 8080 {ip.replace('.', '-')}.web-hl.default.svc.cluster.local" for ip in web)
        assert len(ask("_p._tcp.big.default.svc.cluster.local", "SRV").values("SRV")) == 20   # UDP truncates; TCP gets all
        assert ask("nope.default.svc.cluster.local").rcode == "NXDOMAIN"
        assert ask("example.org").rcode == "REFUSED"                    # nothing is forwarded
        # A rewrite of the watched directory is served without a signal.
        new = tmp_path / "cluster.tmp"
        new.write_text(render_hosts(z) + "10.100.9.9 late.default.svc.cluster.local\n")
        os.replace(new, tmp_path / "hosts" / "cluster")
        wait_for(lambda: ask("late.default.svc.cluster.local").values() == ["10.100.9.9"],
                 "dnsmasq to read the rewritten hosts file", 5)
    finally:
        proc.terminate()
        proc.wait(5)


def test_dnsmasq_has_no_upstream_and_alternates_ports(tmp_path):
    from netsim.dns.server import SERVER_PORTS, dnsmasq_args, other_port
    args = dnsmasq_args(tmp_path, SERVER_PORTS[0])
    for flag in ("--no-resolv", "--no-hosts", "--local=/cluster.local/", "--keep-in-foreground",
                 f"--port={SERVER_PORTS[0]}", f"--hostsdir={tmp_path / 'hosts'}"):
        assert flag in args
    assert not [a for a in args if a.startswith(("--server", "--resolv-file"))]
    assert other_port(SERVER_PORTS[0]) == SERVER_PORTS[1] and other_port(SERVER_PORTS[1]) == SERVER_PORTS[0]
    assert other_port(None) == SERVER_PORTS[0]


def test_port_53_redirect_rules():
    from netsim.dns.server import redirect_rules
    first = redirect_rules(10053, first=True)
    assert first.splitlines()[:2] == ["*nat", ":NETSIM-DNS - [0:0]"] and first.endswith("COMMIT\n")
    assert sum("-A PREROUTING" in l and "--dport 53" in l for l in first.splitlines()) == 2
    assert "-A NETSIM-DNS -p udp -j REDIRECT --to-ports 10053" in first
    flip = redirect_rules(10054, first=False)
    assert "PREROUTING" not in flip                 # the jumps exist; only the chain is rewritten
    assert [l for l in flip.splitlines() if l.startswith("-A")] == [
        "-A NETSIM-DNS -j CONNMARK --set-xmark 0x2746/0xffffffff",
        "-A NETSIM-DNS -p udp -j REDIRECT --to-ports 10054", "-A NETSIM-DNS -p tcp -j REDIRECT --to-ports 10054"]


def test_scaling_the_cluster_dns_is_refused_with_a_reason():
    from netsim.apply.changes import scale
    with pytest.raises(TopologyError) as exc:
        scale({"manifests": []}, "deployment/kube-system/coredns", 3)
    assert exc.value.lines() == ["deployment/kube-system/coredns: the cluster DNS Deployment is netsim's own, "
                                 "with 2 replicas (hint: it is set by cluster.dns)"]
