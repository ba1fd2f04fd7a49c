"""flannel's key layout, JSON formats and lease algorithm (pure, or on memory://)."""
from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from netsim.registry import ManualClock, open_registry
from netsim.registry.flannel import (CONFIG_KEY, FIRST_FREE, SUBNETS_PREFIX, BackendConfig,
                                     CorruptLease, InvalidConfig, LeaseAttrs, LeaseConflict,
                                     NetworkConfig, SubnetLease, SubnetsExhausted, acquire_lease,
                                     candidate_subnets, lease_from_kv, parse_subnet_key,
                                     read_config, renew_lease, renewal_delay, subnet_key,
                                     write_config)

FLANNEL_LEASE = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
NET = NetworkConfig.create("10.244.0.0/16")


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def attrs(i: int) -> LeaseAttrs:
    return LeaseAttrs.vxlan(f"192.168.64.{i}", f"02:00:00:00:00:{i:02x}")


@pytest.fixture
def clock():
    return ManualClock(1_000_000.0)


@pytest.fixture
def reg(clock):
    with open_registry("memory://", clock=clock) as r:
        yield r


# --- keys -------------------------------------------------------------------------------


def test_subnet_key_format_and_parse():
    assert subnet_key("10.244.1.0/24") == "/coreos.com/network/subnets/10.244.1.0-24"
    assert subnet_key(net("10.244.0.64/26")).endswith("/10.244.0.64-26")
    assert parse_subnet_key("/coreos.com/network/subnets/10.244.1.0-24") == net("10.244.1.0/24")
    assert parse_subnet_key("10.244.1.0-24") == net("10.244.1.0/24")
    assert parse_subnet_key(SUBNETS_PREFIX + "10.12.13.0-24&fd00:12:13::-56") == net("10.12.13.0/24")
    for bad in (CONFIG_KEY, SUBNETS_PREFIX + "garbage", SUBNETS_PREFIX + "10.244.1.5-24",
                SUBNETS_PREFIX + "10.244.1.0-33", SUBNETS_PREFIX + "300.1.1.0-24",
                "/elsewhere/10.244.1.0-24", SUBNETS_PREFIX + "10.244.1.0-24x"):
        assert parse_subnet_key(bad) is None, bad


# --- config -----------------------------------------------------------------------------


def test_config_defaults_follow_flannel():
    c = NetworkConfig.parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    assert (c.network, c.subnet_len) == (net("10.244.0.0/16"), 24)
    assert (c.subnet_min, c.subnet_max) == (IPv4Address("10.244.1.0"), IPv4Address("10.244.255.0"))
    assert c.backend == BackendConfig("vxlan", vni=1, port=0, direct_routing=False)
    assert c.backend.udp_port == 8472
    small = NetworkConfig.parse('{"Network": "10.0.0.0/26"}')           # > /22: prefix + 2
    assert (small.subnet_len, str(small.subnet_min), str(small.subnet_max)) == (28, "10.0.0.16", "10.0.0.48")
    assert NetworkConfig.parse('{"Network": "10.0.0.0/22"}').subnet_len == 24
    assert NetworkConfig.parse('{"Network": "10.0.0.0/28"}').subnet_len == 30


def test_config_keys_are_case_insensitive_and_round_trip():
    c = NetworkConfig.parse('{"network": "10.1.0.0/16", "subnetlen": 26, "SubnetMin": "10.1.2.0",'
                            '"backend": {"type": "vxlan", "vni": 42, "PORT": 4789, "directRouting": true}}')
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max)) == (26, "10.1.2.0", "10.1.255.192")
    assert (c.backend.vni, c.backend.udp_port, c.backend.direct_routing) == (42, 4789, True)
    assert NetworkConfig.parse(c.to_json()) == c
    assert json.loads(NET.to_json()) == {"Network": "10.244.0.0/16", "SubnetLen": 24,
                                          "Backend": {"Type": "vxlan", "VNI": 1}}


@pytest.mark.parametrize("text, message", [
    ("not json", "not JSON"),
    ("[1]", "must be a JSON object"),
    ("{}", "Network is required"),
    ('{"Network": "10.244.1.0/16"}', "not an IPv4 CIDR"),
    ('{"Network": "fd00::/48"}', "not an IPv4 CIDR"),
    ('{"Network": "10.0.0.0/29"}', "too small"),
    ('{"Network": "10.0.0.0/16", "SubnetLen": 31}', "at most 30"),
    ('{"Network": "10.0.0.0/16", "SubnetLen": 17}', "at least 18"),
    ('{"Network": "10.0.0.0/16", "SubnetLen": "24"}', "SubnetLen must be an integer"),
    ('{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}', "not in the range of the Network"),
    ('{"Network": "10.0.0.0/16", "SubnetMax": "10.0.3.1"}', r"not on a /24 \(SubnetLen\) boundary"),
    ('{"Network": "10.0.0.0/16", "SubnetLen": -1}', "must not be negative"),
    ('{"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.3.0"}', "above SubnetMax"),
    ('{"Network": "10.0.0.0/16", "Backend": {}}', "Backend.Type is required"),
    ('{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": -1}}', "Backend.VNI"),
    ('{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}', "Backend.Port"),
    ('{"Network": "10.0.0.0/16", "EnableIPv6": true}', "EnableIPv6 is not supported"),
])
def test_config_errors_are_explicit(text, message):
    with pytest.raises(InvalidConfig, match=message) as err:
        NetworkConfig.parse(text)
    assert str(err.value).startswith(f"invalid flannel config at {CONFIG_KEY}: ")


