"""A pod's stub resolver, for code that enters a pod with setns() instead of ``ip netns exec``.

``ip netns exec`` (``netsim exec``, ``netsim shell``, the Mininet hosts) bind-mounts
``/etc/netns/<netns>/resolv.conf`` over /etc/resolv.conf, so programs there use the
cluster DNS. A process that only calls setns() (netsim's own agents and probes) still
reads the host's /etc/resolv.conf, whose servers are not reachable from a pod. Such code
calls ``lookup(pod_netns, name)``: it reads the pod's resolv.conf and applies the search
list and ndots as glibc does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .query import Answer, query


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    ndots: int = 1


def parse(text: str) -> ResolvConf:
    servers, search, ndots = [], [], 1
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "nameserver" and len(words) > 1:
            servers.append(words[1])
        elif words[0] in ("search", "domain"):
            search = words[1:]
        elif words[0] == "options":
            for opt in words[1:]:
                if opt.startswith("ndots:"):
                    ndots = min(int(opt.split(":", 1)[1]), 15)
    return ResolvConf(tuple(servers), tuple(search), ndots)


def candidates(name: str, conf: ResolvConf) -> list[str]:
    """The names glibc tries, in order: a trailing dot means the name alone; a name with
    at least ndots dots is tried as is first, any other after the search list."""
    if name.endswith("."):
        return [name.rstrip(".")]
    searched = [f"{name}.{domain}" for domain in conf.search]
    return [name] + searched if name.count(".") >= conf.ndots else searched + [name]


def read(netns: str, etc_netns: Path = Path("/etc/netns")) -> ResolvConf:
    return parse((etc_netns / netns / "resolv.conf").read_text())


def lookup(netns: str, name: str, qtype: str = "A", timeout: float = 1.0) -> tuple[str, Answer]:
    """Resolve ``name`` from inside pod namespace ``netns`` with its resolv.conf; returns
    the name that answered and the answer (the last NXDOMAIN if none did)."""
    conf = read(netns)
    last: tuple[str, Answer] = (name, Answer("NXDOMAIN"))
    for candidate in candidates(name, conf):
        for server in conf.nameservers:
            answer = query(server, candidate, qtype, netns=netns, timeout=timeout)
            if answer.rcode == "NOERROR" and answer.records:
                return candidate, answer
            last = (candidate, answer)
            break
    return last
