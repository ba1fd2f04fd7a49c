"""Kernel tests for kube-proxy's IPVS mode (netsim.proxy.ipvs_apply): real traffic, real IPVS.

The node is built by hand (ipvs_lab.py): a "node" namespace with two routed pods and an
external host; ``Backend.sync`` runs inside the node with hand-made ServicePorts. They need
a kernel with IPVS, dummy links and ipset; on one without (this project's host kernel) they
skip, and run in user-mode Linux with ``scripts/test-uml.sh tests/integration/test_ipvs_kernel.py``
(all ``ipvs`` tests in one UML boot).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import pytest

from ipvs_lab import Conn, PodServer, ask, from_port, inside, iptables_backend, sh
from netsim.proxy.ipvs import IPSET_NAMES, render
from netsim.proxy.ipvs_apply import Backend
from netsim.proxy.model import Endpoint, NodeContext, ServicePort
from netsim.runtime.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.ipvs]      # skipped without ip_vs (tests/conftest.py)

NODE, POD1, POD2, EXT = "iv-k-node", "iv-k-pod1", "iv-k-pod2", "iv-k-ext"
CLIENT = "iv-k-client"                                   # a third pod: only a client, serves nothing
NODE_IP, EXT_IP = "10.250.0.1", "10.250.0.2"
POD_IP = {POD1: "10.244.1.2", POD2: "10.244.1.3", CLIENT: "10.244.1.4"}
GATEWAY = "10.244.1.1"
LB_IP = "192.168.250.10"
CTX = NodeContext(NODE, (NODE_IP,), "10.244.0.0/16")


def eps(port: int, *pods: str) -> tuple[Endpoint, ...]:
    return tuple(sorted((Endpoint(POD_IP[p], port, NODE, pod=p) for p in pods), key=lambda e: e.address))


def services(**changes) -> list[ServicePort]:
    ports = {
        "web": ServicePort("default", "web", "", "TCP", 80, "10.96.0.10", node_port=30080,
                           load_balancer_ips=(LB_IP,), endpoints=eps(8080, POD1, POD2)),
        "dns": ServicePort("default", "dns", "", "UDP", 53, "10.96.0.53", endpoints=eps(5353, POD1, POD2)),
        "sticky": ServicePort("default", "sticky", "", "TCP", 80, "10.96.0.20", affinity_timeout=600,
                              endpoints=eps(8080, POD1, POD2)),
        "self": ServicePort("default", "self", "", "TCP", 80, "10.96.0.30", endpoints=eps(8080, POD1)),
    }
    ports.update(changes)
    return [p for p in ports.values() if p is not None]


def build() -> None:
    for ns in (NODE, POD1, POD2, CLIENT, EXT):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    for i, pod in enumerate((POD1, POD2, CLIENT), 1):
        sh("ip", "-n", NODE, "link", "add", f"veth{i}", "type", "veth", "peer", "name", "eth0", "netns", pod)
        sh("ip", "-n", NODE, "addr", "add", f"{GATEWAY}/32", "dev", f"veth{i}")
        sh("ip", "-n", NODE, "link", "set", f"veth{i}", "up")
        sh("ip", "-n", NODE, "route", "add", f"{POD_IP[pod]}/32", "dev", f"veth{i}")
        sh("ip", "-n", pod, "addr", "add", f"{POD_IP[pod]}/32", "dev", "eth0")
        sh("ip", "-n", pod, "link", "set", "eth0", "up")
        sh("ip", "-n", pod, "route", "add", GATEWAY, "dev", "eth0")
        sh("ip", "-n", pod, "route", "add", "default", "via", GATEWAY)
    sh("ip", "-n", NODE, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", EXT)
    sh("ip", "-n", NODE, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    sh("ip", "-n", EXT, "addr", "add", f"{EXT_IP}/24", "dev", "eth0")
    for ns in (NODE, EXT):
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", EXT, "route", "add", f"{LB_IP}/32", "via", NODE_IP)


def destroy() -> None:
    for ns in (POD1, POD2, CLIENT, EXT, NODE):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def lab():
    destroy()
    build()
    servers = [PodServer(POD1, "pod1", 8080, 5353), PodServer(POD2, "pod2", 8080, 5353)]
    with inside(NODE):
        backend = Backend(CTX, iptables_backend(), graceful_period="0.2")
        backend.setup()
        backend.sync(services(), None)
    try:
        yield backend
    finally:
        with inside(NODE):
            backend.cleanup()
        for s in servers:
            s.close()
        destroy()


def sync(backend: Backend, ports, changed=None):
    with inside(NODE):
        return backend.sync(ports, changed)


def ipvsadm(*args: str) -> str:
    return sh("ipvsadm", *args, ns=NODE).stdout


def names(results) -> Counter:
    return Counter(name for name, _ in results)


# -- kernel state ----------------------------------------------------------------------------
def test_kernel_matches_the_rendered_state(lab):
    """ipvsadm -Sn in the node is exactly what the renderer says (order aside)."""
    with inside(NODE):
        want = render(services(), replace(CTX, node_ips=lab.local_addresses()))
    assert sorted(ipvsadm("-Sn").splitlines()) == sorted(want.ipvsadm_text().splitlines())
    listing = ipvsadm("-Ln")
    assert re.search(r"TCP\s+10\.96\.0\.10:80 rr\n\s+-> 10\.244\.1\.2:8080\s+Masq\s+1", listing)
    saved = sh("ipset", "save", ns=NODE).stdout
    for s in want.ipsets:
        for e in s.entries:
            assert f"add {s.name} {e}" in saved


def test_node_holds_service_ips_on_kube_ipvs0(lab):
    link = sh("ip", "-o", "link", "show", "kube-ipvs0", ns=NODE).stdout
    assert "dummy" in sh("ip", "-d", "-o", "link", "show", "kube-ipvs0", ns=NODE).stdout
    assert "state DOWN" in link and ",UP" not in link            # kept down, as kube-proxy leaves it
    addrs = set(re.findall(r"inet (\S+)", sh("ip", "-o", "addr", "show", "dev", "kube-ipvs0", ns=NODE).stdout))
    assert addrs == {"10.96.0.10/32", "10.96.0.53/32", "10.96.0.20/32", "10.96.0.30/32", f"{LB_IP}/32"}
    local = sh("ip", "route", "show", "table", "local", ns=NODE).stdout
    assert "local 10.96.0.10 dev kube-ipvs0" in local              # why IPVS sees the packets (LOCAL_IN)
    assert NODE_IP not in addrs                                    # NodePorts use node addresses, unbound


def test_unchanged_resync_writes_nothing(lab):
    assert sync(lab, services(), set()).written == 0
    result = sync(lab, services(), None)
    with inside(NODE):
        want = render(services(), replace(CTX, node_ips=lab.local_addresses()))
    assert result.written == 0 and result.rules == len(want.virtual_servers) + want.real_server_count
    # each jump from a built-in chain is there exactly once, after several full syncs
    with inside(NODE):
        assert lab.ensure_jumps() == 0
    saved = sh(lab.save, ns=NODE).stdout.splitlines()
    for comment in ("kubernetes service portals", "kubernetes ipvs access filter", "kube-proxy firewall rules"):
        assert sum(1 for line in saved if f'"{comment}"' in line and line.startswith("-A ")) == 2


def test_partial_syncs_track_the_kernel(lab):
    """A partial sync diffs against what the backend last left in the kernel (no dumps): a new
    Service and a removed one each write only their own objects, and the kernel then holds
    exactly what a full render says."""
    extra = ServicePort("default", "extra", "", "TCP", 8081, "10.96.0.81", endpoints=eps(8080, POD1, POD2))
    try:
        added = sync(lab, services(extra=extra), {"default/extratcp"})
        # the virtual server, 2 real servers, kube-ipvs0's address and this Service's ipset members
        assert 4 <= added.written <= 8, added
        with inside(NODE):
            want = render(services(extra=extra), replace(CTX, node_ips=lab.local_addresses()))
        assert sorted(ipvsadm("-Sn").splitlines()) == sorted(want.ipvsadm_text().splitlines())
        assert "10.96.0.81/32" in sh("ip", "-o", "addr", "show", "dev", "kube-ipvs0", ns=NODE).stdout
    finally:
        removed = sync(lab, services(), {"default/extratcp"})
    assert removed.written >= 2                                # the virtual server and its address
    assert "10.96.0.81" not in ipvsadm("-Sn")
    assert "10.96.0.81/32" not in sh("ip", "-o", "addr", "show", "dev", "kube-ipvs0", ns=NODE).stdout


# -- traffic -------------------------------------------------------------------------------------
def test_cluster_ip_tcp_from_a_pod(lab):
    results = [ask(POD2, "10.96.0.10", 80) for _ in range(10)]
    assert names(results) == {"pod1": 5, "pod2": 5}              # rr: strictly alternating
    # pod traffic is not masqueraded, except when it comes back to its sender (hairpin)
    assert {peer for name, peer in results if name == "pod1"} == {POD_IP[POD2]}
    assert {peer for name, peer in results if name == "pod2"} == {GATEWAY}


def test_cluster_ip_udp_from_a_pod(lab):
    results = [ask(POD1, "10.96.0.53", 53, "udp") for _ in range(6)]
    assert set(names(results)) == {"pod1", "pod2"}


def test_cluster_ip_from_the_node_is_masqueraded(lab):
    """From the node the source address would be the VIP itself (it is local, on kube-ipvs0):
    the KUBE-CLUSTER-IP ! -s podCIDR rule marks it and KUBE-POSTROUTING masquerades."""
    name, peer = ask(NODE, "10.96.0.10", 80)
    assert peer == GATEWAY


def test_node_port_from_external(lab):
    results = [ask(EXT, NODE_IP, 30080) for _ in range(4)]
    assert set(names(results)) == {"pod1", "pod2"}
    assert {peer for _, peer in results} == {GATEWAY}             # eTP=Cluster: SNAT to the node


def test_load_balancer_ip_from_external(lab):
    results = [ask(EXT, LB_IP, 80) for _ in range(4)]
    assert set(names(results)) == {"pod1", "pod2"}
    assert {peer for _, peer in results} == {GATEWAY}


def test_hairpin_is_masqueraded(lab):
    """pod1 → a Service whose only endpoint is pod1: KUBE-LOOP-BACK masquerades it."""
    name, peer = ask(POD1, "10.96.0.30", 80)
    assert name == "pod1" and peer == GATEWAY
    assert "add KUBE-LOOP-BACK 10.244.1.2,tcp:8080,10.244.1.2" in sh("ipset", "save", ns=NODE).stdout


def test_session_affinity_is_ipvs_persistence(lab):
    assert re.search(r"TCP\s+10\.96\.0\.20:80 rr persistent 600", ipvsadm("-Ln"))
    results = [ask(POD2, "10.96.0.20", 80) for _ in range(8)]
    assert len(names(results)) == 1


def test_scheduler_choice_is_visible_and_changed_in_place(lab):
    with inside(NODE):
        sh_backend = Backend(CTX, lab.iptables_backend, scheduler="sh")
        sh_backend.sync(services(), None)
    try:
        listing = ipvsadm("-Ln")
        assert re.search(r"TCP\s+10\.96\.0\.10:80 sh\b", listing) and " rr" not in listing
        # source hashing: one client always reaches the same pod
        assert len(names(ask(POD2, "10.96.0.10", 80) for _ in range(6))) == 1
    finally:
        sync(lab, services(), None)
    assert re.search(r"TCP\s+10\.96\.0\.10:80 rr\b", ipvsadm("-Ln"))


def test_cluster_ip_answers_ping(lab):
    """The ClusterIP is a local address of the node in IPVS mode, so ICMP to it is answered
    by the node (in iptables mode nothing answers). Since kube-proxy 1.27 KUBE-IPVS-FILTER
    rejects new traffic to kube-ipvs0 addresses that no Service port matches, so the answer
    is port-unreachable; without that rule (older kube-proxy) it is an echo reply."""
    # earlier tests drew ICMP errors to this pod: lift the node's per-peer ICMP rate limit
    sh("sysctl", "-qw", "net.ipv4.icmp_ratelimit=0", ns=NODE)
    out = sh("ping", "-c", "1", "-W", "2", "10.96.0.10", ns=POD2, check=False).stdout
    assert "From 10.96.0.10" in out and "Port Unreachable" in out, out
    sh(lab.iptables, "-t", "filter", "-D", "KUBE-IPVS-FILTER", "-m", "conntrack", "--ctstate", "NEW",
       "-m", "set", "--match-set", "KUBE-IPVS-IPS", "dst", "-j", "REJECT", ns=NODE)
    try:
        out = sh("ping", "-c", "1", "-W", "2", "10.96.0.10", ns=POD2, check=False).stdout
        assert "1 received" in out and "bytes from 10.96.0.10" in out
    finally:
        sync(lab, services(), None)                             # a full sync puts the rule back


def test_removed_endpoint_drains_then_goes(lab):
    """Graceful termination: a real server with a live connection gets weight 0 and keeps
    serving it; new connections avoid it; it is deleted once the grace ends."""
    held = Conn(POD2, "10.96.0.30", 80)                          # self: only pod1 behind it
    try:
        assert held.ask()[0] == "pod1"
        with inside(NODE):
            lab.grace = 2.0
        sync(lab, services(self=replace(services()[3], endpoints=eps(8080, POD2))), {"default/selftcp"})
        assert re.search(r"-> 10\.244\.1\.2:8080\s+Masq\s+0", ipvsadm("-Ln"))
        assert held.ask()[0] == "pod1"                          # the old connection still works
        assert ask(POD1, "10.96.0.30", 80)[0] == "pod2"          # new ones go to the new endpoint
        wait_for(lambda: "10.244.1.2:8080" not in ipvsadm("-Ln", "-t", "10.96.0.30:80"),
                 "the drained real server 10.244.1.2:8080 to be deleted", timeout=10)
    finally:
        held.close()
        lab.grace = None
        sync(lab, services(), None)


def test_removed_udp_endpoint_goes_at_once(lab):
    sync(lab, services(dns=replace(services()[1], endpoints=eps(5353, POD2))), None)
    try:
        assert "10.244.1.2:5353" not in ipvsadm("-Ln", "-u", "10.96.0.53:53")
    finally:
        sync(lab, services(), None)


def test_removed_service_leaves_no_virtual_server_or_address(lab):
    sync(lab, services(sticky=None), None)
    try:
        assert "10.96.0.20" not in ipvsadm("-Ln")
        assert "10.96.0.20" not in sh("ip", "-o", "addr", "show", "dev", "kube-ipvs0", ns=NODE).stdout
        assert "10.96.0.20" not in sh("ipset", "save", "KUBE-CLUSTER-IP", ns=NODE).stdout
    finally:
        sync(lab, services(), None)


# -- conn_reuse_mode and expire_nodest_conn ----------------------------------------------------
def vs_sysctl(name: str, value: int | None = None) -> int:
    if value is not None:
        sh("sysctl", "-qw", f"net.ipv4.vs.{name}={value}", ns=NODE)
    return int(sh("sysctl", "-n", f"net.ipv4.vs.{name}", ns=NODE).stdout)


@pytest.fixture
def vs_sysctls(lab):
    """Tests change conn_reuse_mode / expire_nodest_conn; put back what kube-proxy leaves
    (1 and 1) and the real servers the tests drained or deleted by hand."""
    yield vs_sysctl
    vs_sysctl("conn_reuse_mode", 1)
    vs_sysctl("expire_nodest_conn", 1)
    sync(lab, services(), None)


def entries_from(sport: int) -> list[str]:
    """ipvsadm -Lnc lines of the client's connections from source port ``sport``."""
    return [l for l in ipvsadm("-Lnc").splitlines() if f"{POD_IP[CLIENT]}:{sport} " in l]


