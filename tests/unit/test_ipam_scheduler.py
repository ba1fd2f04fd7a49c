"""host-local style IPAM, node subnets, underlay addresses and the deterministic scheduler."""
from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address as A, IPv4Network as N

import pytest

from netsim.plan.ipam import HostLocal, PoolExhausted, node_subnet, underlay_addresses
from netsim.plan.scheduler import pod_key, schedule
from netsim.topology.model import NodeSpec, Pod


# -- HostLocal -------------------------------------------------------------------

def test_range_skips_network_gateway_and_broadcast():
    pool = HostLocal(N("10.244.1.0/24"))
    assert (pool.gateway, pool.first, pool.last_host) == (A("10.244.1.1"), A("10.244.1.2"), A("10.244.1.254"))
    assert pool.capacity == 253
    assert HostLocal(N("10.244.1.0/29")).capacity == 5          # .2 .. .6
    assert HostLocal(N("10.244.1.0/30")).capacity == 1          # .2 only


def test_allocates_in_order_from_dot_2():
    pool = HostLocal(N("10.244.1.0/24"))
    assert [pool.allocate(k) for k in "abc"] == [A("10.244.1.2"), A("10.244.1.3"), A("10.244.1.4")]
    assert pool.in_use == {"a": A("10.244.1.2"), "b": A("10.244.1.3"), "c": A("10.244.1.4")}


def test_same_key_keeps_its_address():
    pool = HostLocal(N("10.244.1.0/24"))
    first = pool.allocate("a")
    pool.allocate("b")
    assert pool.allocate("a") == first
    assert len(pool.in_use) == 2


def test_a_whole_subnet_never_hands_out_gateway_network_or_broadcast():
    subnet = N("10.244.1.0/28")
    pool = HostLocal(subnet)
    got = [pool.allocate(str(i)) for i in range(pool.capacity)]
    assert len(set(got)) == pool.capacity == 13
    assert not {subnet.network_address, subnet.network_address + 1, subnet.broadcast_address} & set(got)
    assert all(ip in subnet for ip in got)


def test_exhaustion_raises():
    pool = HostLocal(N("10.244.1.0/29"))
    for i in range(5):
        pool.allocate(f"p{i}")
    with pytest.raises(PoolExhausted, match="10.244.1.0/29"):
        pool.allocate("one-too-many")
    assert "one-too-many" not in pool.in_use


def test_released_address_is_not_reused_straight_away():
    pool = HostLocal(N("10.244.1.0/24"))
    a, b, c = (pool.allocate(k) for k in "abc")
    pool.release("b")
    assert "b" not in pool.in_use
    assert pool.allocate("d") == c + 1                            # continues after the last one
    assert b not in pool.in_use.values()


def test_release_unknown_key_is_a_no_op():
    pool = HostLocal(N("10.244.1.0/24"))
    pool.allocate("a")
    pool.release("nope")
    assert pool.in_use == {"a": A("10.244.1.2")}


def test_starts_after_last_reserved():
    pool = HostLocal(N("10.244.1.0/24"), last=A("10.244.1.10"))
    assert pool.allocate("a") == A("10.244.1.11")


def test_wraps_around_after_the_last_host():
    pool = HostLocal(N("10.244.1.0/24"), last=A("10.244.1.254"))
    assert pool.allocate("a") == A("10.244.1.2")
    pool = HostLocal(N("10.244.1.0/29"))
    for k in "abcde":                                             # .2 .. .6, the whole range
        pool.allocate(k)
    pool.release("b")                                             # frees .3
    assert pool.allocate("f") == A("10.244.1.3")                  # wraps to the only free one


def test_never_hands_out_an_address_in_use():
    in_use = {"x": A("10.244.1.3"), "y": A("10.244.1.4")}
    pool = HostLocal(N("10.244.1.0/24"), in_use=in_use, last=A("10.244.1.2"))
    assert pool.allocate("a") == A("10.244.1.5")
    assert in_use == {"x": A("10.244.1.3"), "y": A("10.244.1.4")}   # the caller's dict is copied
    pool = HostLocal(N("10.244.1.0/29"), in_use={"x": A("10.244.1.2")}, last=A("10.244.1.6"))
    assert pool.allocate("a") == A("10.244.1.3")                  # wrap skips the one in use


# -- node subnets --------------------------------------------------------------------

@pytest.mark.parametrize("cidr, length, index, expected", [
    ("10.244.0.0/16", 24, 0, "10.244.1.0/24"),        # flannel's SubnetMin skips the first
    ("10.244.0.0/16", 24, 1, "10.244.2.0/24"),
    ("10.244.0.0/16", 24, 254, "10.244.255.0/24"),
    ("10.0.0.0/8", 16, 0, "10.1.0.0/16"),
    ("10.244.0.0/24", 26, 0, "10.244.0.64/26"),
    ("10.244.0.0/24", 26, 2, "10.244.0.192/26"),
])
def test_node_subnet(cidr, length, index, expected):
    assert node_subnet(N(cidr), length, index) == N(expected)


def test_node_subnets_are_disjoint_and_inside_the_pod_cidr():
    pod_cidr = N("10.244.0.0/16")
    subnets = [node_subnet(pod_cidr, 24, i) for i in range(255)]
    assert all(s.subnet_of(pod_cidr) for s in subnets)
    assert len(set(subnets)) == 255
    assert N("10.244.0.0/24") not in subnets


# -- underlay addresses -----------------------------------------------------------------

UNDERLAY = N("192.168.100.0/24")


