"""A DNS name TARGET: parsing, the DNS lines of a walk, the two-part text and pcapng (no root).
The frames are built with scapy as the kernel would have shown them."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from netsim.dns.query import build_query, describe
from netsim.probes import dnsname, scapyprobe, trace, walk
from netsim.probes.capture import Frame, Hop
from netsim.probes.targets import ProbeError, Source, resolve_target

CLIENT, KUBE_DNS, COREDNS, VIP, WEB = "10.244.1.2", "10.96.0.10", "10.244.2.5", "10.96.7.7", "10.244.2.3"
HOPS = [Hop("p", "default/client", "eth0", "pod eth0"),
        Hop("n1", "node-1", "veth1", "host veth of client"),
        Hop("n1", "node-1", "cni0", "bridge"),
        Hop("d", "kube-system/coredns-1", "eth0", "pod eth0"),
        Hop("b", "default/web-1", "eth0", "pod eth0")]


def answer(query: bytes, address: str | None) -> bytes:
    """The reply dnsmasq would send: the query's id and question, one A record or NXDOMAIN."""
    ident, qd = query[:2], query[12:query.index(b"\0", 12) + 5]
    if address is None:
        return ident + bytes.fromhex("8183 0001 0000 0000 0000") + qd
    rr = bytes.fromhex("c00c 0001 0001 0000001e 0004") + bytes(int(x) for x in address.split("."))
    return ident + bytes.fromhex("8180 0001 0001 0000 0000") + qd + rr


def udp(src, sport, dst, dport, payload, ip_id):
    return Ether() / IP(src=src, dst=dst, id=ip_id) / UDP(sport=sport, dport=dport) / payload


def dns_frames(q: bytes, a: bytes) -> list[Frame]:
    """A query to the kube-dns ClusterIP DNATed to a coredns pod on node-1, and its answer."""
    seq = [(0, True, udp(CLIENT, 40000, KUBE_DNS, 53, q, 4242)), (1, False, udp(CLIENT, 40000, KUBE_DNS, 53, q, 4242)),
           (2, True, udp(CLIENT, 40000, COREDNS, 53, q, 4242)), (3, False, udp(CLIENT, 40000, COREDNS, 53, q, 4242)),
           (3, True, udp(COREDNS, 53, CLIENT, 40000, a, 9)), (2, False, udp(COREDNS, 53, CLIENT, 40000, a, 9)),
           (1, True, udp(KUBE_DNS, 53, CLIENT, 40000, a, 9)), (0, False, udp(KUBE_DNS, 53, CLIENT, 40000, a, 9))]
    return [Frame(h, 1_000_000 * (i + 1), out, bytes(p)) for i, (h, out, p) in enumerate(seq)]


def tcp_frames() -> list[Frame]:
    syn, synd = (Ether() / IP(src=CLIENT, dst=d, id=77) / TCP(sport=45000, dport=p, flags="S")
                 for d, p in ((VIP, 80), (WEB, 8080)))
    sa, sar = (Ether() / IP(src=s, dst=CLIENT, id=0) / TCP(sport=p, dport=45000, flags="SA")
               for s, p in ((WEB, 8080), (VIP, 80)))
    seq = [(0, True, syn), (2, True, synd), (4, False, synd), (4, True, sa), (2, False, sar), (0, False, sar)]
    return [Frame(h, 9_000_000 + 1_000_000 * i, out, bytes(p)) for i, (h, out, p) in enumerate(seq)]


def test_which_targets_are_dns_names():
    assert dnsname.split("web.default.svc.cluster.local") == ("web.default.svc.cluster.local", None)
    assert dnsname.split("web.default.svc.cluster.local.:8080") == ("web.default.svc.cluster.local.", "8080")
    assert dnsname.split("dns:web") == ("web", None)
    assert dnsname.split("dns:web:80") == ("web", "80")
    for not_a_name in ("web", "svc/default/web", "default/web", "10.96.0.10:53", "node-1:30080"):
        assert dnsname.split(not_a_name) is None
    with pytest.raises(ProbeError, match="give a name after 'dns:'"):
        dnsname.split("dns:10.96.0.10")
    with pytest.raises(ProbeError, match="must be a port number"):
        dnsname.split("dns:web:http")


def test_dns_messages_in_one_line():
    q = build_query("web.default.svc.cluster.local", "A", 7)
    assert describe(q) == "DNS query A web.default.svc.cluster.local"
    assert describe(answer(q, "10.96.7.7")) == "DNS answer NOERROR A 10.96.7.7"
    assert describe(answer(q, None)) == "DNS answer NXDOMAIN"
    with pytest.raises(ValueError):
        describe(b"hostname")


