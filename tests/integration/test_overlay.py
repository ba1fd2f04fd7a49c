"""Kernel tests for the flannel-style overlay: VXLAN and host-gw programming, the subnet
registry (embedded and a real etcd), lease expiry and renewal, live node changes.

Every lab is brought up with the real CLI and torn down whatever happens; each one must
leave the machine as it found it. Nothing here sleeps to wait for readiness: conditions
are polled against a deadline.
"""
from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from labs import lab_netns, machine_snapshot, netsim, status

pytestmark = pytest.mark.root

PID = os.getpid() % 10000
ETCDCTL = "/usr/bin/etcdctl"
SUBNETS = "/coreos.com/network/subnets/"
CONFIG = "/coreos.com/network/config"


# -- helpers -------------------------------------------------------------------------

def overlay_topology(tmp: Path, name: str, nodes: int = 3, cluster: dict | None = None,
                     pods_per_node: int = 1, external: bool = False) -> Path:
    """A lab of ``nodes`` nodes (n1, n2, ...), ``pods_per_node`` web pods on each (TCP 8080,
    UDP 5000) and optionally one external host. JSON is YAML, so it is written as JSON."""
    topo: dict = {"name": name, "cluster": cluster or {}, "nodes": [f"n{i + 1}" for i in range(nodes)]}
    if external:
        topo["externals"] = [{"name": "ext"}]
    if pods_per_node:
        topo["manifests"] = [{
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": pods_per_node * nodes, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
                         "name": "web", "ports": [{"containerPort": 8080, "name": "http"},
                                                  {"containerPort": 5000, "protocol": "UDP", "name": "udp"}]}]}}}}]
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(topo, indent=1))
    return path


