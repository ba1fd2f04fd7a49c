"""kube-proxy's nftables mode on one node's kernel: the ``Backend`` the agent drives.

Each node is its own network namespace, so its ``ip kube-proxy`` table is private.

* ``setup()`` sets nothing: nftables mode has no localhost NodePorts, so no
  ``route_localnet`` (reference 3.2).
* ``sync()`` renders with ``netsim.proxy.nftables`` and loads one transaction with
  ``nft -f -``. A full sync (the first, after a failure, periodic) lists the table's
  chains and sets from the kernel, rewrites everything and deletes per-service chains and
  affinity sets nobody uses any more. A partial sync sends only the chains of the changed
  service ports and the element differences against what the last sync loaded.
* ``cleanup()`` is ``kube-proxy --cleanup`` for this mode: ``delete table ip kube-proxy``
  (and ``ip6``), which removes every chain, set and map at once.
"""
from __future__ import annotations

import json
import subprocess
from typing import Sequence

from .backend import SyncFailed, SyncResult
from .model import NodeContext, ServicePort
from .nftables import TABLE, State, render, transaction


class Backend:
    mode = "nftables"

    def __init__(self, node: NodeContext, iptables_backend: str = "nft", **options: str):
        self.node = node
        self.state: State | None = None         # what the last successful sync loaded
        self.fresh = True                        # no sync yet by this agent
        self.last_text = ""                      # the last transaction (for debugging and tests)

    def setup(self) -> None:
        pass

    def sync(self, ports: Sequence[ServicePort], changed: set[str] | None) -> SyncResult:
        state = render(ports, self.node)
        if changed is None or self.state is None:
            chains, sets = self._existing()
            tx = transaction(state, self.node, existing_chains=chains, existing_sets=sets,
                             recreate_base=self.fresh)
        else:
            tx = transaction(state, self.node, previous=self.state, changed=changed)
        self.last_text = tx.text
        if tx.text:
            done = subprocess.run(["nft", "-f", "-"], input=tx.text, text=True, capture_output=True)
            if done.returncode != 0:
                self.state = None
                raise SyncFailed(f"nft -f: {_first_error(done.stderr)}")
        self.state, self.fresh = state, False
        return SyncResult(full=tx.full, rules=state.rule_count, written=tx.rules_written + tx.elements_written)

    def _existing(self) -> tuple[set[str], set[str]]:
        """The chains and sets of our table in the kernel (empty when there is no table)."""
        out: dict[str, set[str]] = {"chain": set(), "set": set()}
        for kind in ("chains", "sets"):
            done = subprocess.run(["nft", "-j", "list", kind, "ip"], text=True, capture_output=True)
            if done.returncode != 0:
                continue
            for obj in json.loads(done.stdout).get("nftables", []):
                for k, v in obj.items():
                    if k in out and v.get("table") == TABLE:
                        out[k].add(v["name"])
        return out["chain"], out["set"]

    def cleanup(self) -> str:
        removed = []
        for family in ("ip", "ip6"):
            done = subprocess.run(["nft", "delete", "table", family, TABLE], text=True, capture_output=True)
            if done.returncode == 0:
                removed.append(f"table {family} {TABLE}")
            elif "No such file" not in done.stderr:
                raise SyncFailed(f"nft delete table {family} {TABLE}: {_first_error(done.stderr)}")
        self.state, self.fresh = None, True
        return ", ".join(removed) or "nothing"


def _first_error(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    err = next((l for l in lines if "Error" in l), lines[0] if lines else "failed")
    return err.strip()
