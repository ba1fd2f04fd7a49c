"""Flannel's registry layout, JSON formats and subnet-lease algorithm, over any Registry.

Keys (etcd subnet manager, v3 API): the network config at ``/coreos.com/network/config``
and one key per node subnet, ``/coreos.com/network/subnets/10.244.1.0-24``, whose value is
the node's LeaseAttrs JSON and which is attached to a 24 h registry lease (a key without a
lease is a permanent reservation). ``acquire_lease`` is flannel's tryAcquireLease and
``renew_lease`` its renewal: a fresh full-TTL lease and a plain put of the same key.
"""
from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import Any, Protocol

from .base import KV, LeaseNotFound, Registry, RegistryError

CONFIG_KEY = "/coreos.com/network/config"
SUBNETS_PREFIX = "/coreos.com/network/subnets/"
SUBNET_TTL = 86400               # seconds; flannel's subnetTTL
RENEW_MARGIN = 3600              # seconds; --subnet-lease-renew-margin
MAX_CANDIDATES = 100             # flannel scans at most this many free subnets
RACE_RETRIES = 10                # flannel's raceRetries
VXLAN_PORT = 8472                # Linux's default VXLAN port, used when Backend.Port is 0

_SUBNET_RE = re.compile(r"^(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-fA-F\d:]+)-(\d+))?$")
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


# --- errors -----------------------------------------------------------------------------


class InvalidConfig(RegistryError):
    """The network config is missing or wrong; lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"invalid flannel config at {CONFIG_KEY}: {'; '.join(self.problems)}")


class CorruptLease(RegistryError):
    """A subnet lease value that is not flannel's LeaseAttrs JSON."""

    def __init__(self, reason: str, key: str = ""):
        self.key = key
        self.reason = reason
        super().__init__(f"corrupt subnet lease{f' at {key}' if key else ''}: {reason}")


class SubnetsExhausted(RegistryError):
    """No free subnet is left between SubnetMin and SubnetMax."""

    def __init__(self, config: NetworkConfig, taken: int):
        self.config = config
        super().__init__(
            f"out of subnets: no free /{config.subnet_len} left in Network {config.network} "
            f"(SubnetLen {config.subnet_len}, SubnetMin {config.subnet_min}, "
            f"SubnetMax {config.subnet_max}, {taken} leases held)")


class LeaseConflict(RegistryError):
    """Every claim attempt lost a race against another node."""

    def __init__(self, attempts: int):
        super().__init__(f"failed to acquire a subnet lease: lost the claim race {attempts} times")


# --- keys -------------------------------------------------------------------------------


def subnet_key(network: IPv4Network | str) -> str:
    """``10.244.1.0/24`` → ``/coreos.com/network/subnets/10.244.1.0-24``."""
    net = IPv4Network(network)
    return f"{SUBNETS_PREFIX}{net.network_address}-{net.prefixlen}"


def parse_subnet_key(key: str) -> IPv4Network | None:
    """The IPv4 subnet a key names (a full key or its last part); None if it names none.

    Dual-stack keys (``10.12.13.0-24&fd00:12:13::-56``) give their IPv4 part.
    """
    if key.startswith("/") and not key.startswith(SUBNETS_PREFIX):
        return None
    m = _SUBNET_RE.match(key.rsplit("/", 1)[-1])
    if not m:
        return None
    try:
        return IPv4Network(f"{m[1]}/{m[2]}")        # strict: host bits set → not a subnet
    except ValueError:
        return None


# --- network config ---------------------------------------------------------------------


