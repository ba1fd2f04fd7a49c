"""``netsim.proxy.netlink_batch`` against this kernel's rtnetlink, in a throw-away namespace
``nstest-nlbatch`` (root only). IPVS batches are exercised by the ipvs-marked tests."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                       reason="needs root and a Linux kernel (network namespaces)"),
]

NS = "nstest-nlbatch"


@pytest.fixture
def lo_index():
    from pyroute2 import IPRoute, netns
    subprocess.run(["ip", "netns", "add", NS], check=True)
    netns.pushns(NS)
    try:
        with IPRoute() as ipr:
            yield ipr.link_lookup(ifname="lo")[0]
    finally:
        netns.popns()
        subprocess.run(["ip", "netns", "del", NS], check=True)


def addresses(index: int) -> set[str]:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)}


def test_thousands_of_addresses_in_one_batch(lo_index):
    from netsim.proxy.netlink_batch import rtnl_addresses
    ips = [f"10.96.{i // 250}.{i % 250 + 1}" for i in range(3000)]      # several sendmsg chunks
    assert rtnl_addresses(lo_index, ips, [], "lo") == []
    assert set(ips) <= addresses(lo_index)
    assert rtnl_addresses(lo_index, ips[:10], ips[10:], "lo") == []     # EEXIST is "already so"
    assert addresses(lo_index) & set(ips) == set(ips[:10])


def test_a_failure_is_reported_by_request_and_the_rest_still_runs(lo_index):
    from netsim.proxy.netlink_batch import NLM_F_CREATE, NLM_F_EXCL, NETLINK_ROUTE, RTM_NEWADDR, Batch, ifaddr
    b = Batch(NETLINK_ROUTE)
    b.add(ifaddr(lo_index, "10.96.0.1"), "add 10.96.0.1", NLM_F_CREATE | NLM_F_EXCL, RTM_NEWADDR)
    b.add(ifaddr(999_999, "10.96.0.2"), "add 10.96.0.2 to a missing link", NLM_F_CREATE | NLM_F_EXCL, RTM_NEWADDR)
    b.add(ifaddr(lo_index, "10.96.0.3"), "add 10.96.0.3", NLM_F_CREATE | NLM_F_EXCL, RTM_NEWADDR)
    b.add(ifaddr(lo_index, "10.96.0.1"), "add 10.96.0.1 again", NLM_F_CREATE | NLM_F_EXCL, RTM_NEWADDR)
    failures = b.send()
    assert [(f.what, f.errno) for f in failures] == [("add 10.96.0.2 to a missing link", errno.ENODEV),
                                                     ("add 10.96.0.1 again", errno.EEXIST)]
    assert "add 10.96.0.2 to a missing link: No such device" in str(failures[0])
    assert {"10.96.0.1", "10.96.0.3"} <= addresses(lo_index)