def test_nodes_count_up_from_dot_2_externals_down_from_the_top():
    nodes, externals = underlay_addresses(UNDERLAY, [None, None, None], [None, None])
    assert nodes == [A("192.168.100.2"), A("192.168.100.3"), A("192.168.100.4")]
    assert externals == [A("192.168.100.254"), A("192.168.100.253")]


def test_explicit_addresses_are_kept_and_skipped():
    nodes, externals = underlay_addresses(UNDERLAY, [None, A("192.168.100.3"), None],
                                          [A("192.168.100.254"), None])
    assert nodes == [A("192.168.100.2"), A("192.168.100.3"), A("192.168.100.4")]
    assert externals == [A("192.168.100.254"), A("192.168.100.253")]


def test_explicit_addresses_in_the_other_groups_range_are_skipped_too():
    nodes, externals = underlay_addresses(UNDERLAY, [None, A("192.168.100.254")], [A("192.168.100.2"), None])
    assert nodes == [A("192.168.100.3"), A("192.168.100.254")]
    assert externals == [A("192.168.100.2"), A("192.168.100.253")]


def test_gateway_address_dot_1_is_left_free():
    nodes, externals = underlay_addresses(N("10.0.0.0/29"), [None, None, None], [None, None])
    assert nodes == [A("10.0.0.2"), A("10.0.0.3"), A("10.0.0.4")]
    assert externals == [A("10.0.0.6"), A("10.0.0.5")]
    assert A("10.0.0.1") not in nodes + externals


# -- scheduler --------------------------------------------------------------------------

NODES = (NodeSpec("n1", {"zone": "a", "kubernetes.io/hostname": "n1"}),
         NodeSpec("n2", {"zone": "a", "kubernetes.io/hostname": "n2"}),
         NodeSpec("n3", {"zone": "b", "kubernetes.io/hostname": "n3"}))


def pod(name: str, node_name: str | None = None, selector: dict | None = None, namespace: str = "default") -> Pod:
    return Pod(name, namespace, {}, (), node_name, selector or {})


def test_spreads_evenly_in_node_order():
    placed, failed = schedule([pod(f"p{i}") for i in range(7)], NODES)
    assert failed == []
    assert [placed[f"default/p{i}"] for i in range(7)] == ["n1", "n2", "n3", "n1", "n2", "n3", "n1"]


def test_node_name_pins_and_counts_before_spreading():
    pods = [pod("a"), pod("b"), pod("c"), pod("pinned1", "n1"), pod("pinned2", "n1")]
    placed, failed = schedule(pods, NODES)
    assert failed == []
    assert placed["default/pinned1"] == placed["default/pinned2"] == "n1"
    assert [placed[f"default/{k}"] for k in "abc"] == ["n2", "n3", "n2"]


def test_node_selector_limits_the_choice():
    pods = [pod(f"z{i}", selector={"zone": "a"}) for i in range(4)] + [pod("b", selector={"zone": "b"})]
    placed, failed = schedule(pods, NODES)
    assert failed == []
    assert [placed[f"default/z{i}"] for i in range(4)] == ["n1", "n2", "n1", "n2"]
    assert placed["default/b"] == "n3"
    placed, _ = schedule([pod("h", selector={"kubernetes.io/hostname": "n2"})], NODES)
    assert placed == {"default/h": "n2"}


def test_unschedulable_pods_and_their_reasons():
    pods = [pod("ok"), pod("lost", node_name="n9"), pod("picky", selector={"disk": "ssd"}),
            pod("half", selector={"zone": "a", "disk": "ssd"})]
    placed, failed = schedule(pods, NODES)
    assert placed == {"default/ok": "n1"}
    assert {f.pod.name: f.reason for f in failed} == {
        "lost": "nodeName 'n9' is not a node",
        "picky": "no node matches nodeSelector {'disk': 'ssd'}",
        "half": "no node matches nodeSelector {'zone': 'a', 'disk': 'ssd'}",
    }


def test_existing_placements_are_kept_and_counted():
    existing = {"default/a": "n3", "default/b": "n3"}
    pods = [pod("a"), pod("b"), pod("c"), pod("d"), pod("e")]
    placed, failed = schedule(pods, NODES, existing)
    assert failed == []
    assert placed["default/a"] == placed["default/b"] == "n3"      # not moved to spread
    assert [placed[f"default/{k}"] for k in "cde"] == ["n1", "n2", "n1"]
    assert existing == {"default/a": "n3", "default/b": "n3"}      # the caller's dict is untouched


def test_existing_placement_wins_over_node_name():
    placed, _ = schedule([pod("a", node_name="n1")], NODES, {"default/a": "n2"})
    assert placed == {"default/a": "n2"}


def test_pods_are_keyed_by_namespace():
    placed, _ = schedule([pod("a"), pod("a", namespace="other")], NODES)
    assert placed == {"default/a": "n1", "other/a": "n2"}
    assert pod_key(pod("a", namespace="other")) == "other/a"


def test_scheduling_is_deterministic():
    pods = [pod(f"p{i}", selector={"zone": "a"} if i % 3 == 0 else None) for i in range(20)]
    assert schedule(pods, NODES) == schedule(list(pods), NODES)


def test_scheduler_imports_first_without_a_cycle():
    # plan.scheduler imports topology.model, whose package imports topology.load, which
    # uses the scheduler: importing the scheduler first used to fail with ImportError.
    done = subprocess.run([sys.executable, "-c", "import netsim.plan.scheduler"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
