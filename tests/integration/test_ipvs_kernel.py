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

from ipvs_lab import Conn, PodServer, ask, inside, iptables_backend, sh
from netsim.proxy.ipvs import IPSET_NAMES, render
from netsim.proxy.ipvs_apply import Backend
from netsim.proxy.model import Endpoint, NodeContext, ServicePort
from netsim.runtime.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.ipvs]      # skipped without ip_vs (tests/conftest.py)

NODE, POD1, POD2, EXT = "iv-k-node", "iv-k-pod1", "iv-k-pod2", "iv-k-ext"
NODE_IP, EXT_IP = "10.250.0.1", "10.250.0.2"
POD_IP = {POD1: "10.244.1.2", POD2: "10.244.1.3"}
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
    for ns in (NODE, POD1, POD2, EXT):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    for i, pod in enumerate((POD1, POD2), 1):
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
    for ns in (POD1, POD2, EXT, NODE):
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
