"""Trace assembly from captured frames, nft trace and conntrack parsing, the pcapng writer.
No root: the frames are built with scapy, as the kernel would have shown them."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from netsim.probes import conntrack, nftrace, pcapng, walk
from netsim.probes.capture import Frame, Hop

CLIENT, VIP, BACKEND = "10.244.1.2", "10.96.0.20", "10.244.2.3"
HOPS = [Hop("p", "default/client", "eth0", "pod eth0"),
        Hop("n1", "node-1", "veth1", "host veth of client"),
        Hop("n1", "node-1", "cni0", "bridge"),
        Hop("n1", "node-1", "flannel.1", "vxlan"),
        Hop("n1", "node-1", "eth0", "uplink"),
        Hop("n2", "node-2", "eth0", "uplink"),
        Hop("n2", "node-2", "flannel.1", "vxlan"),
        Hop("b", "default/web-1", "eth0", "pod eth0")]


def tcp(src, sport, dst, dport, flags, ip_id):
    return Ether() / IP(src=src, dst=dst, id=ip_id) / TCP(sport=sport, dport=dport, flags=flags)


def vxlan(inner, outer_src="192.168.100.2", outer_dst="192.168.100.3"):
    return Ether() / IP(src=outer_src, dst=outer_dst) / UDP(sport=40000, dport=8472) / VXLAN(vni=1, flags=8) / inner


def frames() -> list[Frame]:
    """A SYN to a ClusterIP DNATed on node-1, carried over VXLAN; the SYN-ACK back; noise."""
    syn = tcp(CLIENT, 45000, VIP, 80, "S", 777)
    synd = tcp(CLIENT, 45000, BACKEND, 8080, "S", 777)
    sa = tcp(BACKEND, 8080, CLIENT, 45000, "SA", 0)
    sar = tcp(VIP, 80, CLIENT, 45000, "SA", 0)
    noise = tcp("10.244.1.9", 1, "10.244.2.9", 2, "S", 5)
    seq = [(0, True, syn), (1, False, syn), (2, False, synd), (3, True, synd), (4, True, vxlan(synd)),
           (5, False, vxlan(synd)), (4, True, noise), (6, False, synd), (7, False, synd),
           (7, True, sa), (6, True, sa), (5, True, vxlan(sa, "192.168.100.3", "192.168.100.2")),
           (3, False, sa), (2, True, sar), (0, False, sar)]
    return [Frame(h, 1_000_000 * (i + 1), out, bytes(p)) for i, (h, out, p) in enumerate(seq)]


def test_walk_follows_the_flow_through_nat_and_vxlan():
    steps = walk.assemble(frames(), HOPS, 777, "tcp")
    assert [s.hop for s in steps] == ["default/client eth0", "node-1 veth1", "node-1 cni0", "node-1 flannel.1",
                                      "node-1 eth0", "node-2 eth0", "node-2 flannel.1", "default/web-1 eth0",
                                      "default/web-1 eth0", "node-2 flannel.1", "node-2 eth0",
                                      "node-1 flannel.1", "node-1 cni0", "default/client eth0"]
    assert [s.leg for s in steps] == ["forward"] * 8 + ["reply"] * 6
    assert steps[4].outer == {"src": "192.168.100.2", "dst": "192.168.100.3", "sport": 40000, "dport": 8472, "vni": 1}
    assert steps[4].tuple == ("tcp", CLIENT, 45000, BACKEND, 8080)             # the inner packet
    assert steps[2].nat == [f"destination {VIP}:80 → {BACKEND}:8080"]
    assert steps[12].nat == [f"source {BACKEND}:8080 → {VIP}:80"]
    events = walk.nat_events(steps)
    assert [(e["leg"], e["kinds"], e["between"]) for e in events] == [
        ("forward", ["DNAT"], ["node-1 veth1", "node-1 cni0"]),
        ("reply", ["reverse DNAT (conntrack)"], ["node-1 flannel.1", "node-1 cni0"])]


def test_a_node_source_starts_at_its_own_stack_and_its_nat_shows():
    """A node's own packet is NATed before any capture sees it (OUTPUT, POSTROUTING)."""
    sent = ("tcp", "192.168.100.2", 40000, VIP, 80)
    out = tcp("10.244.1.0", 5555, BACKEND, 8080, "S", 31)
    fs = [Frame(3, 10, True, bytes(out))]
    steps = walk.assemble(fs, HOPS, 31, "tcp", sent, "node-1")
    assert [(s.hop, s.frame) for s in steps] == [("node-1 (local stack)", -1), ("node-1 flannel.1", 0)]
    assert steps[1].nat == [f"destination {VIP}:80 → {BACKEND}:8080", "source 192.168.100.2:40000 → 10.244.1.0:5555"]