def real_server_of(sport: int) -> str:
    (line,) = entries_from(sport)
    return line.split()[-1]                                       # the Destination column: ip:port


def test_conn_reuse_mode_decides_if_a_reused_source_port_is_scheduled_again(lab, vs_sysctls):
    """A client reuses one source port (each connection closed with an RST, so IPVS keeps
    the old entry in CLOSE for 10 s). conn_reuse_mode=1, the kernel's default that
    kube-proxy leaves alone on kernels >= 5.9: the SYN finds the old entry, IPVS expires it
    and schedules anew, so rr alternates; with vs.conntrack=1 the first SYN is no longer
    dropped (before 5.9 it was: the 1 s connect delays of kubernetes issue 70747, why
    kube-proxy set mode 0 on older kernels).
    conn_reuse_mode=0: the SYN joins the old entry and goes to the same real server."""
    assert vs_sysctl("conn_reuse_mode") == 1 and vs_sysctl("conntrack") == 1
    reused = [from_port(CLIENT, "10.96.0.10", 80, 40001) for _ in range(4)]
    assert [n for n, _ in reused] in (["pod1", "pod2"] * 2, ["pod2", "pod1"] * 2)
    assert all(retrans == 0 for _, retrans in reused)            # no SYN was dropped
    assert len(entries_from(40001)) == 1 and "CLOSE" in entries_from(40001)[0]
    vs_sysctls("conn_reuse_mode", 0)
    reused = [from_port(CLIENT, "10.96.0.10", 80, 40002) for _ in range(4)]
    assert len(set(reused)) == 1 and reused[0][0] in ("pod1", "pod2") and reused[0][1] == 0
    pod = POD1 if reused[0][0] == "pod1" else POD2
    assert real_server_of(40002) == f"{POD_IP[pod]}:8080"
    assert {from_port(CLIENT, "10.96.0.10", 80, 0)[0] for _ in range(2)} == {"pod1", "pod2"}  # fresh ports: rr