def test_the_query_walk_shows_dnat_to_a_replica_and_the_answer(demo):
    q = build_query("web.default.svc.cluster.local", "A", 7)
    steps = walk.assemble(dns_frames(q, answer(q, VIP)), HOPS, 4242, "udp")
    assert [s.hop for s in steps] == ["default/client eth0", "node-1 veth1", "node-1 cni0", "kube-system/coredns-1 eth0",
                                      "kube-system/coredns-1 eth0", "node-1 cni0", "node-1 veth1", "default/client eth0"]
    assert {s.info for s in steps if s.leg == "forward"} == {"DNS query A web.default.svc.cluster.local"}
    assert {s.info for s in steps if s.leg == "reply"} == {f"DNS answer NOERROR A {VIP}"}
    assert steps[2].nat == [f"destination {KUBE_DNS}:53 → {COREDNS}:53"]
    assert steps[6].nat == [f"source {COREDNS}:53 → {KUBE_DNS}:53"]


def test_the_target_is_the_address_in_the_answer(demo):
    plan, res = demo
    sp = res.port("default", "web", "http")
    found = dnsname.Lookup("web", "10.96.0.10", "web.default.svc.cluster.local", "NOERROR", (sp.cluster_ip,),
                           (("web.default.svc.cluster.local", "NOERROR"),))
    t = dnsname.target_for(found, None, plan, res)
    plain = resolve_target("web", plan, res)
    assert (t.kind, t.ip, t.port, t.backends) == (plain.kind, plain.ip, plain.port, plain.backends)
    assert t.extra["dns"]["answeredAs"] == "web.default.svc.cluster.local"
    q = dnsname.dns_target(found, plan, res)
    assert (q.kind, q.ip, q.port, q.proto, q.service) == ("clusterip", "10.96.0.10", 53, "udp", "kube-system/kube-dns")
    assert q.backends and all(b.startswith("kube-system/coredns-") for b in q.backends)


def two_part_result(demo):
    """The TraceResult of a DNS name: the query's walk, then the connection's."""
    plan, res = demo
    src = Source("pod", "default/client", "p", CLIENT, "node-1")
    q = build_query("web.default.svc.cluster.local", "A", 7)
    found = dnsname.Lookup("web", KUBE_DNS, "web.default.svc.cluster.local", "NOERROR", (VIP,),
                           (("web.default.svc.cluster.local", "NOERROR"),))
    query_target = dnsname.dns_target(found, plan, res)
    dframes, tframes = dns_frames(q, answer(q, VIP)), tcp_frames()
    dsteps, tsteps = walk.assemble(dframes, HOPS, 4242, "udp"), walk.assemble(tframes, HOPS, 77, "tcp")
    first = trace.TraceResult(src, query_target, 4242, scapyprobe.Crafted(True, "UDP reply", CLIENT, 40000, 4242),
                              dsteps, walk.nat_events(dsteps), [], [], hops=HOPS, frames=dframes)
    web = resolve_target("web", plan, res)
    web = replace(web, extra=dict(web.extra, dns=found.to_dict()))
    second = trace.TraceResult(src, web, 77, scapyprobe.Crafted(True, "SYN-ACK", CLIENT, 45000, 77),
                               tsteps, walk.nat_events(tsteps), [], [], hops=HOPS, frames=tframes, dns=first)
    return second


def test_text_and_json_show_the_dns_query_before_the_connection(demo):
    r = two_part_result(demo)
    out = trace.text(r)
    assert out.splitlines()[0] == (f"DNS: default/client asks its nameserver {KUBE_DNS} for web: "
                                   f"web.default.svc.cluster.local A {VIP}")
    query_at, answer_at = out.index("DNS query A web.default.svc.cluster.local"), out.index(f"DNS answer NOERROR A {VIP}")
    connection_at = out.index("== 2. the connection")
    assert out.index("== 1. the DNS query") < query_at < answer_at < connection_at < out.index(" S\n")
    assert f"destination {KUBE_DNS}:53 → {COREDNS}:53" in out[:connection_at]
    d = r.to_dict()
    assert d["dns"]["answeredAs"] == "web.default.svc.cluster.local" and d["dns"]["addresses"] == [VIP]
    assert d["dns"]["trace"]["steps"][0]["info"] == "DNS query A web.default.svc.cluster.local"


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_one_pcapng_holds_the_query_then_the_connection(demo, tmp_path):
    r = two_part_result(demo)
    path = tmp_path / "t.pcapng"
    trace.write_pcap_many(str(path), [(r.dns.hops, r.dns.frames, r.dns.steps), (r.hops, r.frames, r.steps)])
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_id",
                          "-e", "frame.interface_name",
                          "-e", "dns.qry.name", "-e", "dns.a", "-e", "tcp.flags.str", "-e", "frame.comment"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    rows = [line.split("\t") for line in out]
    assert len(rows) == len(r.dns.steps) + len(r.steps)
    dns_rows = rows[:len(r.dns.steps)]
    assert all(row[2] == "web.default.svc.cluster.local" for row in dns_rows)
    assert dns_rows[-1][3] == VIP and dns_rows[0][5].startswith("part 1 step 1")
    assert rows[len(r.dns.steps)][5].startswith("part 2 step 1") and "S" in rows[len(r.dns.steps)][4]
    client = {row[0] for row in rows if row[1] == "default/client eth0"}
    assert len(client) == 1 and sum(row[1] == "default/client eth0" for row in rows) == 4   # one interface per hop
