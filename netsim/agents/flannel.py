"""A flannel-like node agent (flanneld with the etcd subnet manager), one per node.

It runs as a process inside its node's network namespace, so killing it is a real fault:

1. reads the network config from the registry (``/coreos.com/network/config``);
2. creates ``flannel.<VNI>`` (vxlan backend), keeping an existing device and its MAC;
3. acquires a subnet lease the way flanneld does (its own lease by PublicIP, else the
   subnet from a previous subnet.env, else random among the first free ones);
4. writes subnet.env, puts ``<subnet>.0/32`` on flannel.1 and installs the ip-masq
   (FLANNEL-POSTRTG) and forward (FLANNEL-FWD) rules;
5. lists the leases, programs every peer, then *watches* for changes from the next
   revision: a PUT (re)programs the peer, a DELETE (or expiry) removes it;
6. renews its own lease the flannel way (fresh full-TTL lease, plain put) when less than
   the renew margin remains; exits when its own lease is deleted, as flanneld does.

If the registry goes away the data plane stays as it is; the agent retries with backoff,
then re-lists and resumes. A status file records each peer and when it was programmed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netsim.plan.masq import flannel_chains, flannel_jumps, jump_block
from netsim.plan.overlay import (PeerPlan, on_link, parse_subnet_env, peer_plan, pod_mtu,
                                 subnet_env, vtep_mac)
from netsim.registry import Compacted, RegistryError, Unavailable, open_registry
from netsim.registry.flannel import (CONFIG_KEY, SUBNETS_PREFIX, CorruptLease, LeaseAttrs,
                                     NetworkConfig, SubnetLease, SubnetsExhausted, acquire_lease,
                                     lease_from_kv, parse_subnet_key, renew_lease, renewal_delay)

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 4
IPTABLES_RESYNC = 5.0            # seconds, flanneld's --iptables-resync
ENOENT, ESRCH, EEXIST = 2, 3, 17
RESTORE = {"nft": ("iptables-nft-restore", "iptables-nft"),
           "legacy": ("iptables-legacy-restore", "iptables-legacy")}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} flannel: {msg}", file=sys.stderr, flush=True)


class Stop(Exception):
    pass


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.public_ip = str(IPv4Address(args.public_ip))
        self.underlay = IPv4Network(args.underlay)
        self.ipr = IPRoute()
        self.reg = None
        self.config: NetworkConfig | None = None
        self.lease: SubnetLease | None = None
        self.peers: dict[str, tuple[SubnetLease, PeerPlan]] = {}   # subnet → lease and what we programmed
        self.rules_checked = time.monotonic()
        self.status: dict = {"node": args.node, "public_ip": self.public_ip, "peers": {}, "skipped": {}}

    # -- start-up -------------------------------------------------------------------
    def run(self) -> None:
        self.reg = self._retry(lambda: open_registry(self.args.registry), "open the registry")
        self.config = self._retry(self._read_config, "read the network config")
        backend = self.config.backend
        mac = None
        if backend.type == "vxlan":
            mac = self.ensure_vxlan()
        elif backend.type != "host-gw":
            raise SystemExit(f"flannel: error: backend {backend.type!r} is not supported (vxlan, host-gw)")
        attrs = (LeaseAttrs.vxlan(self.public_ip, mac, backend.vni) if mac
                 else LeaseAttrs(IPv4Address(self.public_ip), backend.type))
        previous = self._previous_subnet()
        claimed_at = time.time()     # before the claim: peers may see the lease before we return
        self.lease = self._retry(lambda: acquire_lease(
            self.reg, self.config, self.public_ip, attrs, ttl=self.args.lease_ttl,
            rng=random.SystemRandom(), previous=previous), "acquire a subnet lease")
        log(f"acquired lease {self.lease.subnet} (registry lease {self.lease.lease_id})")
        self.status.update(subnet=str(self.lease.subnet), acquired_at=claimed_at, backend=backend.type)
        if mac:
            self.configure_vxlan_address()
        mtu = pod_mtu(backend.type, self._uplink_mtu()) if not backend.mtu else backend.mtu - (50 if backend.type == "vxlan" else 0)
        write_atomic(Path(self.args.subnet_file), subnet_env(self.config.network, self.lease.subnet, mtu, self.args.ip_masq))
        if self.args.ip_masq:
            self.install_rules()
        revision = self.resync()
        self.write_status()
        if self.args.ready_file:
            write_atomic(Path(self.args.ready_file), json.dumps({"pid": os.getpid(), "subnet": str(self.lease.subnet)}))
        # Start-up garbage is long-lived; freezing it keeps full collections short, so
        # agents that all handle the same event do not stall together (~100 ms seen).
        gc.freeze()
        self.watch(revision)

    def _read_config(self) -> NetworkConfig:
        kv = self.reg.get(CONFIG_KEY)
        if kv is None:
            raise RegistryError(f"no network config at {CONFIG_KEY} yet")
        return NetworkConfig.parse(kv.value)

    def _previous_subnet(self) -> IPv4Network | None:
        try:
            env = parse_subnet_env(Path(self.args.subnet_file).read_text())
            return IPv4Network(env["FLANNEL_SUBNET"], strict=False)
        except (OSError, KeyError, ValueError):
            return None

    def _uplink_mtu(self) -> int:
        return self.ipr.get_links(self._index(self.args.iface))[0].get_attr("IFLA_MTU")

    # -- the VXLAN device -------------------------------------------------------------
    def ensure_vxlan(self) -> str:
        b = self.config.backend
        name = f"flannel.{b.vni}"
        found = self.ipr.link_lookup(ifname=name)
        if found:
            mac = self.ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS")
            log(f"reusing {name} (VtepMAC {mac})")
            return mac
        mac = self.args.vtep_mac or vtep_mac(f"{self.args.node}/{self.public_ip}/{random.random()}")
        uplink = self._index(self.args.iface)
        self.ipr.link("add", ifname=name, kind="vxlan", vxlan_id=b.vni, vxlan_local=self.public_ip,
                      vxlan_link=uplink, vxlan_port=b.udp_port, vxlan_learning=1 if b.learning else 0,
                      address=mac, mtu=(b.mtu or self._uplink_mtu()) - 50)
        idx = self._index(name)
        self.ipr.link("set", index=idx, state="up")
        log(f"created {name}: VNI {b.vni}, dstport {b.udp_port}, local {self.public_ip}, VtepMAC {mac}")
        return mac

    def configure_vxlan_address(self) -> None:
        """``<subnet>.0/32`` on flannel.1; any other address inside the Network is removed."""
        idx = self._index(f"flannel.{self.config.backend.vni}")
        want = str(self.lease.subnet.network_address)
        for addr in self.ipr.get_addr(index=idx, family=2):
            ip = addr.get_attr("IFA_ADDRESS")
            if ip != want and IPv4Address(ip) in self.config.network:
                self.ipr.addr("del", index=idx, address=ip, prefixlen=addr["prefixlen"])
        try:
            self.ipr.addr("add", index=idx, address=want, prefixlen=32)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    # -- iptables ---------------------------------------------------------------------
    def install_rules(self) -> None:
        restore, iptables = RESTORE[self.args.iptables_backend]
        text = flannel_chains(self.config.network, self.lease.subnet)
        for table, chain, jump in flannel_jumps():
            probe = subprocess.run([iptables, "-t", table, "-C", chain] + jump, capture_output=True)
            if probe.returncode != 0:
                text += jump_block(table, chain, jump)
        done = subprocess.run([restore, "--noflush"], input=text, text=True, capture_output=True)
        if done.returncode != 0:
            raise SystemExit(f"flannel: error: {restore}: {done.stderr.strip()}")

    def rules_missing(self) -> bool:
        """flanneld's --iptables-resync check: is any jump, or the last rule of a chain, gone?"""
        _, iptables = RESTORE[self.args.iptables_backend]
        checks = [(t, c, w) for t, c, w in flannel_jumps()]
        table = ""
        last: dict[str, tuple[str, list[str]]] = {}
        for line in flannel_chains(self.config.network, self.lease.subnet).splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A "):
                words = shlex.split(line)
                last[words[1]] = (table, words[2:])
        checks += [(t, chain, w) for chain, (t, w) in last.items()]
        return any(subprocess.run([iptables, "-t", t, "-C", c] + w, capture_output=True).returncode
                   for t, c, w in checks)

    # -- peers ------------------------------------------------------------------------
    def resync(self) -> int:
        """List every lease and make the kernel match it (flannel's Reset); returns the revision."""
        snapshot = self.reg.range(SUBNETS_PREFIX)
        seen = set()
        for kv in snapshot:
            subnet = self.handle_put(kv)
            if subnet:
                seen.add(subnet)
        for subnet in [s for s in self.peers if s not in seen]:
            self.remove_peer(subnet)
        return snapshot.revision

    def handle_put(self, kv) -> str | None:
        subnet = parse_subnet_key(kv.key)
        if subnet is None:
            return None                              # not a subnet key: flannel skips it
        try:
            lease = lease_from_kv(kv)
        except CorruptLease as exc:
            log(f"skipping corrupt lease {kv.key}: {exc}")
            self.status["skipped"][str(subnet)] = str(exc)
            self.write_status()
            return None
        self.status["skipped"].pop(str(subnet), None)
        if subnet == self.lease.subnet:
            if lease.attrs.public_ip == self.lease.attrs.public_ip:
                self.lease = SubnetLease(subnet, lease.attrs, kv.lease, self.lease.expires_at)
            return None
        if lease.attrs.backend_type != self.config.backend.type:
            return None                              # watchers ignore other backends' leases
        self.add_peer(lease)
        return str(subnet)

    def add_peer(self, lease: SubnetLease) -> None:
        key = str(lease.subnet)
        direct = self.config.backend.direct_routing and on_link(str(lease.attrs.public_ip), self.underlay)
        plan = peer_plan(self.config.backend.type, lease.subnet, str(lease.attrs.public_ip),
                         lease.attrs.vtep_mac, self.config.backend.vni, direct, self.args.iface)
        old = self.peers.get(key)
        if old and old[1] != plan:
            self.unprogram(old[1])
        self.program(plan)
        self.peers[key] = (lease, plan)
        self.status["peers"][key] = {"public_ip": plan.public_ip, "programmed_at": time.time(),
                                     "mode": "direct" if plan.fdb == () else self.config.backend.type}
        self.write_status()
        log(f"programmed peer {key} via {plan.public_ip}")

    def remove_peer(self, subnet: str) -> None:
        old = self.peers.pop(subnet, None)
        if old:
            self.unprogram(old[1])
            log(f"removed peer {subnet}")
            self.status.setdefault("removed", {})[subnet] = time.time()
        self.status["peers"].pop(subnet, None)
        self.write_status()

    def program(self, plan: PeerPlan) -> None:
        """Neighbour, then FDB, then route; undo what was done if a later step fails."""
        done = []
        try:
            for n in plan.neighbours:
                self.ipr.neigh("replace", dst=n.ip, lladdr=n.mac, ifindex=self._index(n.dev), state=NUD_PERMANENT)
                done.append(("neigh", n))
            for f in plan.fdb:
                self.ipr.fdb("replace", ifindex=self._index(f.dev), lladdr=f.mac, dst=f.dst,
                             state=NUD_PERMANENT, flags=NTF_SELF)
                done.append(("fdb", f))
            for r in plan.routes:
                self.ipr.route("replace", dst=r.dst, gateway=r.via, oif=self._index(r.dev),
                               flags=RTNH_F_ONLINK if r.onlink else 0)
        except NetlinkError as exc:
            log(f"programming {plan.subnet} failed ({exc}); undoing")
            self.unprogram(PeerPlan(plan.subnet, plan.public_ip,
                                    tuple(x for k, x in done if k == "neigh"),
                                    tuple(x for k, x in done if k == "fdb")))
            raise

    def unprogram(self, plan: PeerPlan) -> None:
        """Delete every entry, each attempted even if another fails."""
        steps = ([lambda n=n: self.ipr.neigh("del", dst=n.ip, lladdr=n.mac, ifindex=self._index(n.dev)) for n in plan.neighbours]
                 + [lambda f=f: self.ipr.fdb("del", ifindex=self._index(f.dev), lladdr=f.mac, dst=f.dst) for f in plan.fdb]
                 + [lambda r=r: self.ipr.route("del", dst=r.dst, gateway=r.via, oif=self._index(r.dev)) for r in plan.routes])
        for step in steps:
            try:
                step()
            except (NetlinkError, KeyError) as exc:
                if getattr(exc, "code", ENOENT) not in (ENOENT, ESRCH):
                    log(f"removing an entry of {plan.subnet} failed: {exc}")

    # -- the watch loop -----------------------------------------------------------------
    def watch(self, revision: int) -> None:
        backoff = 0.1
        watcher = None
        while True:
            try:
                if watcher is None:
                    watcher = self.reg.watch(SUBNETS_PREFIX, start_revision=revision + 1)
                due = renewal_delay(self.lease, self.args.renew_margin)
                batch = watcher.next_batch(timeout=min(due if due is not None else 1.0, 1.0))
                if batch is not None:
                    for ev in batch.events:
                        self.handle_event(ev)
                    revision = batch.revision
                if self.args.ip_masq and time.monotonic() - self.rules_checked > IPTABLES_RESYNC:
                    self.rules_checked = time.monotonic()
                    if self.rules_missing():
                        log("flannel's iptables rules were changed; re-applying them")
                        self.install_rules()
                if renewal_delay(self.lease, self.args.renew_margin) == 0:
                    self.lease = renew_lease(self.reg, self.lease, ttl=self.args.lease_ttl,
                                             margin=self.args.renew_margin)
                    log(f"renewed lease {self.lease.subnet} (registry lease {self.lease.lease_id})")
                backoff = 0.1
            except Compacted:
                log("watch history compacted; re-listing")
                watcher = _close(watcher)
                revision = self.resync()
            except (Unavailable, RegistryError, OSError) as exc:
                log(f"registry unavailable ({exc}); data plane kept, retrying in {backoff:.1f}s")
                watcher = _close(watcher)
                time.sleep(backoff)        # backoff between reconnects, as flanneld's watch does
                backoff = min(backoff * 2, 5.0)
                try:
                    revision = self.resync()
                    self.lease = self._reclaim_if_lost()
                    log("registry back; re-listed and resumed")
                except (Unavailable, RegistryError, OSError):
                    pass

    def _reclaim_if_lost(self) -> SubnetLease:
        """After an outage our key may have expired: take the same subnet back."""
        if self.reg.get(self.lease.key) is not None:
            return self.lease
        log(f"own lease {self.lease.subnet} vanished during the outage; re-acquiring it")
        return acquire_lease(self.reg, self.config, self.public_ip, self.lease.attrs,
                             ttl=self.args.lease_ttl, previous=self.lease.subnet)

    def handle_event(self, ev) -> None:
        if ev.type == "PUT":
            self.handle_put(ev.kv)
            return
        subnet = parse_subnet_key(ev.kv.key)
        if subnet is None:
            return
        if subnet == self.lease.subnet:
            raise Stop(f"own lease {subnet} has been revoked")
        self.status["skipped"].pop(str(subnet), None)
        self.remove_peer(str(subnet))

    # -- helpers ----------------------------------------------------------------------
    def write_status(self) -> None:
        if self.args.status_file:
            write_atomic(Path(self.args.status_file), json.dumps(self.status, indent=1))

    def _index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise KeyError(f"interface {name} not found")
        return found[0]

    def _retry(self, fn, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                return fn()
            except SubnetsExhausted as exc:
                # Not transient: flanneld exits on "out of subnets" instead of retrying.
                raise SystemExit(f"flannel: error: could not {what}: {exc}") from None
            except (RegistryError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(f"flannel: error: could not {what}: {exc}")
                time.sleep(delay)          # retry interval while the registry comes up
                delay = min(delay * 2, 1.0)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _close(watcher):
    if watcher is not None:
        watcher.close()
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netsim.agents.flannel", description="flannel-like node agent")
    p.add_argument("--registry", required=True, help="registry URL (sqlite:///..., etcd+unix://...)")
    p.add_argument("--node", required=True)
    p.add_argument("--public-ip", required=True)
    p.add_argument("--iface", default="eth0")
    p.add_argument("--underlay", required=True, help="the underlay CIDR (DirectRouting's on-link test)")
    p.add_argument("--subnet-file", required=True, help="where to write subnet.env")
    p.add_argument("--status-file")
    p.add_argument("--ready-file")
    p.add_argument("--ip-masq", action="store_true")
    p.add_argument("--iptables-backend", choices=sorted(RESTORE), default="nft")
    p.add_argument("--lease-ttl", type=int, default=86400)
    p.add_argument("--renew-margin", type=int, default=3600)
    p.add_argument("--vtep-mac")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    def stop(signum, frame):
        raise Stop(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent = Agent(args)
    try:
        agent.run()
    except Stop as why:
        log(f"exiting: {why}")
        return 0 if "signal" in str(why) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
