"""kube-proxy's IPVS mode on one node's kernel: the ``Backend`` the agent drives.

Every sync renders the desired state (``netsim.proxy.ipvs.render``) and makes the kernel
match it by difference, as the IPVS proxier does on each ``syncProxyRules``:

* ``kube-ipvs0`` (dummy, left down) gets the missing service addresses, loses stale ones;
* the ipsets are created if absent, then changed member by member in one ``ipset restore``;
* the remaining iptables rules go in with one ``iptables-restore --noflush`` (the built-in
  jumps are ensured on full syncs); the binary follows the lab's ``iptablesBackend``
  (inside user-mode Linux only ``legacy`` works). A partial sync (``changed`` given) skips
  the restore when the text is what it last loaded and diffs the sets against what it last
  wrote, so an endpoint change usually costs no process at all; a full sync re-reads and
  rewrites everything;
* virtual and real servers are programmed over generic netlink with pyroute2's ``IPVS``:
  a virtual server is added, changed in place (scheduler, persistence) or deleted; a real
  server is added, and one that went away is *gracefully* terminated as upstream's
  ``GracefulTerminationManager`` does: deleted at once if it has no connections (or is
  UDP), otherwise set to weight 0 and deleted by a background check once
  ``ActiveConn + InactConn == 0`` (every ``graceful_period`` seconds, upstream 60), or
  after ``grace`` seconds if that option is given; an endpoint that comes back while
  draining gets weight 1 again.

pyroute2's ``IPVSDest`` defaults to direct routing (``fwd_method`` 3); kube-proxy uses
masquerade, so every real server is written with ``fwd_method=0``.

Options (``--backend-opt``): ``scheduler`` (rr, wrr, lc, sh, …), ``strict_arp`` (1/0, default
1: the lab answers ARP for LB IPs from an L2 announcer, so nodes must not answer for the
addresses on kube-ipvs0, which is what MetalLB asks of IPVS mode), ``graceful_period`` and
``grace`` (seconds).
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .backend import SyncFailed, SyncResult
from .ipvs import (DUMMY_DEVICE, FLAG_HASHED, FWD_MASQ, IPSET_NAMES, VirtualServer, jump_rules, render,
                   NAT_CHAINS, FILTER_CHAINS)
from .model import NodeContext, ServicePort

BINARIES = {"nft": ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"),
            "legacy": ("iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")}
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
# Chains only IPVS mode has: their presence says the shared-name chains are IPVS mode's too.
IPVS_ONLY_CHAINS = {"nat": ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"),
                    "filter": ("KUBE-NODE-PORT", "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER",
                               "KUBE-IPVS-OUT-FILTER")}
NO_IPVS = ("this kernel has no IPVS (ip_vs module); run the lab in user-mode Linux "
           "(netsim run TOPOLOGY, or netsim kernel run -- CMD) or on a kernel with ip_vs")


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _truthy(value: str | bool | None, default: bool) -> bool:
    if value is None:
        return default
    return value if isinstance(value, bool) else value.lower() not in ("0", "false", "no", "off", "")


class Backend:
    mode = "ipvs"

    def __init__(self, node: NodeContext, iptables_backend: str = "nft", scheduler: str | None = None,
                 strict_arp: str | None = None, graceful_period: str | None = None, grace: str | None = None,
                 **options: str):
        self.node = replace(node, ipvs_scheduler=scheduler or node.ipvs_scheduler,
                            ipvs_strict_arp=_truthy(strict_arp, node.ipvs_strict_arp))
        self.iptables_backend = iptables_backend
        self.iptables, self.restore, self.save = BINARIES[iptables_backend]
        self.graceful_period = float(graceful_period) if graceful_period else 60.0
        self.grace = float(grace) if grace else None
        self.kernel = kernel_version()
        self._ipvs = None
        self._lock = threading.Lock()
        self._sets_written: dict[str, set[str]] | None = None    # ipset members last written
        self._iptables_written: str | None = None                # iptables-restore text last loaded
        self._servers_written: dict[tuple, dict] | None = None   # virtual servers as last left in the kernel
        self._bound: set[str] | None = None                      # kube-ipvs0's addresses as last left
        self._local: tuple[str, ...] | None = None               # the node's addresses (NodePort VIPs)
        self.draining: dict[tuple, float] = {}        # (vs key, "ip:port") → when weight 0 was set
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- netlink handles ------------------------------------------------------------------
    @property
    def ipvs(self):
        if self._ipvs is None:
            from pyroute2 import IPVS
            try:
                self._ipvs = IPVS()
            except Exception as exc:             # no "IPVS" generic netlink family
                raise SyncFailed(f"{NO_IPVS} ({type(exc).__name__}: {exc})") from None
        return self._ipvs

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        self.ipvs                                    # fail early, with the reason, without IPVS
        for path, value in self.sysctls():
            try:
                Path("/proc/sys", path).write_text(value)
            except OSError as exc:
                raise SyncFailed(f"cannot set {path}={value}: {exc.strerror}") from None
        self._ensure_dummy()
        if self._thread is None:
            self._thread = threading.Thread(target=self._graceful_loop, name="ipvs-graceful", daemon=True)
            self._thread.start()

    def sysctls(self):
        from .ipvs import sysctls
        return sysctls(self.node, self.kernel)

    def _ensure_dummy(self) -> int:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=DUMMY_DEVICE)
            if not found:
                try:
                    ipr.link("add", ifname=DUMMY_DEVICE, kind="dummy")
                except Exception as exc:
                    raise SyncFailed(f"cannot create {DUMMY_DEVICE} (dummy): {exc}") from None
                found = ipr.link_lookup(ifname=DUMMY_DEVICE)
            return found[0]

    # -- sync ---------------------------------------------------------------------------------
    def local_addresses(self) -> tuple[str, ...]:
        """Every local IPv4 address except loopback and those on kube-ipvs0 (the NodePort
        addresses, upstream's ``GetAllLocalAddressesExcept``), the primary node IP first."""
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            dummy = set(ipr.link_lookup(ifname=DUMMY_DEVICE))
            found = sorted({a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                            if a["index"] not in dummy and not ipaddress.ip_address(a.get_attr("IFA_ADDRESS")).is_loopback},
                           key=ipaddress.ip_address)
        primary = [ip for ip in self.node.node_ips if ip in found]
        return tuple(primary + [ip for ip in found if ip not in primary])

    def sync(self, ports: Sequence[ServicePort], changed: set[str] | None) -> SyncResult:
        full = changed is None
        # A partial sync trusts what this backend last left in the kernel: with thousands of
        # Services, dumping kube-ipvs0's addresses costs more than the change itself.
        if full or self._local is None:
            self._local = self.local_addresses()
        node = replace(self.node, node_ips=self._local or self.node.node_ips)
        st = render(ports, node, self.kernel)
        written = 0
        with self._lock:
            index = self._ensure_dummy()
            try:
                written += self._sync_ipsets(st, full)
                if full or st.iptables != self._iptables_written:
                    self._iptables_written = None
                    done = subprocess.run([self.restore, "--noflush", "--counters"], input=st.iptables,
                                          text=True, capture_output=True)
                    if done.returncode != 0:
                        raise SyncFailed(f"{self.restore}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
                    self._iptables_written = st.iptables
                if full:
                    self.ensure_jumps()
            except SyncFailed:
                self._sets_written = None
                self._iptables_written = None
                raise
            if full or self._bound is None:
                self._bound = self._addresses(index)
            written += self._bind(index, st.bind_addresses, add=True)
            try:
                written += self._sync_servers(st.virtual_servers, full)
            except SyncFailed:
                self._servers_written = None
                raise
            except Exception as exc:
                self._servers_written = None
                raise SyncFailed(f"IPVS netlink: {type(exc).__name__}: {exc}") from None
            written += self._bind(index, st.bind_addresses, add=False)
        return SyncResult(full=full, rules=len(st.virtual_servers) + st.real_server_count, written=written)

    @staticmethod
    def _addresses(index: int) -> set[str]:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=socket.AF_INET)}

    def _bind(self, index: int, wanted: Sequence[str], add: bool) -> int:
        """Add the missing addresses (``add``) or remove the superfluous ones from kube-ipvs0,
        against ``self._bound`` (what is there), which it keeps up to date."""
        from pyroute2 import IPRoute
        have = self._bound if self._bound is not None else self._addresses(index)
        todo = sorted(set(wanted) - have) if add else sorted(have - set(wanted))
        if todo:
            try:
                with IPRoute() as ipr:
                    for ip in todo:
                        ipr.addr("add" if add else "del", index=index, address=ip, prefixlen=32)
                        (have.add if add else have.discard)(ip)
            except Exception:
                self._bound = None                 # unsure what is there: the next sync looks
                raise
        self._bound = have
        return len(todo)

    def _sync_ipsets(self, st, full: bool) -> int:
        """Members in, members out, in one ``ipset restore``. A full sync diffs against
        ``ipset save``; a partial one against what this backend last wrote, and runs nothing
        when no member changed (so an endpoint change is netlink only, unless it touches
        KUBE-LOOP-BACK)."""
        current = self._saved_ipsets() if full or self._sets_written is None else self._sets_written
        lines = [f"create {s.name} {s.type} {s.create_options} -exist" for s in st.ipsets]
        n = 0
        for s in st.ipsets:
            have = current.get(s.name, set())
            want = set(s.entries)
            lines += [f"del {s.name} {e}" for e in sorted(have - want)]
            lines += [f"add {s.name} {e}" for e in sorted(want - have)]
            n += len(have ^ want)
        if n or full or self._sets_written is None:
            done = subprocess.run(["ipset", "restore"], input="\n".join(lines) + "\n", text=True,
                                  capture_output=True)
            if done.returncode != 0:
                raise SyncFailed(f"ipset restore: {done.stderr.strip()}")
        self._sets_written = {s.name: set(s.entries) for s in st.ipsets}
        return n

    @staticmethod
    def _saved_ipsets() -> dict[str, set[str]]:
        done = subprocess.run(["ipset", "save"], text=True, capture_output=True)
        sets: dict[str, set[str]] = {}
        for line in done.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[1] in IPSET_NAMES:
                if words[0] == "create":
                    sets.setdefault(words[1], set())
                elif words[0] == "add" and len(words) >= 3:
                    sets.setdefault(words[1], set()).add(words[2])
        return sets

    def ensure_jumps(self) -> int:
        """kube-proxy's ``EnsureRule(Prepend, …)`` for each jump from a built-in chain, batched:
        one ``iptables-save`` per table to see which are there, one restore that inserts the
        missing ones (the target chains exist: the main restore declared them). One process
        per table instead of a ``-C`` per rule matters where a process start is slow (UML)."""
        missing: dict[str, list[str]] = {}
        for table in sorted({t for t, _, _ in jump_rules()}):
            saved = subprocess.run([self.save, "-t", table], text=True, capture_output=True).stdout
            have = set(saved.splitlines())
            for t, chain, words in jump_rules():
                if t != table:
                    continue
                rule = f"{chain} " + " ".join(f'"{w}"' if " " in w else w for w in words)
                if f"-A {rule}" not in have:
                    missing.setdefault(table, []).append(f"-I {rule}")
        if not missing:
            return 0
        text = "".join(f"*{t}\n" + "".join(r + "\n" for r in rules) + "COMMIT\n" for t, rules in missing.items())
        done = subprocess.run([self.restore, "--noflush"], input=text, text=True, capture_output=True)
        if done.returncode != 0:
            raise SyncFailed(f"{self.restore} (jumps): {done.stderr.strip()}")
        return sum(len(r) for r in missing.values())

    # -- virtual and real servers ----------------------------------------------------------
    def current_servers(self, ipvs=None) -> dict[tuple, dict]:
        """The kernel's virtual servers: key → {"svc": IPVSService, "sched", "flags", "timeout",
        "dests": {"ip:port": (weight, active, inactive)}}."""
        from pyroute2 import IPVSDest, IPVSService
        ipvs = ipvs or self.ipvs
        out = {}
        for msg in ipvs.service("dump"):
            svc = IPVSService.from_message(msg)
            if svc.get("IPVS_SVC_ATTR_AF") != socket.AF_INET or "addr" not in svc:
                continue                          # fwmark or IPv6 services: not ours
            proto = PROTOCOL_NAMES.get(svc.get("IPVS_SVC_ATTR_PROTOCOL"), "?")
            key = (proto, svc["addr"], svc.get("IPVS_SVC_ATTR_PORT"))
            dests = {}
            for d in ipvs.dest("dump", service=svc):
                dest = IPVSDest.from_message(d)
                dests[f"{dest['addr']}:{dest.get('IPVS_DEST_ATTR_PORT')}"] = (
                    dest.get("IPVS_DEST_ATTR_WEIGHT", 0), dest.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0),
                    dest.get("IPVS_DEST_ATTR_INACT_CONNS", 0))
            out[key] = {"svc": svc, "sched": svc.get("IPVS_SVC_ATTR_SCHED_NAME"),
                        "flags": svc.get("IPVS_SVC_ATTR_FLAGS", {}).get("flags", 0) & ~FLAG_HASHED,
                        "timeout": svc.get("IPVS_SVC_ATTR_TIMEOUT", 0), "dests": dests}
        return out

    @staticmethod
    def _service(key: tuple, vs: VirtualServer | None = None):
        from pyroute2 import IPVSService
        proto, ip, port = key
        kw = dict(addr=ip, port=port, protocol=PROTOCOLS[proto])
        if vs is not None:
            kw.update(sched_name=vs.scheduler, flags={"flags": vs.flags, "mask": 0xFFFF}, timeout=vs.timeout)
        return IPVSService(**kw)

    @staticmethod
    def _dest(address: str, weight: int = 1):
        from pyroute2 import IPVSDest
        ip, port = address.rsplit(":", 1)
        return IPVSDest(addr=ip, port=int(port), weight=weight, fwd_method=FWD_MASQ)

    def _service_dests(self, key: tuple) -> dict[str, tuple]:
        """One virtual server's real servers with their connection counts (one small dump)."""
        from pyroute2 import IPVSDest
        out = {}
        for d in self.ipvs.dest("dump", service=self._service(key)):
            dest = IPVSDest.from_message(d)
            out[f"{dest['addr']}:{dest.get('IPVS_DEST_ATTR_PORT')}"] = (
                dest.get("IPVS_DEST_ATTR_WEIGHT", 0), dest.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0),
                dest.get("IPVS_DEST_ATTR_INACT_CONNS", 0))
        return out

    def _sync_servers(self, wanted: Sequence[VirtualServer], full: bool = True) -> int:
        """Diff the wanted virtual servers against the kernel and write the difference. A full
        sync dumps every virtual server; a partial one diffs against what this backend last
        left in the kernel and dumps only the virtual servers that lose a real server (their
        connection counts decide between deleting it and draining it at weight 0), so one
        changed Service costs the same with 1 or 10,000 in place."""
        if full or self._servers_written is None:
            current = self.current_servers()
        else:
            current = self._servers_written
            for vs in wanted:
                cur = current.get(vs.key)
                if cur is not None and set(cur["dests"]) - {r.address for r in vs.reals}:
                    cur["dests"] = self._service_dests(vs.key)
        n = 0
        now = time.monotonic()
        for vs in wanted:
            cur = current.get(vs.key)
            svc = self._service(vs.key, vs)
            if cur is None:
                self.ipvs.service("add", service=svc)
                cur = {"dests": {}}
                n += 1
            elif (cur["sched"], cur["flags"], cur["timeout"] if cur["flags"] & 1 else 0) != \
                    (vs.scheduler, vs.flags, vs.timeout):
                self.ipvs.service("set", service=svc)       # in place: the VIP never goes away
                n += 1
            want = {r.address: r.weight for r in vs.reals}
            for addr, weight in want.items():
                have = cur["dests"].get(addr)
                if have is None:
                    self.ipvs.dest("add", service=svc, dest=self._dest(addr, weight))
                    n += 1
                elif have[0] != weight:                     # back from draining
                    self.ipvs.dest("set", service=svc, dest=self._dest(addr, weight))
                    n += 1
                self.draining.pop((vs.key, addr), None)
            for addr, (weight, active, inactive) in cur["dests"].items():
                if addr in want or (vs.key, addr) in self.draining:
                    continue
                n += self._graceful_delete(vs.key, svc, addr, active + inactive, now)
        keys = {vs.key for vs in wanted}
        for key in current:
            if key not in keys:
                self.ipvs.service("del", service=self._service(key))
                for k in [k for k in self.draining if k[0] == key]:
                    del self.draining[k]
                n += 1
        self._servers_written = {
            vs.key: {"sched": vs.scheduler, "flags": vs.flags, "timeout": vs.timeout,
                     "dests": {**{addr: (0, 0, 0) for (key, addr) in self.draining if key == vs.key},
                               **{r.address: (r.weight, 0, 0) for r in vs.reals}}}
            for vs in wanted}
        return n

    def _graceful_delete(self, key: tuple, svc, addr: str, conns: int, now: float) -> int:
        """``GracefulDeleteRS``: delete now if nothing uses it (UDP/SCTP: always), else weight 0."""
        if conns == 0 or key[0] != "TCP":
            self.ipvs.dest("del", service=svc, dest=self._dest(addr))
            return 1
        self.ipvs.dest("set", service=svc, dest=self._dest(addr, 0))
        self.draining[(key, addr)] = now
        return 1

    def check_draining(self, ipvs=None) -> int:
        """Delete the weight-0 real servers that have no connections left (or whose grace ran
        out); returns how many were deleted. ``ipvs``: the caller thread's own socket."""
        if not self.draining:
            return 0
        ipvs = ipvs or self.ipvs
        with self._lock:
            current = self.current_servers(ipvs)
            n = 0
            now = time.monotonic()
            for (key, addr), since in list(self.draining.items()):
                cur = current.get(key)
                dest = cur["dests"].get(addr) if cur else None
                if dest is None:
                    del self.draining[(key, addr)]
                    continue
                expired = self.grace is not None and now - since >= self.grace
                if dest[1] + dest[2] == 0 or expired:
                    ipvs.dest("del", service=self._service(key), dest=self._dest(addr))
                    del self.draining[(key, addr)]
                    if self._servers_written is not None and key in self._servers_written:
                        self._servers_written[key]["dests"].pop(addr, None)
                    n += 1
            return n

    def _graceful_loop(self) -> None:
        """upstream re-checks its graceful-termination list every minute; a pyroute2 socket
        belongs to the thread that made it, so this thread opens its own (in the same netns)."""
        from pyroute2 import IPVS
        with IPVS() as ipvs:
            while not self._stop.wait(self.graceful_period):
                try:
                    self.check_draining(ipvs)
                except Exception as exc:            # reported; the next sync shows kernel trouble
                    print(f"kube-proxy: graceful termination check failed: {exc}", file=sys.stderr, flush=True)

    # -- cleanup (kube-proxy --cleanup for IPVS mode) -----------------------------------------
    def cleanup(self) -> str:
        """Remove kube-ipvs0, every IPVS virtual server, IPVS mode's jumps, chains and ipsets.
        Chains whose names iptables mode shares (KUBE-SERVICES, KUBE-POSTROUTING, …) are only
        removed when a chain only IPVS mode has shows they are IPVS mode's."""
        self._stop.set()
        removed = []
        chains = self._chains()
        ours = any(c in chains.get(t, ()) for t, names in IPVS_ONLY_CHAINS.items() for c in names)
        jumps = 0
        for table, chain, words in jump_rules():
            target = words[-1]
            if target not in IPVS_ONLY_CHAINS.get(table, ()) and not ours:
                continue
            while self._ipt(table, "-D", chain, *words).returncode == 0:
                jumps += 1
        if jumps:
            removed.append(f"{jumps} jumps")
        for table, names in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
            mine = [c for c in names if c in chains.get(table, ()) and (ours or c in IPVS_ONLY_CHAINS[table])]
            if not mine:
                continue
            text = "\n".join([f"*{table}"] + [f":{c} - [0:0]" for c in mine] + [f"-X {c}" for c in mine]
                             + ["COMMIT"]) + "\n"
            done = subprocess.run([self.restore, "--noflush"], input=text, text=True, capture_output=True)
            if done.returncode != 0:
                raise SyncFailed(f"{self.restore} (cleanup of {table}): {done.stderr.strip()}")
            removed.append(f"{len(mine)} {table} chains")
        sets = [name for name in self._saved_ipsets()]
        for name in sets:
            subprocess.run(["ipset", "destroy", name], capture_output=True)
        if sets:
            removed.append(f"{len(sets)} ipsets")
        servers = 0
        try:
            ipvs = self.ipvs
        except SyncFailed:
            ipvs = None                              # no IPVS in this kernel: no servers either
        if ipvs is not None:
            with self._lock:
                for key in self.current_servers():
                    ipvs.service("del", service=self._service(key))
                    servers += 1
            if servers:
                removed.append(f"{servers} virtual servers")
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=DUMMY_DEVICE)
            if found:
                ipr.link("del", index=found[0])
                removed.append(DUMMY_DEVICE)
        self.draining.clear()
        self._sets_written = self._iptables_written = self._servers_written = self._bound = self._local = None
        return ", ".join(removed) if removed else "nothing"

    def _chains(self) -> dict[str, set[str]]:
        out = {}
        for table in ("nat", "filter"):
            saved = subprocess.run([self.save, "-t", table], text=True, capture_output=True)
            out[table] = set(re.findall(r"^:(KUBE-\S+) ", saved.stdout, re.M)) if saved.returncode == 0 else set()
        return out

    def _ipt(self, table: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.iptables, "-w", "-t", table, *args], capture_output=True, text=True)
