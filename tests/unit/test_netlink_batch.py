"""The struct-built netlink messages of ``netsim.proxy.netlink_batch`` decode, with pyroute2's
own message classes, to what pyroute2 itself sends for the same request."""
from __future__ import annotations

import socket
import struct

import pytest

pytest.importorskip("pyroute2")
from pyroute2 import IPVSDest, IPVSService  # noqa: E402
from pyroute2.netlink.generic import ipvs  # noqa: E402
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402

from netsim.proxy import netlink_batch as nb  # noqa: E402


def framed(payload: bytes, kind: int = 30) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 1, 1, 0) + payload


def pyroute2_ipvs(cmd: int, attrs) -> bytes:
    """What pyroute2's IPVS.service()/dest() put on the wire (same construction)."""
    m = ipvs.ipvsmsg()
    m["cmd"], m["version"], m["attrs"] = cmd, 1, attrs
    m["header"].update(type=30, flags=1, sequence_number=1)
    m.encode()
    return bytes(m.data)


def decoded(data: bytes) -> tuple[int, dict]:
    m = ipvs.ipvsmsg(data)
    m.decode()
    return m["cmd"], {name: dict(value["attrs"]) for name, value in m["attrs"]}


TUNNEL_ONLY = {"IPVS_DEST_ATTR_TUN_TYPE", "IPVS_DEST_ATTR_TUN_PORT", "IPVS_DEST_ATTR_TUN_FLAGS"}


@pytest.mark.parametrize("cmd", [nb.IPVS_CMD_NEW_SERVICE, nb.IPVS_CMD_SET_SERVICE])
@pytest.mark.parametrize("proto,ip,port,sched,flags,timeout", [
    (socket.IPPROTO_TCP, "10.96.0.1", 443, "rr", 0, 0),
    (socket.IPPROTO_UDP, "10.96.0.10", 53, "sh", 1, 10800),     # persistent (ClientIP affinity)
    (132, "192.168.1.200", 30080, "wlc", 2, 0),
])
def test_service_message_matches_pyroute2(cmd, proto, ip, port, sched, flags, timeout):
    svc = IPVSService(addr=ip, port=port, protocol=proto, sched_name=sched,
                      flags={"flags": flags, "mask": 0xFFFF}, timeout=timeout)
    theirs = decoded(pyroute2_ipvs(cmd, [("IPVS_CMD_ATTR_SERVICE", svc.dump_nla())]))
    ours = decoded(framed(nb.ipvs_service(cmd, proto, ip, port, sched, flags, timeout)))
    assert ours == theirs


def test_service_key_message_matches_pyroute2():
    svc = IPVSService(addr="10.96.0.1", port=80, protocol=socket.IPPROTO_TCP)
    theirs = decoded(pyroute2_ipvs(nb.IPVS_CMD_DEL_SERVICE, [("IPVS_CMD_ATTR_SERVICE", svc.dump_key())]))
    assert decoded(framed(nb.ipvs_service(nb.IPVS_CMD_DEL_SERVICE, socket.IPPROTO_TCP, "10.96.0.1", 80))) == theirs


@pytest.mark.parametrize("cmd,weight", [(nb.IPVS_CMD_NEW_DEST, 1), (nb.IPVS_CMD_SET_DEST, 0),
                                        (nb.IPVS_CMD_DEL_DEST, 1)])
def test_dest_message_matches_pyroute2_masquerade(cmd, weight):
    svc = IPVSService(addr="10.96.0.10", port=53, protocol=socket.IPPROTO_UDP)
    dest = IPVSDest(addr="10.244.1.5", port=5353, weight=weight, fwd_method=0)
    cmd_t, theirs = decoded(pyroute2_ipvs(cmd, [("IPVS_CMD_ATTR_SERVICE", svc.dump_key()),
                                                ("IPVS_CMD_ATTR_DEST", dest.dump_nla())]))
    cmd_o, ours = decoded(framed(nb.ipvs_dest(cmd, socket.IPPROTO_UDP, "10.96.0.10", 53, "10.244.1.5", 5353,
                                              weight, 0)))
    # pyroute2 also sends the tunnel attributes (zero; meaningless for masquerade)
    theirs["IPVS_CMD_ATTR_DEST"] = {k: v for k, v in theirs["IPVS_CMD_ATTR_DEST"].items() if k not in TUNNEL_ONLY}
    assert (cmd_o, ours) == (cmd_t, theirs)
    assert ours["IPVS_CMD_ATTR_DEST"]["IPVS_DEST_ATTR_FWD_METHOD"] == 0      # masquerade, as kube-proxy


def test_address_message_decodes_as_a_slash_32():
    m = ifaddrmsg(framed(nb.ifaddr(7, "10.96.0.10"), nb.RTM_NEWADDR))
    m.decode()
    assert (m["family"], m["prefixlen"], m["index"]) == (socket.AF_INET, 32, 7)
    assert m.get_attr("IFA_LOCAL") == m.get_attr("IFA_ADDRESS") == "10.96.0.10"


def test_attributes_are_padded_to_four_bytes():
    payload = nb.ipvs_service(nb.IPVS_CMD_NEW_SERVICE, 6, "10.96.0.1", 80, "rr")     # "rr\0": 7 → 8
    assert len(payload) % 4 == 0


def test_a_batch_without_a_message_type_is_refused():
    with pytest.raises(ValueError):
        nb.Batch(nb.NETLINK_GENERIC).add(b"", "nothing")


def test_an_empty_batch_sends_nothing():
    assert nb.Batch(nb.NETLINK_ROUTE).send() == []


PROC_IP_VS = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600001:01BB rr 
  -> C0A80002:192B      Masq    1      0          0         
UDP  0A60000A:0035 rr persistent 10800 FFFFFFFF
  -> 0AF40105:14E9      Masq    1      0          3         
  -> 0AF40205:14E9      Masq    0      2          0         
FWM  00000001 rr 
  -> 0AF40105:0050      Masq    1      0          0         
TCP  [2001:0db8:0000:0000:0000:0000:0000:0001]:0050 rr 
  -> [2001:0db8:0000:0000:0000:0000:0000:0002]:0050      Masq    1      0          0         
SCTP 0A600002:0050 sh 
"""


def test_proc_ip_vs_gives_every_ipv4_real_server_with_its_counts():
    assert nb.proc_real_servers(PROC_IP_VS) == {
        ("TCP", "10.96.0.1", 443): {"192.168.0.2:6443": (1, 0, 0)},
        ("UDP", "10.96.0.10", 53): {"10.244.1.5:5353": (1, 0, 3), "10.244.2.5:5353": (0, 2, 0)},
        ("SCTP", "10.96.0.2", 80): {},
    }


def test_attributes_are_read_back_by_type():
    payload = nb.ipvs_service(nb.IPVS_CMD_NEW_SERVICE, 17, "10.96.0.10", 53, "sh", 1, 10800)
    svc = nb.attributes(nb.attributes(payload, 4)[nb.IPVS_CMD_ATTR_SERVICE])
    assert socket.inet_ntoa(svc[nb.SVC_ADDR]) == "10.96.0.10"
    assert struct.unpack(">H", svc[nb.SVC_PORT])[0] == 53
    assert svc[nb.SVC_SCHED_NAME] == b"sh\0"
