"""Mininet hosts attached to a running lab, for people who script labs with Mininet's API.

Every node, external host and pod of a lab is a pinned network namespace. A
``NamespaceHost`` is a ``mininet.node.Host`` whose shell runs inside such a namespace
instead of a new one, so ``cmd()``, ``popen()``, ``sendCmd()``/``waitOutput()`` and
``IP()`` work as they do in Mininet::

    from netsim.runtime.mnhost import attach
    net = attach("demo")
    print(net["node-1"].cmd("ip route"))
    net.stop()
"""
from __future__ import annotations

from mininet.node import Host

from ..apply import labstate
from ..plan.state import LabPlan


class NamespaceHost(Host):
    """A Mininet host living in the existing namespace ``netns`` (it creates none)."""

    def __init__(self, name: str, netns: str, ip: str, **params):
        self.netns = netns
        self._ip = ip
        super().__init__(name, inNamespace=True, **params)

    def _popen(self, cmd, **params):
        # Mininet starts the shell with "mnexec -cdn ..." (n = new namespace); enter ours instead.
        if isinstance(cmd, list) and cmd[:1] == ["mnexec"] and "n" in cmd[1]:
            cmd = ["mnexec", cmd[1].replace("n", ""), "ip", "netns", "exec", self.netns] + cmd[2:]
        return super()._popen(cmd, **params)

    def IP(self, intf=None):  # noqa: N802 - Mininet's name
        return self._ip


class LabNet(dict):
    """Name → ``NamespaceHost``, created on first use (a lab may have hundreds of pods)."""

    def __init__(self, plan: LabPlan):
        super().__init__()
        self.plan = plan
        self._known = {n.name: (n.netns, n.address) for n in plan.nodes}
        self._known.update({e.name: (e.netns, e.address) for e in plan.externals})
        self._known.update({p.name: (p.netns, p.ip) for p in plan.pods})

    def __missing__(self, name: str) -> NamespaceHost:
        if name not in self._known:
            raise KeyError(name)
        netns, ip = self._known[name]
        host = self[name] = NamespaceHost(name, netns, ip)
        return host

    def __contains__(self, name) -> bool:
        return name in self._known

    @property
    def hosts(self) -> list[NamespaceHost]:
        return [self[n.name] for n in self.plan.nodes]

    def stop(self) -> None:
        """End the hosts' shells (the lab itself keeps running)."""
        for host in list(self.values()):
            host.terminate()
        self.clear()


def attach(lab: str) -> LabNet:
    return LabNet(labstate.load_plan(lab))
