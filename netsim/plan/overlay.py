"""The overlay's desired state, flannel style, as pure functions.

For each remote lease a node programs, in flannel's order:

* vxlan:   neighbour ``<remote>.0 → VtepMAC`` on flannel.1, FDB ``VtepMAC → PublicIP``,
           then route ``<remote subnet> via <remote>.0 dev flannel.1 onlink``
           (the route last, so the kernel never has to resolve the on-link gateway);
* host-gw: route ``<remote subnet> via <PublicIP> dev eth0``
           (also vxlan with DirectRouting, for peers on the same L2 segment).

The flannel agent applies these from live leases; the planner uses them to show what
the lab will look like.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from .. import naming

VXLAN_OVERHEAD = 50


@dataclass(frozen=True)
class Neighbour:
    dev: str
    ip: str
    mac: str


@dataclass(frozen=True)
class Fdb:
    dev: str
    mac: str
    dst: str


@dataclass(frozen=True)
class PeerRoute:
    dst: str
    via: str
    dev: str
    onlink: bool = False


@dataclass(frozen=True)
class PeerPlan:
    """What one remote lease adds to a node (removed again when the lease goes)."""

    subnet: str
    public_ip: str
    neighbours: tuple[Neighbour, ...] = ()
    fdb: tuple[Fdb, ...] = ()
    routes: tuple[PeerRoute, ...] = ()


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    vni: int
    port: int
    local: str          # the node's PublicIP
    uplink: str
    mtu: int
    address: str        # "<own subnet network address>/32"
    learning: bool = False


def pod_mtu(backend: str, underlay_mtu: int) -> int:
    return underlay_mtu - VXLAN_OVERHEAD if backend == "vxlan" else underlay_mtu


def vxlan_device(own: IPv4Network, public_ip: str, underlay_mtu: int, vni: int = 1,
                 port: int = 8472, uplink: str = naming.UPLINK) -> VxlanDevice:
    return VxlanDevice(f"flannel.{vni}", vni, port, public_ip, uplink,
                       underlay_mtu - VXLAN_OVERHEAD, f"{own.network_address}/32")


def peer_plan(backend: str, subnet: IPv4Network, public_ip: str, vtep_mac: str | None = None,
              vni: int = 1, direct: bool = False, uplink: str = naming.UPLINK) -> PeerPlan:
    """The neighbour, FDB and route entries for one remote lease.

    ``direct`` is DirectRouting's answer for this peer: it sits on our L2 segment, so
    vxlan skips encapsulation and routes via its PublicIP, as host-gw does.
    """
    if backend == "host-gw" or (backend == "vxlan" and direct):
        return PeerPlan(str(subnet), public_ip, routes=(PeerRoute(str(subnet), public_ip, uplink),))
    if backend != "vxlan":
        raise ValueError(f"unsupported backend {backend!r}")
    if not vtep_mac:
        raise ValueError(f"lease {subnet} has no VtepMAC")
    dev = f"flannel.{vni}"
    gw = str(subnet.network_address)
    return PeerPlan(str(subnet), public_ip,
                    neighbours=(Neighbour(dev, gw, vtep_mac),),
                    fdb=(Fdb(dev, vtep_mac, public_ip),),
                    routes=(PeerRoute(str(subnet), gw, dev, onlink=True),))


def on_link(public_ip: str, underlay: IPv4Network) -> bool:
    """DirectRouting's test: is the peer reachable without a gateway?"""
    return IPv4Address(public_ip) in underlay


def subnet_env(network: IPv4Network, own: IPv4Network, mtu: int, ipmasq: bool = True) -> str:
    """flannel's /run/flannel/subnet.env for a node owning ``own``."""
    return (f"FLANNEL_NETWORK={network}\n"
            f"FLANNEL_SUBNET={own.network_address + 1}/{own.prefixlen}\n"
            f"FLANNEL_MTU={mtu}\n"
            f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n")


def parse_subnet_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def vtep_mac(seed: str) -> str:
    """A locally administered unicast MAC (flannel's rule: first octet &0xfe | 0x02).

    netsim derives it from the node's identity so plans are reproducible; flannel draws
    it at random when it creates flannel.1, and keeps it while the device exists.
    """
    import hashlib
    raw = bytearray(hashlib.sha256(seed.encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)
