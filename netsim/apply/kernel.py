"""Program one planned namespace into the kernel with pyroute2 (and iptables-restore).

Each step is idempotent ("make it so"): an object that already exists as planned is
left alone, so re-applying a plan is harmless.
"""
from __future__ import annotations

import subprocess

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import ApplyError
from ..plan.state import Link, Namespace
from . import netns

EEXIST = 17
HAIRPIN = 1   # IFLA_BRPORT_MODE value for hairpin (reflective relay) on a bridge port
RESTORE = {"nft": "iptables-nft-restore", "legacy": "iptables-legacy-restore"}


def create_links(ns: Namespace, ipr: IPRoute) -> None:
    """Bridges first, then veth pairs (the peer end goes straight into its namespace)."""
    for link in sorted(ns.links, key=lambda l: l.kind != "bridge"):
        try:
            if link.kind == "bridge":
                ipr.link("add", ifname=link.name, kind="bridge", mtu=link.mtu)
            elif link.kind == "veth":
                ipr.link("add", ifname=link.name, kind="veth", mtu=link.mtu,
                         peer={"ifname": link.peer, "net_ns_fd": netns.path(link.peer_netns),
                               "mtu": link.peer_mtu or link.mtu})
            else:
                raise ApplyError(f"{ns.name}: link {link.name}", f"unknown kind {link.kind!r}")
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise ApplyError(f"{ns.name}: create {link.kind} {link.name}", exc.args[1] if len(exc.args) > 1 else str(exc)) from None
    for link in ns.links:
        idx = _index(ipr, link, ns)
        if link.master:
            ipr.link("set", index=idx, master=_index_by_name(ipr, link.master, ns))
        if link.hairpin:
            ipr.brport("set", index=idx, mode=HAIRPIN)


def configure(ns: Namespace, ipr: IPRoute) -> None:
    """Bring every link up, then add addresses and routes."""
    for link in ipr.get_links():
        if not link["flags"] & 1:          # IFF_UP
            ipr.link("set", index=link["index"], state="up")
    for addr in ns.addresses:
        ip, plen = addr.cidr.split("/")
        try:
            ipr.addr("add", index=_index_by_name(ipr, addr.dev, ns), address=ip, prefixlen=int(plen))
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise ApplyError(f"{ns.name}: address {addr.cidr} on {addr.dev}", str(exc)) from None
    for route in ns.routes:
        spec = {"oif": _index_by_name(ipr, route.dev, ns)}
        if route.dst != "default":
            spec["dst"] = route.dst
        else:
            spec["dst"] = "0.0.0.0/0"
        if route.via:
            spec["gateway"] = route.via
        if route.onlink:
            spec["flags"] = 4              # RTNH_F_ONLINK
        try:
            ipr.route("replace", **spec)
        except NetlinkError as exc:
            raise ApplyError(f"{ns.name}: route {route.dst} via {route.via or route.dev}", str(exc)) from None


def set_sysctls(ns: Namespace) -> None:
    for key, value in ns.sysctls:
        try:
            netns.write_sysctl(ns.name, key, value)
        except OSError as exc:
            raise ApplyError(f"{ns.name}: sysctl {key}={value}", exc.strerror or str(exc)) from None


def restore_iptables(ns_name: str, text: str, backend: str) -> None:
    """Load ``text`` with ``iptables-restore --noflush`` inside the namespace."""
    if not text:
        return
    cmd = ["ip", "netns", "exec", ns_name, RESTORE[backend], "--noflush"]
    done = subprocess.run(cmd, input=text, text=True, capture_output=True)
    if done.returncode != 0:
        raise ApplyError(f"{ns_name}: {RESTORE[backend]}", done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")


def _index(ipr: IPRoute, link: Link, ns: Namespace) -> int:
    return _index_by_name(ipr, link.name, ns)


def _index_by_name(ipr: IPRoute, name: str, ns: Namespace) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise ApplyError(f"{ns.name}", f"interface {name} does not exist")
    return found[0]