def test_config_errors_are_collected():
    with pytest.raises(InvalidConfig) as err:
        NetworkConfig.parse('{"Network": "10.0.0.0/16", "SubnetMin": "1.2.3.4", "SubnetMax": "x",'
                            '"Backend": {"Type": "vxlan", "VNI": "1"}}')
    assert len(err.value.problems) == 3


def test_read_and_write_config(reg):
    with pytest.raises(InvalidConfig, match="no config found"):
        read_config(reg)
    write_config(reg, NET)
    assert read_config(reg) == NET


# --- lease values -----------------------------------------------------------------------


def test_lease_attrs_json_is_byte_exact_with_flannel():
    a = LeaseAttrs.vxlan("192.168.64.3", "c6:d2:32:6f:8f:44")
    assert a.to_json() == FLANNEL_LEASE
    parsed = LeaseAttrs.parse(FLANNEL_LEASE)
    assert parsed == a and parsed.to_json() == FLANNEL_LEASE
    assert (parsed.public_ip, parsed.vni, parsed.vtep_mac) == (IPv4Address("192.168.64.3"), 1, "c6:d2:32:6f:8f:44")
    other = '{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"host-gw"}'
    assert LeaseAttrs.parse(other).to_json() == other


@pytest.mark.parametrize("value, message", [
    ("{not json", "not JSON"),
    ('"a string"', "not a JSON object"),
    ('{"PublicIPv6":null}', "PublicIP must be an IPv4 address"),
    ('{"PublicIP":"fd00::1"}', "PublicIP must be an IPv4 address"),
    ('{"PublicIP":"10.0.0.1","PublicIPv6":"10.0.0.1"}', "PublicIPv6"),
    ('{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":[1]}', "BackendData must be an object"),
    ('{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:01"}}', "VNI"),
    ('{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}', "VtepMAC"),
])
def test_corrupt_lease(value, message):
    key = subnet_key("10.244.7.0/24")
    with pytest.raises(CorruptLease, match=message) as err:
        LeaseAttrs.parse(value, key)
    assert key in str(err.value)


def test_lease_from_kv(reg):
    reg.put(subnet_key("10.244.3.0/24"), FLANNEL_LEASE)
    lease = lease_from_kv(reg.get(subnet_key("10.244.3.0/24")))
    assert lease.subnet == net("10.244.3.0/24") and lease.reservation
    reg.put(SUBNETS_PREFIX + "junk", FLANNEL_LEASE)
    with pytest.raises(CorruptLease, match="does not name a subnet"):
        lease_from_kv(reg.get(SUBNETS_PREFIX + "junk"))


# --- allocation -------------------------------------------------------------------------


def test_candidate_scan_skips_overlaps_and_stops_at_100():
    cands = candidate_subnets(NET, [net("10.244.1.0/24"), net("10.244.2.0/23"), net("10.244.8.0/22")])
    assert cands[:3] == [net("10.244.4.0/24"), net("10.244.5.0/24"), net("10.244.6.0/24")]
    assert net("10.244.9.0/24") not in cands and len(cands) == 100
    assert cands[-1] == net("10.244.107.0/24")
    assert candidate_subnets(NET, [], limit=3) == [net(f"10.244.{i}.0/24") for i in (1, 2, 3)]
    tiny = NetworkConfig.create("10.9.0.0/24", subnet_len=26)      # 10.9.0.64, .128, .192
    assert candidate_subnets(tiny, [net("10.9.0.128/26")]) == [net("10.9.0.64/26"), net("10.9.0.192/26")]


def test_acquire_picks_among_free_candidates_and_claims(reg, clock):
    lease = acquire_lease(reg, NET, "192.168.64.1", attrs(1), ttl=60, rng=random.Random(7))
    assert NET.fits(lease.subnet) and lease.lease_id and lease.expires_at == clock() + 60
    kv = reg.get(lease.key)
    assert kv.value == attrs(1).to_json() and kv.lease == lease.lease_id
    first = acquire_lease(reg, NET, "192.168.64.2", attrs(2), ttl=60, rng=FIRST_FREE)
    assert first.subnet == net("10.244.1.0/24") or lease.subnet == net("10.244.1.0/24")