def _lower_keys(d: Mapping[str, Any]) -> dict[str, Any]:
    """Go's encoding/json matches field names case-insensitively; so do we."""
    return {str(k).lower(): v for k, v in d.items()}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class BackendConfig:
    """The ``Backend`` object. Port 0 means the kernel default (8472, see ``udp_port``)."""

    type: str = "vxlan"
    vni: int = 1
    port: int = 0
    mtu: int = 0                         # 0: the uplink's MTU
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False

    @property
    def udp_port(self) -> int:
        return self.port or VXLAN_PORT

    @classmethod
    def from_dict(cls, d: Any, problems: list[str]) -> BackendConfig:
        if not isinstance(d, Mapping):
            problems.append(f"Backend must be an object, got {json.dumps(d)}")
            return cls()
        d = _lower_keys(d)
        kw: dict[str, Any] = {}
        typ = d.get("type")
        if not isinstance(typ, str) or not typ:
            problems.append("Backend.Type is required (e.g. \"vxlan\")")
        else:
            kw["type"] = typ
        for name, attr, lo, hi in (("vni", "vni", 0, 2**24 - 1), ("port", "port", 0, 65535),
                                   ("mtu", "mtu", 0, 65535)):
            if name in d:
                v = d[name]
                if not _is_int(v) or not lo <= v <= hi:
                    problems.append(f"Backend.{name.upper() if name != 'port' else 'Port'} "
                                    f"must be an integer {lo}..{hi}, got {json.dumps(v)}")
                else:
                    kw[attr] = v
        for name, attr in (("gbp", "gbp"), ("learning", "learning"), ("directrouting", "direct_routing")):
            if name in d:
                if not isinstance(d[name], bool):
                    problems.append(f"Backend.{attr} must be true or false, got {json.dumps(d[name])}")
                else:
                    kw[attr] = d[name]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Type": self.type}
        if self.type == "vxlan" or self.vni != 1:
            out["VNI"] = self.vni
        for key, value, default in (("Port", self.port, 0), ("MTU", self.mtu, 0), ("GBP", self.gbp, False),
                                    ("Learning", self.learning, False),
                                    ("DirectRouting", self.direct_routing, False)):
            if value != default:
                out[key] = value
        return out


@dataclass(frozen=True)
class NetworkConfig:
    """``/coreos.com/network/config`` after flannel's defaulting and validation."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend: BackendConfig = field(default_factory=BackendConfig)
    enable_nftables: bool = False

    @property
    def subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    @classmethod
    def create(cls, network: str | IPv4Network, subnet_len: int = 0,
               subnet_min: str | None = None, subnet_max: str | None = None,
               backend: BackendConfig | None = None) -> NetworkConfig:
        """Build a config from Python values, applying the same rules as ``parse``."""
        d: dict[str, Any] = {"Network": str(network), "SubnetLen": subnet_len}
        if subnet_min:
            d["SubnetMin"] = str(subnet_min)
        if subnet_max:
            d["SubnetMax"] = str(subnet_max)
        d["Backend"] = (backend or BackendConfig()).to_dict()
        return cls.from_dict(d)

    @classmethod
    def parse(cls, text: str | bytes) -> NetworkConfig:
        try:
            d = json.loads(text)
        except ValueError as err:
            raise InvalidConfig([f"not JSON ({err})"]) from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, raw: Any) -> NetworkConfig:
        """flannel's ParseConfig (pkg/subnet/config.go), IPv4 only; all problems at once."""
        if not isinstance(raw, Mapping):
            raise InvalidConfig([f"must be a JSON object, got {json.dumps(raw)[:40]}"])
        d = _lower_keys(raw)
        problems: list[str] = []
        if d.get("enableipv4", True) is not True:
            problems.append("EnableIPv4=false (IPv6-only) is not supported")
        if d.get("enableipv6", False) is not False:
            problems.append("EnableIPv6 is not supported")
        # flannel's binary falls back to the "udp" backend when Backend is absent; netsim's
        # default is vxlan (see the reference notes), so write Backend.Type explicitly.
        backend = BackendConfig.from_dict(d["backend"], problems) if "backend" in d else BackendConfig()
        nft = d.get("enablenftables", False)
        if not isinstance(nft, bool):
            problems.append(f"EnableNFTables must be true or false, got {json.dumps(nft)}")

        net = None
        if "network" not in d:
            problems.append("Network is required (e.g. \"10.244.0.0/16\")")
        elif not isinstance(d["network"], str):
            problems.append(f"Network must be a string, got {json.dumps(d['network'])}")
        else:
            try:
                net = IPv4Network(d["network"])
            except ValueError as err:
                problems.append(f"Network {d['network']!r} is not an IPv4 CIDR ({err})")

        slen = d.get("subnetlen", 0)
        if not _is_int(slen):
            problems.append(f"SubnetLen must be an integer, got {json.dumps(slen)}")
            slen = None
        elif net is not None:
            slen = _subnet_len(net, slen, problems)
        if net is None or slen is None:
            raise InvalidConfig(problems)

        size = 1 << (32 - slen)
        bounds = {}
        for name, default in (("SubnetMin", net.network_address + size),
                              ("SubnetMax", net.broadcast_address + 1 - size)):
            value = d.get(name.lower())
            if value in (None, "", "0.0.0.0"):
                bounds[name] = default
                continue
            addr = _addr(value, 4)
            if addr is None:
                problems.append(f"{name} must be an IPv4 address, got {json.dumps(value)}")
            elif addr not in net:
                problems.append(f"{name} {addr} is not in the range of the Network {net}")
            elif int(addr) % size:
                problems.append(f"{name} {addr} is not on a /{slen} (SubnetLen) boundary")
            else:
                bounds[name] = addr
        if len(bounds) == 2 and bounds["SubnetMin"] > bounds["SubnetMax"]:
            problems.append(f"SubnetMin {bounds['SubnetMin']} is above SubnetMax {bounds['SubnetMax']}")
        if problems:
            raise InvalidConfig(problems)
        return cls(net, slen, bounds["SubnetMin"], bounds["SubnetMax"], backend, nft)

    def to_json(self) -> str:
        """JSON as an operator would write it (defaults for SubnetMin/Max left out)."""
        size = self.subnet_size
        d: dict[str, Any] = {"Network": str(self.network), "SubnetLen": self.subnet_len}
        if self.subnet_min != self.network.network_address + size:
            d["SubnetMin"] = str(self.subnet_min)
        if self.subnet_max != self.network.broadcast_address + 1 - size:
            d["SubnetMax"] = str(self.subnet_max)
        if self.enable_nftables:
            d["EnableNFTables"] = True
        d["Backend"] = self.backend.to_dict()
        return json.dumps(d, separators=(",", ":"))

    def fits(self, subnet: IPv4Network) -> bool:
        """flannel's isSubnetConfigCompat: inside SubnetMin..SubnetMax with the right length."""
        return (subnet.prefixlen == self.subnet_len
                and self.subnet_min <= subnet.network_address <= self.subnet_max)