def test_icmp_errors_join_the_reply_by_the_packet_they_quote():
    probe = IP(src=CLIENT, dst=VIP, id=4242) / UDP(sport=5555, dport=53)
    err = Ether() / IP(src="10.244.1.1", dst=CLIENT) / ICMP(type=3, code=3) / bytes(probe)[:28]
    fs = [Frame(0, 1, True, bytes(Ether() / probe)), Frame(0, 2, False, bytes(err))]
    steps = walk.assemble(fs, HOPS, 4242, "udp")
    assert [(s.leg, s.info) for s in steps] == [("forward", ""), ("reply", "ICMP type 3 code 3")]


def test_close_timestamps_in_one_namespace_follow_the_receive_path():
    synd = tcp(CLIENT, 45000, BACKEND, 8080, "S", 9)
    fs = [Frame(6, 1000, False, bytes(synd)), Frame(5, 1010, False, bytes(vxlan(synd)))]  # flannel.1 stamped first
    steps = walk.assemble(fs, HOPS, 9, "tcp")
    assert [s.hop for s in steps] == ["node-2 eth0", "node-2 flannel.1"]


TRACE = """\
trace id 1a2b ip netsim_trace_777 pre packet: iif "veth1" ip saddr 10.244.1.2 ip daddr 10.96.0.20 ip id 777 tcp sport 45000 tcp dport 80 tcp flags == syn
trace id 1a2b ip netsim_trace_777 pre rule ip id 777 ct mark set 0x6e730309 (verdict continue)
trace id 1a2b ip nat PREROUTING packet: iif "veth1" ip saddr 10.244.1.2 ip daddr 10.96.0.20 tcp sport 45000 tcp dport 80
trace id 1a2b ip nat PREROUTING rule  counter packets 3 bytes 180 jump KUBE-SERVICES (verdict jump KUBE-SERVICES)
trace id 1a2b ip nat KUBE-SERVICES rule meta l4proto tcp ip daddr 10.96.0.20  tcp dport 80 counter packets 0 bytes 0 jump KUBE-SVC-ABC (verdict jump KUBE-SVC-ABC)
trace id 1a2b ip nat KUBE-SEP-XYZ rule meta l4proto tcp  counter packets 0 bytes 0 dnat to 10.244.2.3:8080 (verdict accept)
trace id 1a2b ip filter FORWARD policy accept
trace id 99ff ip netsim_trace_777 out packet: oif "lo" ip saddr 127.0.0.1 ip daddr 127.0.0.1 udp sport 4000 udp dport 9
"""


def test_nft_trace_lines_group_by_packet_without_the_marker():
    (pkt,) = nftrace.parse("node-1", TRACE.splitlines())
    assert pkt.summary() == "tcp 10.244.1.2:45000 → 10.96.0.20:80"
    assert [(r["chain"], r["rule"], r["verdict"]) for r in pkt.rules] == [
        ("PREROUTING", "jump KUBE-SERVICES", "jump KUBE-SERVICES"),
        ("KUBE-SERVICES", "meta l4proto tcp ip daddr 10.96.0.20 tcp dport 80 jump KUBE-SVC-ABC", "jump KUBE-SVC-ABC"),
        ("KUBE-SEP-XYZ", "meta l4proto tcp dnat to 10.244.2.3:8080", "accept"),
        ("FORWARD", "", "accept")]
    assert "ip id 4242 ct mark set 0x6e731092" in nftrace.ruleset(4242)
    assert nftrace.ruleset(4242).startswith("table ip netsim_trace_4242 {")