class Labs:
    """Brings labs up for one test (or module); ``close`` takes them down and checks that
    each left the machine exactly as before."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.made: list[tuple[str, dict]] = []
        self.children: list[int] = []        # agents this test process started itself

    def up(self, suffix: str, timeout: float = 60, **topology) -> str:
        lab = f"t{PID}{suffix}"
        self.made.append((lab, machine_snapshot(lab)))
        netsim("up", str(overlay_topology(self.tmp, lab, **topology)), "--timeout", str(timeout))
        return lab

    def close(self) -> None:
        for lab, _ in self.made:
            netsim("down", lab, check=False)
        for pid in self.children:            # reap our own children so no zombie lingers
            until(lambda: _reaped(pid), f"agent {pid} started by this test to exit", 10)
        for lab, before in self.made:
            assert machine_snapshot(lab) == before, f"up + down of {lab} must leave the machine as it was"


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


@pytest.fixture
def labs(tmp_path):
    made = Labs(tmp_path)
    try:
        yield made
    finally:
        made.close()


def until(condition, what: str, timeout: float, interval: float = 0.02):
    """Poll ``condition`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)


def sh(netns: str, *cmd: str, check: bool = True) -> str:
    done = subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} in {netns} exited {done.returncode}: {done.stderr}")
    return done.stdout


def node_ns(lab: str, node: str) -> str:
    return f"netsim.{lab}.node.{node}"


def net_of(subnet: str) -> str:
    return subnet.split("/")[0]


def link_json(netns: str, dev: str, stats: bool = False) -> dict:
    return json.loads(sh(netns, "ip", *(["-s"] if stats else []), "-d", "-j", "link", "show", dev))[0]


def ping(netns: str, ip: str, count: int = 1) -> bool:
    done = subprocess.run(["ip", "netns", "exec", netns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                           "-W", "1", ip], capture_output=True, text=True, timeout=30)
    return done.returncode == 0


def selftest_ok(lab: str) -> list[dict]:
    done = netsim("selftest", lab, "-o", "json", check=False)
    checks = json.loads(done.stdout)
    failed = [c for c in checks if not c["ok"]]
    assert done.returncode == 0 and not failed and checks, failed or done.stderr
    return checks


def registry_kvs(lab: str, prefix: str = "/coreos.com/network/") -> dict[str, str]:
    """``netsim registry get --prefix``: etcdctl-style key and value lines."""
    lines = netsim("registry", "get", "--lab", lab, "--prefix", prefix).stdout.splitlines()
    assert len(lines) % 2 == 0, lines
    return dict(zip(lines[::2], lines[1::2]))


def subnet_key(subnet: str) -> str:
    return SUBNETS + subnet.replace("/", "-")


def flannel_status(lab: str, node: str) -> dict:
    try:
        return json.loads(Path(f"/run/netsim/{lab}/flannel/{node}/status.json").read_text())
    except (OSError, ValueError):
        return {}


def subnet_env(lab: str, node: str) -> dict[str, str]:
    text = Path(f"/run/netsim/{lab}/flannel/{node}/subnet.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def flannel_process(lab: str, node: str) -> dict:
    """The live flannel agent of ``node`` from state.json (the last record is the current one)."""
    st = json.loads(Path(f"/run/netsim/{lab}/state.json").read_text())
    procs = [p for p in st["processes"] if p["role"] == "flannel" and p["netns"] == node_ns(lab, node)]
    assert procs, f"no flannel agent recorded for {node}"
    return procs[-1]


def pid_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def vxlan_view(netns: str) -> dict[str, str]:
    return {"routes": sh(netns, "ip", "-4", "route", "show"),
            "neigh": sh(netns, "ip", "neigh", "show", "dev", "flannel.1"),
            "fdb": sh(netns, "bridge", "fdb", "show", "dev", "flannel.1")}


def has_peer(view: dict[str, str], subnet: str, mac: str | None = None) -> dict[str, bool]:
    """Which of the route, neighbour and FDB entry for a vxlan peer are present."""
    net = net_of(subnet)
    return {"route": re.search(rf"^{re.escape(subnet)} via {re.escape(net)} dev flannel\.1 .*onlink",
                               view["routes"], re.M) is not None,
            "neigh": re.search(rf"^{re.escape(net)} lladdr ", view["neigh"], re.M) is not None,
            "fdb": bool(mac) and mac in view["fdb"]}


class Deletions:
    """Route and neighbour/FDB deletions in some namespaces, from rtnetlink multicast.

    The subscription is made by ``bind`` before this returns, so no change made after
    construction can be missed (unlike sampling ``ip route`` now and then)."""

    GROUPS = 0x4 | 0x40                        # RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE

    def __init__(self, namespaces: list[str]):
        from netsim.apply import netns
        self.socks = {}
        self.seen: list[tuple[str, str, str | None, str | None]] = []   # (netns, event, dst, lladdr)
        for ns in namespaces:
            sock = netns.socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, self.GROUPS))
            self.socks[ns] = sock

    def of(self, subnet: str, mac: str) -> list[tuple[str, str, str | None, str | None]]:
        """Deletions (so far) of the route to ``subnet``, its gateway neighbour or ``mac``'s FDB entry."""
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl
        marshal = MarshalRtnl()
        for ns, sock in self.socks.items():
            while select.select([sock], [], [], 0)[0]:
                for msg in marshal.parse(sock.recv(1 << 16)):
                    event = msg["event"]
                    if event == "RTM_DELROUTE":
                        dst = msg.get_attr("RTA_DST")
                        self.seen.append((ns, event, f"{dst}/{msg['dst_len']}" if dst else None, None))
                    elif event == "RTM_DELNEIGH":
                        self.seen.append((ns, event, msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")))
        return [e for e in self.seen if e[2] in (subnet, net_of(subnet)) or e[3] == mac]

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


# -- a shared 3-node VXLAN lab -----------------------------------------------------------

@pytest.fixture(scope="module")
def vxlan_lab(tmp_path_factory):
    made = Labs(tmp_path_factory.mktemp("vxlan"))
    try:
        lab = made.up("vx", nodes=3, pods_per_node=2, external=True, cluster={"overlay": "vxlan"})
        yield lab, status(lab)
    finally:
        made.close()


def test_vxlan_three_nodes_traffic_and_kernel_state(vxlan_lab):
    lab, st = vxlan_lab
    nodes = {n["name"]: n for n in st["nodes"]}
    pod_ip = {f"{p['namespace']}/{p['name']}": p["ip"] for p in st["pods"]}
    pod_node = {f"{p['namespace']}/{p['name']}": p["node"] for p in st["pods"]}

    # Real traffic: every cross-node path, without NAT; pod→outside masqueraded to the node.
    checks = selftest_ok(lab)
    for proto in ("ICMP", "TCP", "UDP"):
        name = (f"cross-node pod→pod {proto} (vxlan)" if proto == "ICMP"
                else f"cross-node pod→pod {proto}, no NAT (vxlan)")
        cross = [c for c in checks if c["name"] == name]
        assert len(cross) == 6, (name, [c["name"] for c in checks])     # 3 nodes × 2 others
        if proto != "ICMP":
            for c in cross:
                assert c["got"] == f"source {pod_ip[c['source']]}", c   # the client pod's own IP
    masq = [c for c in checks if c["name"] == "pod→external, masqueraded"]
    assert len(masq) == 3
    for c in masq:
        assert c["got"] == f"source {nodes[pod_node[c['source']]]['address']}", c

    # What the agents programmed, node by node.
    macs = {name: link_json(n["netns"], "flannel.1")["address"] for name, n in nodes.items()}
    for name, n in nodes.items():
        ns, own = n["netns"], n["podSubnet"]
        link = sh(ns, "ip", "-d", "link", "show", "flannel.1")
        for want in ("vxlan id 1 ", "dstport 8472", "nolearning", "mtu 1450", f"local {n['address']} dev eth0"):
            assert want in link, (name, want, link)
        assert re.search(rf"inet {re.escape(net_of(own))}/32 ", sh(ns, "ip", "-4", "-o", "addr", "show", "flannel.1"))
        assert link_json(ns, "cni0")["mtu"] == 1450
        view = vxlan_view(ns)
        peers = [p for p in nodes.values() if p["name"] != name]
        neigh = {l.strip() for l in view["neigh"].splitlines() if l.strip()}
        fdb = {l.strip() for l in view["fdb"].splitlines() if l.strip()}
        assert neigh == {f"{net_of(p['podSubnet'])} lladdr {macs[p['name']]} PERMANENT" for p in peers}, view["neigh"]
        assert fdb == {f"{macs[p['name']]} dst {p['address']} self permanent" for p in peers}, view["fdb"]
        for p in peers:
            assert re.search(rf"^{re.escape(p['podSubnet'])} via {re.escape(net_of(p['podSubnet']))} "
                             r"dev flannel\.1 .*onlink", view["routes"], re.M), view["routes"]
        assert subnet_env(lab, name) == {"FLANNEL_NETWORK": "10.244.0.0/16",
                                         "FLANNEL_SUBNET": f"{net_of(own)[:-1]}1/24",
                                         "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "true"}
    for p in st["pods"]:
        assert link_json(p["netns"], "eth0")["mtu"] == 1450

    # The registry holds flannel's own layout and JSON, with each node's real VtepMAC.
    kvs = registry_kvs(lab)
    config = json.loads(kvs.pop(CONFIG))
    assert config["Network"] == "10.244.0.0/16" and config["Backend"] == {"Type": "vxlan", "VNI": 1}
    assert set(kvs) == {subnet_key(n["podSubnet"]) for n in nodes.values()}
    assert all(re.fullmatch(r"/coreos\.com/network/subnets/\d+\.\d+\.\d+\.\d+-24", k) for k in kvs)
    for name, n in nodes.items():
        assert json.loads(kvs[subnet_key(n["podSubnet"])]) == {
            "PublicIP": n["address"], "PublicIPv6": None, "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": macs[name]}}


def test_underlay_carries_vxlan_udp_8472_vni_1(vxlan_lab, tmp_path):
    from scapy.all import IP, UDP, VXLAN, ICMP, rdpcap
    lab, st = vxlan_lab
    nodes = {n["name"]: n for n in st["nodes"]}
    client = next(p for p in st["pods"] if p["node"] == "n1")
    server = next(p for p in st["pods"] if p["node"] == "n2")
    pcap, err = tmp_path / "underlay.pcap", tmp_path / "tcpdump.err"
    with open(err, "w") as errf:
        # -c 4: two echo requests in, two replies out, all on n2's underlay interface.
        proc = subprocess.Popen(["ip", "netns", "exec", nodes["n2"]["netns"], "tcpdump", "-i", "eth0", "-n",
                                 "-U", "-Z", "root", "-c", "4", "-w", str(pcap), "udp", "port", "8472"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
    try:
        until(lambda: "listening on" in err.read_text() or proc.poll() is not None, "tcpdump to listen", 10)
        assert proc.poll() is None, err.read_text()
        assert ping(client["netns"], server["ip"], count=2)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    packets = rdpcap(str(pcap))
    assert len(packets) == 4, err.read_text()
    underlay = {nodes["n1"]["address"], nodes["n2"]["address"]}
    pods = {client["ip"], server["ip"]}
    directions = set()
    for pkt in packets:
        assert pkt.haslayer(IP) and pkt.haslayer(UDP)
        assert {pkt[IP].src, pkt[IP].dst} == underlay                  # outer: node to node
        assert pkt[UDP].dport == 8472
        vx = pkt[VXLAN] if pkt.haslayer(VXLAN) else VXLAN(bytes(pkt[UDP].payload))
        assert vx.vni == 1
        inner = vx[IP]
        assert {inner.src, inner.dst} == pods and inner.haslayer(ICMP)  # inner: pod to pod, no NAT
        directions.add((pkt[IP].src, inner.src, inner.dst))
    assert directions == {(nodes["n1"]["address"], client["ip"], server["ip"]),
                          (nodes["n2"]["address"], server["ip"], client["ip"])}


def test_host_gw_three_nodes(labs):
    lab = labs.up("hg", nodes=3, pods_per_node=1, external=True, cluster={"overlay": "host-gw"})
    st = status(lab)
    checks = selftest_ok(lab)
    assert len([c for c in checks if c["name"] == "cross-node pod→pod TCP, no NAT (host-gw)"]) == 6
    for n in st["nodes"]:
        ns = n["netns"]
        assert subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", "flannel.1"],
                              capture_output=True).returncode != 0, "host-gw must not create flannel.1"
        routes = sh(ns, "ip", "-4", "route", "show")
        for p in st["nodes"]:
            if p is not n:
                assert re.search(rf"^{re.escape(p['podSubnet'])} via {re.escape(p['address'])} dev eth0 ",
                                 routes, re.M), routes
        assert link_json(ns, "cni0")["mtu"] == 1500
        assert subnet_env(lab, n["name"])["FLANNEL_MTU"] == "1500"
    kvs = registry_kvs(lab, SUBNETS)
    assert {json.loads(v)["BackendType"] for v in kvs.values()} == {"host-gw"} and len(kvs) == 3


def test_vxlan_direct_routing_uses_plain_routes(labs):
    lab = labs.up("dr", nodes=3, pods_per_node=1, cluster={"overlay": "vxlan", "directRouting": True})
    st = status(lab)
    assert json.loads(registry_kvs(lab, CONFIG)[CONFIG])["Backend"]["DirectRouting"] is True
    selftest_ok(lab)
    for n in st["nodes"]:
        ns = n["netns"]
        view = vxlan_view(ns)
        for p in st["nodes"]:
            if p is not n:
                assert re.search(rf"^{re.escape(p['podSubnet'])} via {re.escape(p['address'])} dev eth0 ",
                                 view["routes"], re.M), view["routes"]
        assert "flannel.1" not in view["routes"]
        assert view["neigh"].strip() == "" and view["fdb"].strip() == "", view
        assert {v["mode"] for v in flannel_status(lab, n["name"])["peers"].values()} == {"direct"}
        # Nothing was encapsulated: the cross-node traffic of the selftest bypassed the VTEP.
        assert link_json(ns, "flannel.1", stats=True)["stats64"]["tx"]["packets"] == 0


def test_real_etcd_registry_survives_an_outage(labs):
    if not os.access(ETCDCTL, os.X_OK):
        pytest.skip("etcdctl (etcd-client) not installed")
    lab = labs.up("etcd", nodes=3, pods_per_node=1, cluster={"registry": "etcd"})
    endpoint = f"--endpoints=unix:///run/netsim/{lab}/etcd/etcd.sock:0"

    def etcdctl(*args: str) -> str:
        return subprocess.run([ETCDCTL, endpoint, *args], env={**os.environ, "ETCDCTL_API": "3"},
                              capture_output=True, text=True, timeout=10, check=True).stdout

    def leases() -> dict[str, str]:
        """Subnet key → lease id (hex, as etcdctl takes it)."""
        kvs = json.loads(etcdctl("get", "--prefix", SUBNETS, "-w", "json")).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): format(int(kv["lease"]), "x") for kv in kvs}

    st = status(lab)
    lines = etcdctl("get", "--prefix", "/coreos.com/network/").splitlines()
    got = dict(zip(lines[::2], lines[1::2]))
    assert json.loads(got.pop(CONFIG))["Network"] == "10.244.0.0/16"
    assert set(got) == {subnet_key(n["podSubnet"]) for n in st["nodes"]}
    assert {json.loads(v)["PublicIP"] for v in got.values()} == {n["address"] for n in st["nodes"]}
    for key, lease in leases().items():
        ttl = etcdctl("lease", "timetolive", "--keys", lease)
        assert "granted with TTL(86400s)" in ttl and key in ttl, ttl

    # etcd down: the data plane stays as programmed.
    etcd_pid = next(p["pid"] for p in json.loads(Path(f"/run/netsim/{lab}/state.json").read_text())["processes"]
                    if p["role"] == "etcd")
    assert "stopped" in netsim("registry", "stop", "--lab", lab).stdout
    assert not pid_running(etcd_pid)
    selftest_ok(lab)
    assert all(pid_running(flannel_process(lab, n["name"])["pid"]) for n in st["nodes"])

    # etcd back: the agents resume watching; a new node is programmed by every peer.
    assert "started again" in netsim("registry", "start", "--lab", lab).stdout
    out = netsim("node", "add", "n4", "--lab", lab).stdout
    assert "node n4 joined" in out
    st = status(lab)
    n4 = next(n for n in st["nodes"] if n["name"] == "n4")
    for n in st["nodes"]:
        if n["name"] != "n4":
            assert has_peer(vxlan_view(n["netns"]), n4["podSubnet"])["route"]
    # Exactly one lease per node: none lost, none duplicated.
    held = leases()
    assert set(held) == {subnet_key(n["podSubnet"]) for n in st["nodes"]}
    assert len(set(held.values())) == 4
    listed = etcdctl("lease", "list").split("\n", 1)
    assert listed[0] == "found 4 leases" and sorted(listed[1].split()) == sorted(held.values()), listed
    values = [json.loads(etcdctl("get", k, "--print-value-only")) for k in held]
    assert sorted(v["PublicIP"] for v in values) == sorted(n["address"] for n in st["nodes"])
    selftest_ok(lab)


def restart_flannel(lab: str, node: str, labs_: Labs) -> int:
    """Start ``node``'s agent again as netsim does, from this process; returns its PID."""
    from netsim.apply import labstate
    from netsim.apply.lab import registry_url, start_flannel
    plan, st = labstate.load_plan(lab), labstate.LabState.load(lab)
    proc = start_flannel(plan, node, registry_url(lab), st)
    st.save()
    labs_.children.append(proc.pid)
    return proc.pid


def kill_agent(lab: str, node: str) -> None:
    """SIGKILL ``node``'s flannel agent and wait until it is dead (a zombie counts)."""
    pid = flannel_process(lab, node)["pid"]
    os.kill(pid, signal.SIGKILL)
    until(lambda: not pid_running(pid), f"{node}'s agent {pid} to die", 5, interval=0.005)


def test_killed_agent_lease_expires_and_restart_takes_back_its_subnet(labs):
    from netsim.apply.lab import registry_url
    from netsim.registry import open_registry
    ttl = 4
    lab = labs.up("ttl", nodes=3, pods_per_node=1, cluster={"leaseTTL": ttl, "renewMargin": 2})
    st = status(lab)
    nodes = {n["name"]: n for n in st["nodes"]}
    pod = {p["node"]: p for p in st["pods"]}
    macs = {name: link_json(n["netns"], "flannel.1")["address"] for name, n in nodes.items()}
    reg = open_registry(registry_url(lab))
    try:
        # 1. Restarted before its lease expires: it reuses its own lease (same key, same
        #    subnet; the key is never deleted, so peers keep the route throughout).
        n3 = nodes["n3"]
        key3 = subnet_key(n3["podSubnet"])
        before = reg.get(key3)
        watch = Deletions([nodes["n1"]["netns"], nodes["n2"]["netns"]])
        kill_agent(lab, "n3")
        pid3 = restart_flannel(lab, "n3", labs)
        until(lambda: Path(f"/run/netsim/{lab}/flannel/n3/ready").exists(), "n3's agent to be ready", 10)
        after = reg.get(key3)
        assert after is not None and after.create_revision == before.create_revision, (before, after)
        assert after.lease != before.lease            # a fresh registry lease on the same key
        assert flannel_status(lab, "n3")["subnet"] == n3["podSubnet"]
        assert [k.key for k in reg.range(SUBNETS) if json.loads(k.value)["PublicIP"] == n3["address"]] == [key3]
        for peer in ("n1", "n2"):
            assert has_peer(vxlan_view(nodes[peer]["netns"]), n3["podSubnet"], macs["n3"]) == \
                {"route": True, "neigh": True, "fdb": True}
        assert watch.of(n3["podSubnet"], macs["n3"]) == [], "a peer dropped n3 while it restarted"
        watch.close()
        assert pid_running(pid3)
        assert {n["name"]: n["flannel"]["alive"] for n in status(lab)["nodes"]} == {"n1": True, "n2": True, "n3": True}

        # 2. Killed for good: peers keep its route while the lease lives ...
        n2 = nodes["n2"]
        key2 = subnet_key(n2["podSubnet"])
        watch = Deletions([nodes["n1"]["netns"], nodes["n3"]["netns"]])
        kill_agent(lab, "n2")
        killed = time.monotonic()
        for peer in ("n1", "n3"):
            assert all(has_peer(vxlan_view(nodes[peer]["netns"]), n2["podSubnet"], macs["n2"]).values())
        assert ping(pod["n1"]["netns"], pod["n2"]["ip"])
        assert reg.get(key2) is not None
        assert watch.of(n2["podSubnet"], macs["n2"]) == []
        # ... and remove route, neighbour and FDB entry once it has expired.
        until(lambda: not any(any(has_peer(vxlan_view(nodes[p]["netns"]), n2["podSubnet"], macs["n2"]).values())
                              for p in ("n1", "n3")), "peers to drop n2 after its lease expired", ttl + 4)
        removed_after = time.monotonic() - killed
        print(f"n2's route removed {removed_after:.2f}s after SIGKILL (leaseTTL {ttl}s)")
        assert reg.get(key2) is None
        assert removed_after <= ttl + 2
        gone = watch.of(n2["podSubnet"], macs["n2"])
        watch.close()
        for peer in ("n1", "n3"):                     # route, neighbour and FDB entry: 3 deletions
            assert sorted(e[1] for e in gone if e[0] == nodes[peer]["netns"]) == \
                ["RTM_DELNEIGH", "RTM_DELNEIGH", "RTM_DELROUTE"], gone
        assert not ping(pod["n1"]["netns"], pod["n2"]["ip"])

        # 3. Restarted after expiry: it takes the subnet from its subnet.env back.
        pid2 = restart_flannel(lab, "n2", labs)
        until(lambda: reg.get(key2), "n2 to lease its subnet again", 10)
        assert json.loads(reg.get(key2).value)["PublicIP"] == n2["address"]
        assert subnet_env(lab, "n2")["FLANNEL_SUBNET"] == f"{net_of(n2['podSubnet'])[:-1]}1/24"
        until(lambda: all(all(has_peer(vxlan_view(nodes[p]["netns"]), n2["podSubnet"], macs["n2"]).values())
                          for p in ("n1", "n3")), "peers to program n2 again", 10)
        assert ping(pod["n1"]["netns"], pod["n2"]["ip"])
        assert pid_running(pid2)
        assert {n["name"]: n["flannel"]["alive"] for n in status(lab)["nodes"]} == {"n1": True, "n2": True, "n3": True}, \
            Path(f"/run/netsim/{lab}/state.json").read_text()
        selftest_ok(lab)
    finally:
        reg.close()


def test_lease_renewal_keeps_routes(labs):
    from netsim.apply.lab import registry_url
    from netsim.registry import open_registry
    lab = labs.up("rnw", nodes=3, pods_per_node=0, cluster={"leaseTTL": 4, "renewMargin": 2})
    st = status(lab)
    n2 = next(n for n in st["nodes"] if n["name"] == "n2")
    key = subnet_key(n2["podSubnet"])
    peers = [n for n in st["nodes"] if n["name"] != "n2"]
    mac = link_json(n2["netns"], "flannel.1")["address"]
    reg = open_registry(registry_url(lab))
    watch = Deletions([p["netns"] for p in peers])
    ids, samples = set(), 0
    try:
        end = time.monotonic() + 6
        while time.monotonic() < end:
            kv = reg.get(key)
            assert kv is not None, "n2's lease key vanished while its agent renews it"
            ids.add(kv.lease)
            for p in peers:
                assert re.search(rf"^{re.escape(n2['podSubnet'])} via ", sh(p["netns"], "ip", "-4", "route", "show",
                                                                           n2["podSubnet"]), re.M), p["name"]
            samples += 1
            time.sleep(0.05)
        assert watch.of(n2["podSubnet"], mac) == [], "a peer dropped n2's entries during a renewal"
    finally:
        reg.close()
        watch.close()
    print(f"{len(ids)} registry leases seen for {key} over 6 s ({samples} samples)")
    assert len(ids) >= 3, ids                 # renewed about every 2 s: a fresh lease each time
    assert "renewed lease" in Path(f"/run/netsim/{lab}/logs/flannel-n2.log").read_text()


def test_node_add_and_remove(labs):
    lab = labs.up("nod", nodes=3, pods_per_node=1)
    out = netsim("node", "add", "n4", "--lab", lab).stdout
    # The convergence figure: from n4's lease to the last peer (and n4 itself) programmed.
    m = re.search(r"node n4 joined lab \S+: 192\.168\.100\.5, subnet (\S+); .*\bconverged\b.* (\d+) ms after "
                  r"its lease", out)
    assert m, out
    print(f"node add convergence: {m[2]} ms")
    st = status(lab)
    nodes = {n["name"]: n for n in st["nodes"]}
    n4 = nodes["n4"]
    assert n4["podSubnet"] == m[1] == "10.244.4.0/24"
    mac4 = link_json(n4["netns"], "flannel.1")["address"]
    for name, n in nodes.items():
        if name != "n4":
            assert all(has_peer(vxlan_view(n["netns"]), n4["podSubnet"], mac4).values()), name
            assert has_peer(vxlan_view(n4["netns"]), n["podSubnet"])["route"], name
    for p in st["pods"]:                      # every pod reaches n4 (its cni0 address) over the overlay
        assert ping(p["netns"], n4["bridge"]), p["name"]

    n2 = nodes["n2"]
    mac2 = link_json(n2["netns"], "flannel.1")["address"]
    n2_pids = [p["pid"] for p in json.loads(Path(f"/run/netsim/{lab}/state.json").read_text())["processes"]
               if p["netns"] == n2["netns"]]
    out = netsim("node", "remove", "n2", "--lab", lab).stdout
    m = re.search(r"node n2 removed from lab \S+; every peer unprogrammed 10\.244\.2\.0/24 (\d+) ms", out)
    assert m, out
    print(f"node remove convergence: {m[1]} ms")
    for name in ("n1", "n3", "n4"):
        assert not any(has_peer(vxlan_view(nodes[name]["netns"]), n2["podSubnet"], mac2).values()), name
    assert n2["netns"] not in lab_netns(lab)
    assert n2_pids and not any(pid_running(pid) for pid in n2_pids)
    assert subnet_key(n2["podSubnet"]) not in registry_kvs(lab, SUBNETS)
    after = status(lab)
    assert [n["name"] for n in after["nodes"]] == ["n1", "n3", "n4"]
    # n2's pods are gone from it: the Deployment's replica was rescheduled onto a live node,
    # with an address from that node's subnet; nothing holds an address of n2's subnet.
    subnets = {n["name"]: n["podSubnet"] for n in after["nodes"]}
    assert len(after["pods"]) == len(st["pods"])
    for p in after["pods"]:
        assert p["node"] != "n2" and p["present"]
        assert p["ip"].rsplit(".", 1)[0] == net_of(subnets[p["node"]]).rsplit(".", 1)[0], p
    assert set(lab_netns(lab)) == {f"netsim.{lab}.underlay"} | {n["netns"] for n in after["nodes"]} | {
        p["netns"] for p in after["pods"]}
    checks = selftest_ok(lab)
    with_pods = len({p["node"] for p in after["pods"]})
    assert len([c for c in checks if c["name"] == "cross-node pod→pod ICMP (vxlan)"]) == with_pods * (with_pods - 1)


def test_twenty_nodes_lease_distinct_subnets(labs):
    count = 20
    lab = labs.up("twenty", nodes=count, pods_per_node=0, timeout=90)
    st = status(lab)
    assert len(st["nodes"]) == count
    kvs = registry_kvs(lab, SUBNETS)
    assert len(kvs) == count
    by_ip = {json.loads(v)["PublicIP"]: k for k, v in kvs.items()}
    assert len(by_ip) == count and len(set(by_ip.values())) == count
    for n in st["nodes"]:
        key = by_ip[n["address"]]
        subnet = key[len(SUBNETS):].replace("-", "/")
        env = subnet_env(lab, n["name"])
        assert env["FLANNEL_SUBNET"] == f"{net_of(subnet)[:-1]}1/24", (n["name"], env, key)
        assert n["podSubnet"] == subnet
    # Every agent ends up with the other 19 as peers.
    until(lambda: all(len(flannel_status(lab, n["name"]).get("peers", {})) == count - 1 for n in st["nodes"]),
          "every node to program its 19 peers", 20, interval=0.1)


def test_pool_exhausted_node_add_fails_cleanly(labs):
    lab = labs.up("full", nodes=3, pods_per_node=1, cluster={"podCIDR": "10.244.0.0/22", "nodeSubnetLength": 24})
    before = sorted(lab_netns(lab))
    t0 = time.monotonic()
    done = netsim("node", "add", "n4", "--lab", lab, check=False)
    took = time.monotonic() - t0
    assert done.returncode == 1, done
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert err.startswith("netsim: error:") and "out of subnets" in err
    assert "Network 10.244.0.0/22" in err and "SubnetLen 24" in err, err
    assert took < 15, f"node add took {took:.1f}s to fail"
    assert sorted(lab_netns(lab)) == before
    assert node_ns(lab, "n4") not in lab_netns(lab)
    state = json.loads(Path(f"/run/netsim/{lab}/state.json").read_text())
    assert not [p for p in state["processes"] if p["netns"] == node_ns(lab, "n4")]
    assert node_ns(lab, "n4") not in state["netns"]
    assert not any(b"netsim.agents.flannel" in Path(f"/proc/{p}/cmdline").read_bytes()
                   and f"/run/netsim/{lab}/flannel/n4/".encode() in Path(f"/proc/{p}/cmdline").read_bytes()
                   for p in os.listdir("/proc") if p.isdigit() and Path(f"/proc/{p}/cmdline").exists())
    # The kernel destroys an unpinned namespace (and so the veth pair) asynchronously.
    until(lambda: "n4-eth0" not in sh(f"netsim.{lab}.underlay", "ip", "-o", "link"),
          "n4's underlay port to go with its namespace", 5)
    assert [n["name"] for n in status(lab)["nodes"]] == ["n1", "n2", "n3"]
    assert len(registry_kvs(lab, SUBNETS)) == 3
    selftest_ok(lab)


def test_corrupt_lease_is_skipped(labs):
    lab = labs.up("bad", nodes=3, pods_per_node=1)
    key = SUBNETS + "10.244.200.0-24"
    assert netsim("registry", "put", "--lab", lab, key, "not json").stdout.strip() == "OK"
    names = ["n1", "n2", "n3"]
    until(lambda: all("10.244.200.0/24" in flannel_status(lab, n).get("skipped", {}) for n in names),
          "every agent to skip the corrupt lease", 10)
    for n in names:
        assert f"skipping corrupt lease {key}" in Path(f"/run/netsim/{lab}/logs/flannel-{n}.log").read_text()
        assert pid_running(flannel_process(lab, n)["pid"])
        assert "10.244.200.0" not in sh(node_ns(lab, n), "ip", "-4", "route", "show")
    # A valid change afterwards is still programmed everywhere.
    assert "node n4 joined" in netsim("node", "add", "n4", "--lab", lab).stdout
    n4 = next(n for n in status(lab)["nodes"] if n["name"] == "n4")
    assert n4["podSubnet"] != "10.244.200.0/24"
    for n in names:
        assert has_peer(vxlan_view(node_ns(lab, n)), n4["podSubnet"])["route"]
        assert pid_running(flannel_process(lab, n)["pid"])
    # Deleting the bad key clears it from every agent's skipped list.
    netsim("registry", "delete", "--lab", lab, key)
    until(lambda: not any(flannel_status(lab, n).get("skipped") for n in names + ["n4"]),
          "agents to forget the deleted corrupt lease", 10)
    selftest_ok(lab)


def test_flannel_rules_are_kept(vxlan_lab):
    lab, _ = vxlan_lab
    """Like flanneld's --iptables-resync: rules someone deleted come back within seconds."""
    ns = node_ns(lab, "n1")
    before = sorted(l for l in sh(ns, "iptables-nft-save").splitlines() if "flanneld" in l)
    assert len(before) == 10            # 2 jumps, 6 FLANNEL-POSTRTG rules, 2 FLANNEL-FWD rules
    sh(ns, "iptables-nft", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    sh(ns, "iptables-nft", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment",
       "flanneld forward", "-j", "FLANNEL-FWD")
    until(lambda: sorted(l for l in sh(ns, "iptables-nft-save").splitlines() if "flanneld" in l) == before,
          "flannel's rules to be re-applied", timeout=12)