def test_conn_reuse_mode_0_and_a_drained_real_server_weight_0(lab, vs_sysctls):
    """With conn_reuse_mode=0 a reused port stays with a real server set to weight 0
    (graceful termination, which then never drains: kubernetes issue 81775) only when
    expire_nodest_conn=0; with kube-proxy's
    expire_nodest_conn=1 the 6.1 kernel reschedules it even in mode 0 (older kernels
    checked weight 0 only when conn_reuse_mode was on)."""
    vs_sysctls("conn_reuse_mode", 0)
    for nodest, sport in ((0, 40010), (1, 40011)):
        vs_sysctls("expire_nodest_conn", nodest)
        first, _ = from_port(CLIENT, "10.96.0.10", 80, sport)
        drained = real_server_of(sport)
        sh("ipvsadm", "-e", "-t", "10.96.0.10:80", "-r", drained, "-m", "-w", "0", ns=NODE)
        again = [from_port(CLIENT, "10.96.0.10", 80, sport)[0] for _ in range(2)]
        if nodest == 0:
            assert again == [first, first]                       # the weight-0 server answers
        else:
            assert first not in again and len(set(again)) == 1    # rescheduled to the other one
        assert from_port(CLIENT, "10.96.0.10", 80, 0)[0] != first  # new ports avoid weight 0 anyway
        sync(lab, services(), None)


