"""kube-proxy's iptables mode on one node's kernel: the ``Backend`` the agent drives.

* ``setup()`` sets the sysctl kube-proxy sets in iptables mode (``route_localnet``, for
  NodePorts on 127.0.0.1).
* ``sync()`` renders with ``netsim.proxy.iptables.render`` and loads the result with one
  ``iptables-restore --noflush``; a full sync first ensures the jumps from the built-in
  chains (``iptables -C`` / ``-I``). The backend remembers which KUBE chains it wrote, so a
  partial sync writes only changed service chains and deletes stale ones.
* ``cleanup()`` is ``kube-proxy --cleanup`` for this mode: it deletes kube-proxy's jumps
  from the built-in chains and flushes and deletes every ``KUBE-*`` chain (filter, nat,
  mangle). Other programs' chains (flannel's ``FLANNEL-*``) are left alone.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Sequence

from .backend import SyncFailed, SyncResult
from .iptables import jump_rules, render
from .model import NodeContext, ServicePort

BINARIES = {"nft": ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"),
            "legacy": ("iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")}
SYSCTLS = (("net/ipv4/conf/all/route_localnet", "1"),)
TABLES = ("filter", "nat", "mangle")
_CHAIN_LINE = re.compile(r"^:(KUBE-\S+) ", re.M)


class Backend:
    mode = "iptables"

    def __init__(self, node: NodeContext, iptables_backend: str = "nft", **options: str):
        self.node = node
        self.iptables, self.restore, self.save = BINARIES[iptables_backend]
        self.chains: frozenset[str] = frozenset()          # KUBE chains this backend wrote

    def setup(self) -> None:
        for path, value in SYSCTLS:
            Path("/proc/sys", path).write_text(value)

    def sync(self, ports: Sequence[ServicePort], changed: set[str] | None) -> SyncResult:
        ruleset = render(ports, self.node, changed=changed, existing_chains=self.chains)
        if changed is None:
            self.ensure_jumps()
        done = subprocess.run([self.restore, "--noflush", "--counters"], input=ruleset.text,
                              text=True, capture_output=True)
        if done.returncode != 0:
            raise SyncFailed(f"{self.restore}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        self.chains = ruleset.chains
        return SyncResult(full=ruleset.full, rules=ruleset.rule_count, written=ruleset.rules_written)

    def ensure_jumps(self) -> None:
        for table, chain, words in jump_rules():
            if self._ipt(table, "-C", chain, *words).returncode != 0:
                self._ipt(table, "-N", words[-1])        # the target must exist before the jump
                done = self._ipt(table, "-I", chain, *words)
                if done.returncode != 0:
                    raise SyncFailed(f"{self.iptables} -t {table} -I {chain}: {done.stderr.strip()}")

    def cleanup(self) -> str:
        jumps = 0
        for table, chain, words in jump_rules():
            while self._ipt(table, "-D", chain, *words).returncode == 0:     # duplicates too
                jumps += 1
        removed: list[str] = []
        for table in TABLES:
            saved = subprocess.run([self.save, "-t", table], text=True, capture_output=True)
            chains = sorted(set(_CHAIN_LINE.findall(saved.stdout))) if saved.returncode == 0 else []
            if not chains:
                continue
            text = "\n".join([f"*{table}"] + [f":{c} - [0:0]" for c in chains]
                             + [f"-X {c}" for c in chains] + ["COMMIT"]) + "\n"
            done = subprocess.run([self.restore, "--noflush"], input=text, text=True, capture_output=True)
            if done.returncode != 0:
                raise SyncFailed(f"{self.restore} (cleanup of {table}): {done.stderr.strip()}")
            removed += [f"{table}/{c}" for c in chains]
        # route_localnet is only needed for localhost NodePorts, which no other mode keeps
        # behind a martian-drop rule: put the kernel default back.
        for path, _ in SYSCTLS:
            Path("/proc/sys", path).write_text("0")
        self.chains = frozenset()
        if not removed and not jumps:
            return "nothing"
        return f"{len(removed)} KUBE chains and {jumps} jumps from built-in chains"

    def _ipt(self, table: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.iptables, "-w", "-t", table, *args], capture_output=True, text=True)
