"""The contract between the kube-proxy agent and a proxy mode (iptables, ipvs, nftables).

The agent (``netsim.agents.kubeproxy``) owns everything that is the same in every mode:
watching the registry, coalescing changes (``--min-sync-period``), the periodic full
resync, stale UDP conntrack cleanup, the L2 announcer and the status file. A backend owns
only what its mode puts in the kernel of one node:

* ``setup()``: once at start, before the first sync: the sysctls and devices the mode
  needs (route_localnet; for IPVS ``kube-ipvs0`` and the ``net.ipv4.vs.*`` sysctls).
* ``sync(ports, changed)``: make the kernel match ``ports``. ``changed=None`` is a full
  sync; otherwise ``changed`` holds the ``port_key`` of every service port that changed
  (or went away) since the last successful sync, and the backend may write only those.
  A failed sync raises ``SyncFailed``; the agent then asks for a full sync next time.
* ``cleanup()``: remove everything this mode programs on the node, as
  ``kube-proxy --cleanup`` does, and return a short description of what was removed.
  The agent calls ``cleanup()`` of every *other* mode at start-up, so switching modes on a
  running lab leaves no stale chain, set, virtual server or dummy address.

The agent constructs a backend as ``Backend(node, iptables_backend, **options)``: the
``NodeContext``, ``"nft"`` or ``"legacy"`` (for the iptables rules a mode keeps), and the
agent's ``--backend-opt KEY=VALUE`` options as strings (e.g. an IPVS scheduler).

``render_text(ports, node)`` is the same desired state as text, without root: what
``netsim proxy render --mode MODE`` prints and the golden files hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Protocol, Sequence

from .model import NodeContext, ServicePort

MODES = ("iptables", "ipvs", "nftables")


def port_key(port: ServicePort) -> str:
    """The identity of a service port across syncs: SPN + protocol (as the agent tracks it)."""
    return port.spn + port.proto


class SyncFailed(Exception):
    """The kernel refused the update; the message is the tool's own error line."""


@dataclass(frozen=True)
class SyncResult:
    full: bool                 # every object was written
    rules: int                 # rules / virtual servers + real servers / nft rules now in place
    written: int = 0           # objects written by this sync (rules, elements, servers)


class Backend(Protocol):
    mode: str

    def setup(self) -> None: ...

    def sync(self, ports: Sequence[ServicePort], changed: set[str] | None) -> SyncResult: ...

    def cleanup(self) -> str: ...


def render_text(mode: str, ports: Sequence[ServicePort], node: NodeContext) -> str:
    """The desired state of ``mode`` on ``node`` as deterministic text (no root): each mode's
    renderer module ``netsim.proxy.<mode>`` has ``render_text(ports, node)``."""
    if mode not in MODES:
        raise ValueError(f"unknown proxy mode {mode!r} (one of {', '.join(MODES)})")
    return import_module(f"{__package__}.{mode}").render_text(ports, node)


def backend_class(mode: str) -> type:
    """The kernel-programming class of ``mode``: ``netsim.proxy.<mode>_apply.Backend``."""
    if mode not in MODES:
        raise ValueError(f"unknown proxy mode {mode!r} (one of {', '.join(MODES)})")
    return import_module(f"{__package__}.{mode}_apply").Backend