def test_expire_nodest_conn_and_a_deleted_real_server(lab, vs_sysctls):
    """A real server deleted while an entry still points at it: expire_nodest_conn=1
    (kube-proxy's) removes its entries at once and the reused port is scheduled anew;
    with 0 and conn_reuse_mode=0 the SYN is dropped while the entry lasts (the client
    retransmits and gets no answer); conn_reuse_mode=1 reschedules the CLOSE entry anyway."""
    cases = [(0, 1, 40020, "rescheduled"), (0, 0, 40021, "dropped"), (1, 0, 40022, "rescheduled")]
    for reuse, nodest, sport, outcome in cases:
        vs_sysctls("conn_reuse_mode", reuse)
        vs_sysctls("expire_nodest_conn", nodest)
        first, _ = from_port(CLIENT, "10.96.0.10", 80, sport)
        gone = real_server_of(sport)
        sh("ipvsadm", "-d", "-t", "10.96.0.10:80", "-r", gone, ns=NODE)
        if nodest:                                               # expired with the server (a kernel work item)
            wait_for(lambda: entries_from(sport) == [], f"the entry of port {sport} to expire", timeout=5)
        name, retrans = from_port(CLIENT, "10.96.0.10", 80, sport, timeout=1.5)
        if outcome == "dropped":
            assert name is None and retrans >= 1 and real_server_of(sport) == gone
        else:
            assert name not in (None, first) and real_server_of(sport) != gone
        sync(lab, services(), None)


def test_cleanup_leaves_nothing(lab):
    with inside(NODE):
        said = lab.cleanup()
    assert "kube-ipvs0" in said and "virtual servers" in said
    assert ipvsadm("-Sn").strip() == ""
    assert sh("ip", "link", "show", "kube-ipvs0", ns=NODE, check=False).returncode != 0
    left = set(sh("ipset", "list", "-n", ns=NODE).stdout.split())
    assert not left & set(IPSET_NAMES)
    for table in ("nat", "filter"):
        saved = sh(lab.save, "-t", table, ns=NODE).stdout
        assert "KUBE-" not in saved, saved
    with inside(NODE):
        assert lab.cleanup() == "nothing"                        # idempotent
        lab.sync(services(), None)                               # and the node can be set up again
    assert "10.96.0.10:80" in ipvsadm("-Ln")