def test_acquire_reuses_own_lease_with_a_fresh_lease(reg):
    old = acquire_lease(reg, NET, "192.168.64.1", attrs(1), ttl=60, rng=FIRST_FREE)
    acquire_lease(reg, NET, "192.168.64.2", attrs(2), ttl=60, rng=FIRST_FREE)
    new_attrs = LeaseAttrs.vxlan("192.168.64.1", "02:aa:bb:cc:dd:ee")
    again = acquire_lease(reg, NET, "192.168.64.1", new_attrs, ttl=60, rng=FIRST_FREE)
    assert again.subnet == old.subnet and again.lease_id != old.lease_id
    assert reg.get(old.key).value == new_attrs.to_json()
    assert len(reg.range(SUBNETS_PREFIX)) == 2


def test_acquire_keeps_a_reservation_lease_less(reg):
    key = subnet_key("10.244.42.0/24")
    reg.put(key, attrs(9).to_json())                               # operator's reservation
    got = acquire_lease(reg, NET, "192.168.64.9", attrs(9), ttl=60)
    assert got.subnet == net("10.244.42.0/24") and got.reservation and reg.get(key).lease == 0


def test_acquire_drops_own_lease_that_no_longer_fits(reg):
    reg.put(subnet_key("10.99.0.0/24"), attrs(1).to_json())       # from an older config
    reg.put(subnet_key("10.244.5.0/24"), "{corrupt")               # still counts as taken
    got = acquire_lease(reg, NET, "192.168.64.1", attrs(1), ttl=60, rng=FIRST_FREE,
                        previous=net("10.244.5.0/24"))
    assert got.subnet == net("10.244.1.0/24")
    assert reg.get(subnet_key("10.99.0.0/24")) is None
    prev = acquire_lease(reg, NET, "192.168.64.2", attrs(2), ttl=60, previous=net("10.244.77.0/24"))
    assert prev.subnet == net("10.244.77.0/24")


def test_exhaustion_names_network_and_subnet_len(reg):
    tiny = NetworkConfig.create("10.9.0.0/24", subnet_len=26)
    for i in range(1, 4):
        acquire_lease(reg, tiny, f"192.168.64.{i}", attrs(i), ttl=60)
    with pytest.raises(SubnetsExhausted) as err:
        acquire_lease(reg, tiny, "192.168.64.4", attrs(4), ttl=60)
    msg = str(err.value)
    assert "10.9.0.0/24" in msg and "SubnetLen 26" in msg and "3 leases held" in msg


def test_lost_races_retry_then_give_up(reg):
    class Rigged:
        """Another node always claims our pick just before we do."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def create_if_absent(self, key, value, lease=0):
            self.calls += 1
            self.inner.put(key, attrs(200 + self.calls).to_json())
            return self.inner.create_if_absent(key, value, lease)

    rigged = Rigged(reg)
    with pytest.raises(LeaseConflict, match="3 times"):
        acquire_lease(rigged, NET, "192.168.64.1", attrs(1), ttl=60, rng=FIRST_FREE, retries=3)
    assert rigged.calls == 3
    assert reg.range(SUBNETS_PREFIX)[0].key == subnet_key("10.244.1.0/24")


def test_public_ip_must_match_attrs(reg):
    with pytest.raises(ValueError, match="differs"):
        acquire_lease(reg, NET, "192.168.64.2", attrs(1))


# --- renewal ----------------------------------------------------------------------------


def test_renewal_is_a_new_lease_and_a_put_when_the_margin_is_reached(reg, clock):
    lease = acquire_lease(reg, NET, "192.168.64.1", attrs(1), ttl=10, rng=FIRST_FREE)
    assert renewal_delay(lease, margin=3, now=clock()) == 7
    rev = reg.revision()
    assert renew_lease(reg, lease, ttl=10, margin=3) is lease     # not due yet
    assert reg.revision() == rev
    clock.advance(7.5)                                             # 2.5 s left < 3 s margin
    renewed = renew_lease(reg, lease, ttl=10, margin=3)
    assert renewed.lease_id != lease.lease_id and renewed.expires_at == clock() + 10
    with reg.watch(SUBNETS_PREFIX, start_revision=rev + 1) as w:
        (ev,) = w.next_batch(1).events
    assert ev.type == "PUT" and ev.kv.lease == renewed.lease_id and ev.prev_kv.lease == lease.lease_id
    clock.advance(5)                                               # the old lease expires ...
    assert reg.lease_time_to_live(lease.lease_id) == -1
    assert reg.get(lease.key).lease == renewed.lease_id            # ... without taking the key
    forced = renew_lease(reg, renewed, ttl=10, margin=3, force=True)
    assert forced.lease_id != renewed.lease_id


def test_reservations_never_renew(reg, clock):
    res = SubnetLease(net("10.244.9.0/24"), attrs(1))
    assert renewal_delay(res, now=clock()) is None
    assert renew_lease(reg, res, clock=clock, force=True) is res
