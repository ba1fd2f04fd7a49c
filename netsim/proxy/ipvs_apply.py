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

import errno
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
from .netlink_batch import (IPVS_CMD_DEL_DEST, IPVS_CMD_DEL_SERVICE, IPVS_CMD_NEW_DEST, IPVS_CMD_NEW_SERVICE,
                            IPVS_CMD_SET_DEST, IPVS_CMD_SET_SERVICE, NETLINK_GENERIC, NLM_F_CREATE, NLM_F_EXCL, Batch,
                            ipv4_addresses, ipvs_dest, ipvs_flush, ipvs_service, ipvs_services, proc_real_servers,
                            rtnl_addresses)

BINARIES = {"nft": ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"),
            "legacy": ("iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")}
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
# Chains only IPVS mode has: their presence says the shared-name chains are IPVS mode's too.
IPVS_ONLY_CHAINS = {"nat": ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"),
                    "filter": ("KUBE-NODE-PORT", "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER",
                               "KUBE-IPVS-OUT-FILTER")}
# This thread's netns: /proc/net is the *process's* (main thread's) view, and the graceful
# termination thread may read it while the main thread is elsewhere (tests use setns per thread).
PROC_IP_VS = "/proc/thread-self/net/ip_vs"
NO_IPVS = ("this kernel has no IPVS (ip_vs module); run the lab in user-mode Linux "
           "(netsim run TOPOLOGY, or netsim kernel run -- CMD) or on a kernel with ip_vs")


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


_PROTO_WORD = re.compile(r",(tcp|udp|sctp):")


def _numeric(entry: str) -> str:
    """An ipset entry with its protocol as a number ("10.96.0.1,6:80" for "…,tcp:80"): the
    same element, but ipset then skips a getservbyname() scan of /etc/services per entry,
    which inside user-mode Linux made 10,000 entries take 5.5 s instead of 1 s. ``ipset
    save`` prints the name again, so the diff compares kube-proxy's own spelling."""
    return _PROTO_WORD.sub(lambda m: f",{PROTOCOLS[m.group(1).upper()]}:", entry)


def _vs_name(key: tuple) -> str:
    proto, ip, port = key
    return f"{proto}/{ip}:{port}"


def _service_msg(cmd: int, key: tuple, vs: VirtualServer | None = None) -> bytes:
    """An IPVS service request for virtual server ``key`` (with ``vs``'s settings, or the key only)."""
    proto, ip, port = key
    if vs is None:
        return ipvs_service(cmd, PROTOCOLS[proto], ip, port)
    return ipvs_service(cmd, PROTOCOLS[proto], ip, port, vs.scheduler, vs.flags, vs.timeout)


