"""A kube-proxy-like node agent. One per node, a process inside the node.

The agent does what every kube-proxy mode shares; the mode's ``Backend``
(``netsim.proxy.<mode>_apply``, found through ``netsim.proxy.backend.backend_class``)
programs the kernel. Like kube-proxy the agent:

* at start-up removes what the *other* modes left on the node (kube-proxy's
  ``cleanupLeftovers``), so a lab can switch modes by restarting its agents;
* lists the cluster's Services (with their endpoints) and watches for changes;
* on start-up, after a failed sync and every ``--full-sync-period``, asks the backend for a
  full sync; otherwise for partial syncs of the service ports that changed, at most once
  per ``--min-sync-period`` (events are coalesced);
* after a sync, deletes UDP conntrack entries that still point at removed endpoints;
* answers ARP for the LoadBalancer IPs this node announces (L2 mode).

A status file records each sync (mode, full or partial, rules, seconds) and, per Service,
when it was written to the registry and when its rules were in the kernel, which is the
network-programming latency.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from netsim.agents.l2announce import Announcer
from netsim.proxy import state
from netsim.proxy.backend import MODES, SyncFailed, backend_class, port_key
from netsim.proxy.model import NodeContext, ServicePort
from netsim.registry import Compacted, RegistryError, open_registry


RETRY_AFTER = 1.0        # seconds between attempts after a failed sync


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} kube-proxy: {msg}", file=sys.stderr, flush=True)


class Stop(Exception):
    pass


class Proxier:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.node = NodeContext(args.node, tuple(args.node_ip), args.pod_cidr,
                                service_cidrs=tuple(args.service_cidr))
        self.options = dict(o.split("=", 1) for o in args.backend_opt)
        self.backend = backend_class(args.mode)(self.node, args.iptables_backend, **self.options)
        self.services: dict[str, list[ServicePort]] = {}      # registry key → ports
        self.written: dict[str, float] = {}
        self.pending: set[str] = set()                        # keys changed since the last sync
        self.changed_ports: set[str] = set()                  # port keys changed or gone since then
        self.need_full = True
        self.last_sync = 0.0
        self.last_full = 0.0
        self.next_try = 0.0                                   # no sync before this (after a failure)
        self.status: dict = {"node": args.node, "mode": args.mode, "syncs": 0, "programmed": {}, "removed": {}}
        self.udp_stale: list[tuple[str, int, str]] = []       # (service address, port, endpoint IP)
        self.announce: dict[str, dict[str, str]] = {}         # registry key → {LB IP: speaker node}
        self.announcer = Announcer(args.iface)

    # -- state --------------------------------------------------------------------
    def load(self, reg) -> int:
        snapshot = reg.range(state.PREFIX)
        self.services = {}
        for kv in snapshot:
            self._set(kv.key, kv.value)
        self.need_full = True
        return snapshot.revision

    def _set(self, key: str, value: str | None) -> None:
        old = self.services.get(key, [])
        if value is None:
            self.services.pop(key, None)
            self.announce.pop(key, None)
            new: list[ServicePort] = []
        else:
            try:
                new, announce, written = state.decode(value)
            except (ValueError, KeyError, TypeError) as exc:
                log(f"skipping unreadable service {key}: {exc}")
                return
            self.services[key] = new
            self.status["removed"].pop(key, None)
            self.announce[key] = announce
            self.written[key] = written
        self.pending.add(key)
        self.changed_ports.update(port_key(p) for p in old + new)
        self._flush_udp(old, new)

    # -- syncing ------------------------------------------------------------------------
    def sync(self) -> None:
        ports = [p for plist in self.services.values() for p in plist]
        full = self.need_full or time.monotonic() - self.last_full > self.args.full_sync_period
        t0 = time.monotonic()
        try:
            result = self.backend.sync(ports, None if full else set(self.changed_ports))
        except SyncFailed as exc:
            self.need_full = True
            self.next_try = time.monotonic() + RETRY_AFTER
            log(f"{self.args.mode} sync failed ({exc}); a full sync follows in {RETRY_AFTER:g}s")
            return
        took = time.monotonic() - t0
        now = time.time()
        for k in self.pending:
            if k in self.services:
                self.status["programmed"][k] = {"written_at": self.written.get(k, 0.0), "programmed_at": now}
            else:
                self.status["programmed"].pop(k, None)
                self.status["removed"][k] = now       # its rules are gone from the kernel
        self.pending.clear()
        self.changed_ports.clear()
        self.need_full = False
        self.last_sync = time.monotonic()
        if full:
            self.last_full = self.last_sync
        self._flush_pending_udp()
        mine = {ip for m in self.announce.values() for ip, node in m.items() if node == self.node.name}
        taken, given = self.announcer.ensure(mine)
        if taken or given:
            log(f"L2: announcing {sorted(mine) or 'nothing'} (took {sorted(taken)}, gave up {sorted(given)})")
        self.status.update(announcing=sorted(mine), syncs=self.status["syncs"] + 1, last_sync=now, last_sync_full=full,
                           last_sync_seconds=round(took, 4), rules=result.rules, written=result.written,
                           services=len(self.services))
        self.write_status()
        if self.args.ready_file and self.status["syncs"] == 1:     # ready once the first sync is in
            Path(self.args.ready_file).write_text(json.dumps({"pid": os.getpid()}))
        log(f"{'full' if full else 'partial'} {self.args.mode} sync: {result.rules} rules "
            f"({result.written} written) in {took * 1000:.0f} ms")

    def cleanup_other_modes(self) -> None:
        """kube-proxy's cleanupLeftovers: remove what every other mode left on this node
        (with ``--cleanup``: every mode, this one too). A mode whose backend module is not
        installed has nothing to clean."""
        for mode in MODES:
            if mode == self.args.mode and not self.args.cleanup:
                continue
            try:
                cls = backend_class(mode)
            except ImportError:
                continue
            try:
                removed = cls(self.node, self.args.iptables_backend).cleanup()
            except Exception as exc:           # a mode the kernel cannot run leaves nothing
                log(f"cleanup of {mode} mode skipped: {type(exc).__name__}: {exc}")
                continue
            self.status.setdefault("cleanup", {})[mode] = removed
            if removed and removed != "nothing":
                log(f"removed {mode} mode leftovers: {removed}")

    # -- UDP conntrack --------------------------------------------------------------------
    def _flush_udp(self, old: list[ServicePort], new: list[ServicePort]) -> None:
        """Remember (service address, port, endpoint IP) of UDP endpoints that went away."""
        new_by_key = {port_key(p): p for p in new}
        for p in old:
            if p.protocol != "UDP":
                continue
            still = new_by_key.get(port_key(p))
            keep = {e.ip for e in still.endpoints} if still else set()
            addresses = [(vip, p.port) for vip in (p.cluster_ip,) + p.external_ips + p.load_balancer_ips]
            if p.node_port:
                addresses += [(ip, p.node_port) for ip in self.node.node_ips]
            self.udp_stale += [(vip, port, ep.ip) for ep in p.endpoints if ep.ip not in keep
                               for vip, port in addresses]

    def _flush_pending_udp(self) -> None:
        """Delete conntrack flows to a service address whose reply comes from a gone endpoint."""
        for vip, port, ep in self.udp_stale:
            subprocess.run(["conntrack", "-D", "-p", "udp", "--orig-dst", vip, "--orig-port-dst", str(port),
                            "--reply-src", ep], capture_output=True)
        if self.udp_stale:
            log(f"deleted stale UDP conntrack entries for {len(self.udp_stale)} (service, endpoint) pairs")
        self.udp_stale = []

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.cleanup_other_modes()
        self.backend.setup()
        reg = open_registry(self.args.registry)
        revision = self.load(reg)
        self.sync()
        watcher = reg.watch(state.PREFIX, start_revision=revision + 1)
        gc.freeze()                   # keep start-up objects out of full collections
        while True:
            wait = None
            if self.pending or self.need_full:
                now = time.monotonic()
                wait = max(0.0, self.args.min_sync_period - (now - self.last_sync), self.next_try - now)
            try:
                batch = watcher.next_batch(timeout=wait if wait is not None else 1.0)
            except Compacted:
                watcher.close()
                revision = self.load(reg)
                watcher = reg.watch(state.PREFIX, start_revision=revision + 1)
                continue
            except RegistryError as exc:
                log(f"registry unavailable ({exc}); rules kept, retrying")
                watcher.close()
                time.sleep(1.0)            # retry interval while the registry is away
                try:
                    revision = self.load(reg)
                    watcher = reg.watch(state.PREFIX, start_revision=revision + 1)
                except RegistryError:
                    pass
                continue
            if batch is not None:
                for ev in batch.events:
                    self._set(ev.kv.key, ev.kv.value if ev.type == "PUT" else None)
            now = time.monotonic()
            due = now - self.last_sync >= self.args.min_sync_period and now >= self.next_try
            if (self.pending or self.need_full) and due:
                self.sync()
            elif time.monotonic() - self.last_full > self.args.full_sync_period:
                self.sync()

    def write_status(self) -> None:
        if self.args.status_file:
            tmp = Path(self.args.status_file + ".tmp")
            tmp.write_text(json.dumps(self.status, indent=1))
            os.replace(tmp, self.args.status_file)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netsim.agents.kubeproxy", description="kube-proxy-like node agent")
    p.add_argument("--registry", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--node-ip", action="append", required=True)
    p.add_argument("--pod-cidr", required=True, help="cluster CIDR: the local-traffic detector")
    p.add_argument("--service-cidr", action="append", default=[], help="the Service CIDR (repeatable)")
    p.add_argument("--iface", default="eth0", help="the uplink, where LoadBalancer IPs are announced")
    p.add_argument("--mode", choices=MODES, default="iptables", help="proxy mode (kube-proxy --proxy-mode)")
    p.add_argument("--iptables-backend", choices=("nft", "legacy"), default="nft")
    p.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a mode-specific option passed to the backend (repeatable)")
    p.add_argument("--min-sync-period", type=float, default=1.0, help="seconds (kube-proxy default 1)")
    p.add_argument("--full-sync-period", type=float, default=3600.0, help="seconds (kube-proxy: 1 h)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove what every mode programmed on this node, then exit (kube-proxy --cleanup)")
    p.add_argument("--status-file")
    p.add_argument("--ready-file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    def stop(signum, frame):
        raise Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bad = [o for o in args.backend_opt if "=" not in o]
    if bad:
        parser().error(f"--backend-opt needs KEY=VALUE, not {bad[0]!r}")
    try:
        backend_class(args.mode)
    except ImportError as exc:
        log(f"proxy mode {args.mode} is not available: {exc}")
        return 1
    try:
        proxier = Proxier(args)
        if args.cleanup:
            proxier.cleanup_other_modes()
            return 0
        proxier.run()
    except Stop:
        log("exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