def test_conntrack_lines_say_their_nat():
    e = conntrack.parse_line("node-1", "tcp      6 9 CLOSE src=192.168.100.254 dst=192.168.100.2 sport=5000 dport=30080 "
                                       "src=10.244.2.2 dst=10.244.1.0 sport=8080 dport=23762 mark=0 use=1")
    assert e.original == ("tcp", "192.168.100.254", 5000, "192.168.100.2", 30080)
    assert e.nat == ["DNAT 192.168.100.2:30080 → 10.244.2.2:8080", "SNAT 192.168.100.254:5000 → 10.244.1.0:23762"]
    icmp = conntrack.parse_line("n", "icmp     1 29 src=10.244.1.2 dst=10.244.2.3 type=8 code=0 id=7 "
                                     "src=10.244.2.3 dst=10.244.1.2 type=0 code=0 id=7 mark=0 use=1")
    assert icmp.original == ("icmp", "10.244.1.2", 7, "10.244.2.3", 7) and icmp.nat == []


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_ipvs_entries_of_the_probe_only():
    """ipvsadm -Lnc holds every recent connection of the node; the trace keeps those whose
    client and virtual server are one of the probe's forward 5-tuples."""
    listing = f"""IPVS connection entries
pro expire state       source             virtual            destination
TCP 00:58  SYN_RECV    {CLIENT}:48747   {VIP}:80   {BACKEND}:8080
TCP 01:45  TIME_WAIT   {CLIENT}:42928   {VIP}:80   10.244.2.4:8080
UDP 04:59  UDP         {CLIENT}:48747   {VIP}:80   10.244.2.5:80
TCP 00:45  SYN_RECV    10.244.1.9:48747   {VIP}:80   10.244.3.3:8080
"""
    conns = conntrack.parse_ipvs(listing)
    assert len(conns) == 4 and conns[0].state == "SYN_RECV" and conns[2].proto == "UDP"
    flows = {("tcp", CLIENT, 48747, VIP, 80), ("tcp", CLIENT, 48747, BACKEND, 8080)}   # before and after DNAT
    (mine,) = conntrack.of_flows(conns, flows)
    assert mine.real_server == f"{BACKEND}:8080" and mine.to_dict()["realServer"] == f"{BACKEND}:8080"
    assert mine.text().startswith(f"TCP {CLIENT}:48747 → virtual server {VIP}:80 → real server {BACKEND}:8080")


def test_pcapng_decodes_with_tshark_vxlan_on_8472_included(tmp_path):
    fs = frames()
    steps = walk.assemble(fs, HOPS, 777, "tcp")
    path = tmp_path / "t.pcapng"
    used = sorted({fs[s.frame].hop for s in steps})
    pcapng.write(str(path), [(HOPS[h].label, HOPS[h].role) for h in used],
                 [(used.index(fs[s.frame].hop), fs[s.frame].ts_ns, fs[s.frame].data, fs[s.frame].outgoing,
                   f"step {s.n}") for s in steps])
    out = subprocess.run(["tshark", "-r", str(path), "-d", "udp.port==8472,vxlan", "-T", "fields",
                          "-e", "frame.interface_name", "-e", "vxlan.vni", "-e", "tcp.flags.str", "-e", "frame.comment"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    rows = [line.split("\t") for line in out]
    assert len(rows) == len(steps)
    assert rows[0][0] == "default/client eth0" and rows[0][3] == "step 1"
    vx = [r for r in rows if r[1]]
    assert vx and all(r[1] == "1" and r[0].endswith("eth0") for r in vx)