def _dest_msg(cmd: int, key: tuple, address: str, weight: int = 1) -> bytes:
    """An IPVS real-server request: ``address`` ("ip:port") of virtual server ``key``, masqueraded."""
    proto, ip, port = key
    rip, rport = address.rsplit(":", 1)
    return ipvs_dest(cmd, PROTOCOLS[proto], ip, port, rip, int(rport), weight, FWD_MASQ)


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
        self._family: int | None = None
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

    @property
    def family(self) -> int:
        """The IPVS generic netlink family id (pyroute2 resolved it when it bound)."""
        if self._family is None:
            ipvs = self.ipvs
            self._family = getattr(ipvs, "prid", None) or ipvs.asyncore.prid
        return self._family

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        self.family                                  # fail early, with the reason, without IPVS
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
            found = ipr.link_lookup(ifname=DUMMY_DEVICE)
        return self._kernel_addresses(found[0] if found else -1)[0]

    def _kernel_addresses(self, index: int) -> tuple[tuple[str, ...], set[str]]:
        """From one address dump: the node's addresses (see ``local_addresses``) and the
        addresses on kube-ipvs0 (link ``index``)."""
        addrs = ipv4_addresses()
        found = sorted({ip for i, ip in addrs if i != index and not ipaddress.ip_address(ip).is_loopback},
                       key=ipaddress.ip_address)
        primary = [ip for ip in self.node.node_ips if ip in found]
        return tuple(primary + [ip for ip in found if ip not in primary]), {ip for i, ip in addrs if i == index}

    def sync(self, ports: Sequence[ServicePort], changed: set[str] | None) -> SyncResult:
        full = changed is None
        written = 0
        with self._lock:
            index = self._ensure_dummy()
            # A partial sync trusts what this backend last left in the kernel: with thousands
            # of Services, dumping kube-ipvs0's addresses costs more than the change itself.
            if full or self._local is None or self._bound is None:
                self._local, self._bound = self._kernel_addresses(index)
            st = render(ports, replace(self.node, node_ips=self._local or self.node.node_ips), self.kernel)
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

    def _bind(self, index: int, wanted: Sequence[str], add: bool) -> int:
        """Add the missing addresses (``add``) or remove the superfluous ones from kube-ipvs0,
        against ``self._bound`` (what is there), which it keeps up to date; one netlink batch."""
        have = self._bound
        todo = sorted(set(wanted) - have) if add else sorted(have - set(wanted))
        if todo:
            self._bound = None                     # unsure what is there until the batch is done
            failures = rtnl_addresses(index, todo if add else [], [] if add else todo, DUMMY_DEVICE)
            if failures:
                raise SyncFailed(f"{len(failures)} address change(s) failed, first: {failures[0]}")
            (have.update if add else have.difference_update)(todo)
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
            lines += [f"del {s.name} {_numeric(e)}" for e in sorted(have - want)]
            lines += [f"add {s.name} {_numeric(e)}" for e in sorted(want - have)]
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
    def current_servers(self) -> dict[tuple, dict]:
        """The kernel's virtual servers: key → {"sched", "flags", "timeout", "dests":
        {"ip:port": (weight, active, inactive)}}. The servers come from one lean netlink dump,
        their real servers from one read of /proc/net/ip_vs (``real_servers``): with 10,000 Services, decoding
        through pyroute2 and a dest dump per server would take minutes and, inside a 1 GiB
        user-mode Linux guest, more memory than there is."""
        dests = self.real_servers()
        out = {}
        for svc in ipvs_services(self.family):
            key = (PROTOCOL_NAMES.get(svc["protocol"], "?"), svc["addr"], svc["port"])
            out[key] = {"sched": svc["sched"], "flags": svc["flags"] & ~FLAG_HASHED,
                        "timeout": svc["timeout"], "dests": dests.get(key, {})}
        return out

    @staticmethod
    def real_servers() -> dict[tuple, dict[str, tuple[int, int, int]]]:
        """Every virtual server's real servers with (weight, active, inactive), one read."""
        return proc_real_servers(Path(PROC_IP_VS).read_text())

    def _service_dests(self, key: tuple) -> dict[str, tuple]:
        """One virtual server's real servers with their connection counts (one small dump)."""
        from pyroute2 import IPVSDest, IPVSService
        proto, ip, port = key
        out = {}
        for d in self.ipvs.dest("dump", service=IPVSService(addr=ip, port=port, protocol=PROTOCOLS[proto])):
            dest = IPVSDest.from_message(d)
            out[f"{dest['addr']}:{dest.get('IPVS_DEST_ATTR_PORT')}"] = (
                dest.get("IPVS_DEST_ATTR_WEIGHT", 0), dest.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0),
                dest.get("IPVS_DEST_ATTR_INACT_CONNS", 0))
        return out

    def _sync_servers(self, wanted: Sequence[VirtualServer], full: bool = True) -> int:
        """Diff the wanted virtual servers against the kernel and write the difference in one
        netlink batch. A full sync dumps every virtual server; a partial one diffs against
        what this backend last left in the kernel and dumps only the virtual servers that
        lose a real server (their connection counts decide between deleting it and draining
        it at weight 0), so one changed Service costs the same with 1 or 10,000 in place."""
        if full or self._servers_written is None:
            current = self.current_servers()
        else:
            current = self._servers_written
            for vs in wanted:
                cur = current.get(vs.key)
                if cur is not None and set(cur["dests"]) - {r.address for r in vs.reals}:
                    cur["dests"] = self._service_dests(vs.key)
        batch = Batch(NETLINK_GENERIC, self.family)
        now = time.monotonic()
        draining = dict(self.draining)
        for vs in wanted:
            cur = current.get(vs.key)
            name = _vs_name(vs.key)
            if cur is None:
                batch.add(_service_msg(IPVS_CMD_NEW_SERVICE, vs.key, vs), f"add virtual server {name}",
                          NLM_F_CREATE | NLM_F_EXCL)
                cur = {"dests": {}}
            elif (cur["sched"], cur["flags"], cur["timeout"] if cur["flags"] & 1 else 0) != \
                    (vs.scheduler, vs.flags, vs.timeout):   # in place: the VIP never goes away
                batch.add(_service_msg(IPVS_CMD_SET_SERVICE, vs.key, vs), f"change virtual server {name}")
            for r in vs.reals:
                have = cur["dests"].get(r.address)
                if have is None:
                    batch.add(_dest_msg(IPVS_CMD_NEW_DEST, vs.key, r.address, r.weight),
                              f"add real server {r.address} to {name}", NLM_F_CREATE | NLM_F_EXCL)
                elif have[0] != r.weight:                   # back from draining
                    batch.add(_dest_msg(IPVS_CMD_SET_DEST, vs.key, r.address, r.weight),
                              f"set real server {r.address} of {name} to weight {r.weight}")
                draining.pop((vs.key, r.address), None)
            want = {r.address for r in vs.reals}
            for addr, (weight, active, inactive) in cur["dests"].items():
                if addr in want or (vs.key, addr) in draining:
                    continue
                # GracefulDeleteRS: delete now if nothing uses it (UDP/SCTP: always), else weight 0
                if active + inactive == 0 or vs.key[0] != "TCP":
                    batch.add(_dest_msg(IPVS_CMD_DEL_DEST, vs.key, addr), f"delete real server {addr} of {name}",
                              ignore=(errno.ENOENT,))
                else:
                    batch.add(_dest_msg(IPVS_CMD_SET_DEST, vs.key, addr, 0), f"drain real server {addr} of {name}")
                    draining[(vs.key, addr)] = now
        keys = {vs.key for vs in wanted}
        for key in current:
            if key not in keys:
                batch.add(_service_msg(IPVS_CMD_DEL_SERVICE, key), f"delete virtual server {_vs_name(key)}",
                          ignore=(errno.ESRCH, errno.ENOENT))
                for k in [k for k in draining if k[0] == key]:
                    del draining[k]
        failures = batch.send()
        if failures:
            raise SyncFailed(f"IPVS: {len(failures)} of {len(batch)} request(s) failed, first: {failures[0]}")
        self.draining = draining
        self._servers_written = {
            vs.key: {"sched": vs.scheduler, "flags": vs.flags, "timeout": vs.timeout,
                     "dests": {**{addr: (0, 0, 0) for (key, addr) in self.draining if key == vs.key},
                               **{r.address: (r.weight, 0, 0) for r in vs.reals}}}
            for vs in wanted}
        return len(batch)

    def check_draining(self) -> int:
        """Delete the weight-0 real servers that have no connections left (or whose grace ran
        out); returns how many were deleted. Runs in the graceful-termination thread too: its
        reads and writes open their own sockets in the calling thread's netns."""
        if not self.draining:
            return 0
        with self._lock:
            current = self.real_servers()
            now = time.monotonic()
            batch = Batch(NETLINK_GENERIC, self.family)
            gone = []
            for (key, addr), since in list(self.draining.items()):
                dest = current.get(key, {}).get(addr)
                if dest is None:
                    del self.draining[(key, addr)]
                    continue
                expired = self.grace is not None and now - since >= self.grace
                if dest[1] + dest[2] == 0 or expired:
                    batch.add(_dest_msg(IPVS_CMD_DEL_DEST, key, addr), f"delete drained real server {addr} of "
                              f"{_vs_name(key)}", ignore=(errno.ENOENT,))
                    gone.append((key, addr))
            failures = batch.send()
            if failures:
                raise SyncFailed(f"IPVS: {failures[0]}")
            for key, addr in gone:
                del self.draining[(key, addr)]
                if self._servers_written is not None and key in self._servers_written:
                    self._servers_written[key]["dests"].pop(addr, None)
            return len(gone)

    def _graceful_loop(self) -> None:
        """upstream re-checks its graceful-termination list every minute."""
        while not self._stop.wait(self.graceful_period):
            try:
                self.check_draining()
            except Exception as exc:                # reported; the next sync shows kernel trouble
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
        listed = subprocess.run(["ipset", "list", "-n"], text=True, capture_output=True).stdout.split()
        sets = [name for name in listed if name in IPSET_NAMES]
        if sets:                                     # one process: each start is slow inside UML
            subprocess.run(["ipset", "restore"], input="".join(f"destroy {n}\n" for n in sets), text=True,
                           capture_output=True)
            removed.append(f"{len(sets)} ipsets")
        try:
            family = self.family
        except SyncFailed:
            family = None                            # no IPVS in this kernel: no servers either
        if family is not None:
            with self._lock:                         # upstream's cleanup: ipvs.Flush()
                servers = self._count_servers()
                batch = Batch(NETLINK_GENERIC, family)
                batch.add(ipvs_flush(), "flush IPVS")
                failures = batch.send()
                if failures:
                    raise SyncFailed(f"IPVS: {failures[0]}")
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

    @staticmethod
    def _count_servers() -> int:
        """Virtual servers in this netns, from /proc/net/ip_vs (no per-server decoding)."""
        try:
            lines = Path(PROC_IP_VS).read_text().splitlines()
        except OSError:
            return 0
        return sum(1 for line in lines if line.split(" ", 1)[0] in PROTOCOLS or line.startswith("FWM"))

    def _chains(self) -> dict[str, set[str]]:
        out = {}
        for table in ("nat", "filter"):
            saved = subprocess.run([self.save, "-t", table], text=True, capture_output=True)
            out[table] = set(re.findall(r"^:(KUBE-\S+) ", saved.stdout, re.M)) if saved.returncode == 0 else set()
        return out

    def _ipt(self, table: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.iptables, "-w", "-t", table, *args], capture_output=True, text=True)