def _subnet_len(net: IPv4Network, slen: int, problems: list[str]) -> int | None:
    """flannel's SubnetLen rules: explicit ≤ 30 and ≥ prefix + 2; default 24 or prefix + 2."""
    plen = net.prefixlen
    if slen < 0:
        problems.append(f"SubnetLen must not be negative, got {slen}")
        return None
    if slen > 0:
        if slen > 30:
            problems.append(f"SubnetLen must be at most 30, got {slen}")
            return None
        if slen < plen + 2:
            problems.append(f"Network {net} must hold at least four subnets: "
                            f"SubnetLen must be at least {plen + 2}, got {slen}")
            return None
        return slen
    if plen > 28:
        problems.append(f"Network {net} is too small: the smallest usable Network is a /28")
        return None
    return 24 if plen <= 22 else plen + 2


def read_config(registry: Registry) -> NetworkConfig:
    kv = registry.get(CONFIG_KEY)
    if kv is None:
        raise InvalidConfig([f"no config found (put one at {CONFIG_KEY})"])
    return NetworkConfig.parse(kv.value)


def write_config(registry: Registry, config: NetworkConfig) -> None:
    registry.put(CONFIG_KEY, config.to_json())


# --- lease values -----------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseAttrs:
    """flannel's LeaseAttrs; ``to_json`` writes exactly what flanneld writes.

    ``backend_data`` is kept as an ordered mapping so a parsed value re-serialises byte for
    byte; for vxlan it is ``{"VNI": n, "VtepMAC": "xx:..."}``.
    """

    public_ip: IPv4Address
    backend_type: str = "vxlan"
    backend_data: Mapping[str, Any] | None = field(default=None, hash=False)
    public_ipv6: IPv6Address | None = None
    backend_v6_data: Mapping[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def vxlan(cls, public_ip: str | IPv4Address, vtep_mac: str, vni: int = 1) -> LeaseAttrs:
        return cls(IPv4Address(public_ip), "vxlan", {"VNI": vni, "VtepMAC": vtep_mac})

    @property
    def vni(self) -> int | None:
        return (self.backend_data or {}).get("VNI")

    @property
    def vtep_mac(self) -> str | None:
        return (self.backend_data or {}).get("VtepMAC")

    def to_json(self) -> str:
        d: dict[str, Any] = {"PublicIP": str(self.public_ip),
                             "PublicIPv6": str(self.public_ipv6) if self.public_ipv6 else None}
        if self.backend_type:
            d["BackendType"] = self.backend_type
        if self.backend_data is not None:
            d["BackendData"] = dict(self.backend_data)
        if self.backend_v6_data is not None:
            d["BackendV6Data"] = dict(self.backend_v6_data)
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str | bytes, key: str = "") -> LeaseAttrs:
        """Parse a lease value; CorruptLease (naming ``key``) on anything flannel would reject."""
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise CorruptLease(f"not JSON ({err})", key) from None
        if not isinstance(raw, dict):
            raise CorruptLease("not a JSON object", key)
        d = _lower_keys(raw)
        ip = _addr(d.get("publicip"), 4)
        if ip is None:
            raise CorruptLease(f"PublicIP must be an IPv4 address, got {json.dumps(d.get('publicip'))}", key)
        ip6 = None
        if d.get("publicipv6") is not None:
            ip6 = _addr(d["publicipv6"], 6)
            if ip6 is None:
                raise CorruptLease(f"PublicIPv6 must be null or an IPv6 address, got {json.dumps(d['publicipv6'])}", key)
        btype = d.get("backendtype", "")
        if not isinstance(btype, str):
            raise CorruptLease(f"BackendType must be a string, got {json.dumps(btype)}", key)
        data, data6 = d.get("backenddata"), d.get("backendv6data")
        for name, value in (("BackendData", data), ("BackendV6Data", data6)):
            if value is not None and not isinstance(value, dict):
                raise CorruptLease(f"{name} must be an object, got {json.dumps(value)}", key)
        if btype == "vxlan":
            _check_vxlan(data or {}, key)
        return cls(ip, btype, data, ip6, data6)


def _addr(value: Any, version: int):
    if not isinstance(value, str):
        return None
    try:
        addr = ip_address(value)
    except ValueError:
        return None
    return addr if addr.version == version else None


def _check_vxlan(data: Mapping[str, Any], key: str) -> None:
    vni, mac = data.get("VNI"), data.get("VtepMAC")
    if not _is_int(vni) or not 0 <= vni < 2**24:
        raise CorruptLease(f"BackendData.VNI must be an integer 0..16777215, got {json.dumps(vni)}", key)
    if not isinstance(mac, str) or not _MAC_RE.match(mac):
        raise CorruptLease(f"BackendData.VtepMAC must be a MAC address, got {json.dumps(mac)}", key)


# --- leases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SubnetLease:
    """A node's subnet and what it published. ``lease_id`` 0 = reservation (never expires)."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    lease_id: int = 0
    expires_at: float = 0.0              # wall-clock seconds; 0 for reservations or unknown

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)

    @property
    def reservation(self) -> bool:
        return self.lease_id == 0


def lease_from_kv(kv: KV) -> SubnetLease:
    """A SubnetLease from a registry key (CorruptLease if key or value is not flannel's)."""
    subnet = parse_subnet_key(kv.key)
    if subnet is None:
        raise CorruptLease("key does not name a subnet", kv.key)
    return SubnetLease(subnet, LeaseAttrs.parse(kv.value, kv.key), kv.lease)


class _Picker(Protocol):
    def randrange(self, n: int) -> int: ...


class _FirstFree:
    """An ``rng`` that always picks the lowest free subnet (reproducible allocation)."""

    def randrange(self, n: int) -> int:
        return 0


FIRST_FREE = _FirstFree()


def candidate_subnets(config: NetworkConfig, taken: Iterable[IPv4Network],
                      limit: int = MAX_CANDIDATES) -> list[IPv4Network]:
    """Free subnets from SubnetMin upward, skipping overlaps, at most ``limit`` (flannel: 100)."""
    spans = sorted((int(t.network_address), int(t.broadcast_address)) for t in taken)
    size, out = config.subnet_size, []
    ip, last = int(config.subnet_min), int(config.subnet_max)
    while ip <= last and len(out) < limit:
        end = ip + size - 1
        if not any(lo <= end and ip <= hi for lo, hi in spans):
            out.append(IPv4Network((ip, config.subnet_len)))
        ip += size
    return out


def acquire_lease(registry: Registry, config: NetworkConfig, public_ip: str | IPv4Address,
                  attrs: LeaseAttrs, ttl: int = SUBNET_TTL, rng: _Picker | None = None,
                  retries: int = RACE_RETRIES, previous: IPv4Network | None = None,
                  clock: Callable[[], float] | None = None) -> SubnetLease:
    """flannel's AcquireLease/tryAcquireLease.

    1. Reuse the lease whose PublicIP is ours if it fits the config (fresh lease + put; a
       reservation stays lease-less); if it does not fit, delete it.
    2. Else take ``previous`` (the subnet from an old subnet.env) if it is free and fits.
    3. Else pick at random (``rng``; ``FIRST_FREE`` for the lowest) among the first 100 free
       subnets and claim it with create-if-absent; on losing the race start over.
    """
    public_ip = IPv4Address(public_ip)
    if attrs.public_ip != public_ip:
        raise ValueError(f"attrs.public_ip {attrs.public_ip} differs from public_ip {public_ip}")
    rng = rng or random
    clock = clock or registry.clock
    value = attrs.to_json()
    for _ in range(retries):
        snapshot = registry.range(SUBNETS_PREFIX)
        taken: list[IPv4Network] = []
        mine: tuple[IPv4Network, KV] | None = None
        for kv in snapshot:
            subnet = parse_subnet_key(kv.key)
            if subnet is None:
                continue                 # not a subnet key: flannel skips it
            taken.append(subnet)         # corrupt values still hold their subnet (flannel
            try:                         # would skip them and then lose the claim on them)
                held = LeaseAttrs.parse(kv.value, kv.key)
            except RegistryError:
                continue
            if held.public_ip == public_ip and mine is None:
                mine = (subnet, kv)
        if mine:
            subnet, kv = mine
            if config.fits(subnet):
                if kv.lease == 0:
                    registry.put(kv.key, value)
                    return SubnetLease(subnet, attrs)
                lease = registry.lease_grant(ttl)
                registry.put(kv.key, value, lease=lease)
                return SubnetLease(subnet, attrs, lease, clock() + ttl)
            registry.delete(kv.key)
            taken.remove(subnet)
        if (previous is not None and config.fits(previous)
                and not any(previous.overlaps(t) for t in taken)):
            subnet = previous
        else:
            candidates = candidate_subnets(config, taken)
            if not candidates:
                raise SubnetsExhausted(config, len(taken))
            subnet = candidates[rng.randrange(len(candidates))]
        lease = registry.lease_grant(ttl)
        if registry.create_if_absent(subnet_key(subnet), value, lease):
            return SubnetLease(subnet, attrs, lease, clock() + ttl)
        try:
            registry.lease_revoke(lease)
        except LeaseNotFound:
            pass
        previous = None
    raise LeaseConflict(retries)


def renewal_delay(lease: SubnetLease, margin: float = RENEW_MARGIN, now: float | None = None) -> float | None:
    """Seconds until renewal is due (0 = now); None for a reservation."""
    if lease.reservation:
        return None
    now = time.time() if now is None else now
    return max(0.0, lease.expires_at - margin - now)


def renew_lease(registry: Registry, lease: SubnetLease, *, ttl: int = SUBNET_TTL,
                margin: float = RENEW_MARGIN, clock: Callable[[], float] | None = None,
                force: bool = False) -> SubnetLease:
    """Renew when less than ``margin`` remains (or ``force``): grant a new lease of ``ttl``
    and plain-put the same key with it. The old registry lease expires with no keys.
    Returns the lease unchanged when nothing was due (and always for reservations).
    """
    now = (clock or registry.clock)()
    if lease.reservation or (not force and renewal_delay(lease, margin, now) > 0):
        return lease
    new_id = registry.lease_grant(ttl)
    registry.put(lease.key, lease.attrs.to_json(), lease=new_id)
    return replace(lease, lease_id=new_id, expires_at=now + ttl)
