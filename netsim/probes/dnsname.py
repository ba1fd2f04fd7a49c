"""A TARGET that is a DNS name: resolved the way the source pod would, before the probe.

``dns:NAME[:PORT]`` (any name, short ones through the pod's search path) or a dotted
name that is not an address (``web.default.svc.cluster.local``, ``web.default``) is asked
of the pod's nameserver with its resolv.conf (search list, ndots), by real queries sent
from inside the pod. The address in the answer is then probed like any other target: a
ClusterIP becomes that Service's port, a headless Service's answer a pod.

``split`` is pure; ``lookup`` sends the queries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from ..dns import resolver
from ..dns.query import build_query, parse_response, query
from ..plan.state import LabPlan
from .targets import ProbeError, Source, Target, is_ip, resolve_target

PREFIX = "dns:"


class NameNotFound(ProbeError):
    """The pod's nameserver has no address for the name (NXDOMAIN, or no A record)."""

    def __init__(self, message: str, rcodes: str):
        super().__init__(message)
        self.rcodes = rcodes


@dataclass(frozen=True)
class Lookup:
    name: str                        # as the user gave it
    server: str                      # the pod's nameserver
    answered_as: str                 # the candidate that answered (or the last one tried)
    rcode: str
    addresses: tuple[str, ...] = ()
    tried: tuple[tuple[str, str], ...] = field(default_factory=tuple)   # (candidate, rcode) in order

    def to_dict(self) -> dict:
        return {"name": self.name, "server": self.server, "answeredAs": self.answered_as,
                "rcode": self.rcode, "addresses": list(self.addresses),
                "tried": [{"name": n, "rcode": r} for n, r in self.tried]}

    def line(self) -> str:
        got = f"A {', '.join(self.addresses)}" if self.addresses else self.rcode
        via = f" (search path: {', '.join(f'{n} {r}' for n, r in self.tried)})" if len(self.tried) > 1 else ""
        return f"{self.name} → {self.answered_as} {got} from {self.server}{via}"


def split(text: str) -> tuple[str, str | None] | None:
    """(name, port or None) if TARGET names a DNS name, else None."""
    forced = text.startswith(PREFIX)
    body = text[len(PREFIX):] if forced else text
    host, sep, port = body.rpartition(":")
    if not sep:
        host, port = body, None
    if not host or "/" in host or is_ip(host):
        if forced:
            raise ProbeError(f"{text!r}: give a name after 'dns:' (e.g. dns:web or dns:web.default.svc.cluster.local:80)")
        return None
    if port is not None and not port.isdigit():
        raise ProbeError(f"{text!r}: the part after ':' must be a port number")
    if forced or "." in host.rstrip("."):
        return host, port
    return None


def resolve(text: str, plan: LabPlan, res, src: Source, proto: str | None = None,
            port: str | int | None = None, timeout: float = 1.0) -> Target:
    """TARGET as ``netsim probe`` takes it: a DNS name is looked up from ``src`` first."""
    named = split(text)
    if named is None or (not text.startswith(PREFIX) and plan.find(named[0]) is not None):
        return resolve_target(text, plan, res, proto, port)     # not a name, or a dotted pod/node name
    return target_for(lookup(plan, src, named[0], timeout), named[1], plan, res, proto, port)


def lookup(plan: LabPlan, src: Source, name: str, timeout: float = 1.0) -> Lookup:
    """Ask the source pod's nameserver about ``name`` through its search path (A records).
    Raises ProbeError when no candidate has an address (NXDOMAIN, REFUSED, no answer)."""
    if src.kind != "pod":
        raise ProbeError(f"DNS names are resolved from a pod (its resolv.conf); {src.name} is a {src.kind}: "
                         f"give the Service or its ClusterIP instead")
    try:
        conf = resolver.read(src.netns)
    except FileNotFoundError:
        raise ProbeError(f"pod {src.name} has no cluster resolver (cluster.dns is off in lab {plan.lab})") from None
    if not conf.nameservers:
        raise ProbeError(f"pod {src.name}'s resolv.conf names no nameserver")
    server = conf.nameservers[0]
    tried: list[tuple[str, str]] = []
    for candidate in resolver.candidates(name, conf):
        try:
            answer = query(server, candidate, "A", netns=src.netns, timeout=timeout)
        except OSError as exc:
            raise ProbeError(f"{name}: no answer from nameserver {server} within {timeout:g}s "
                             f"(asked {candidate} from {src.name}): {exc}") from None
        tried.append((candidate, answer.rcode))
        if answer.rcode == "NOERROR" and answer.values("A"):
            return Lookup(name, server, candidate, answer.rcode, tuple(answer.values("A")), tuple(tried))
    raise NameNotFound(f"{name}: not found: {server} answered {_rcodes(tried)} (asked from {src.name})",
                       "/".join(dict.fromkeys(r for _, r in tried)))


def target_for(found: Lookup, port: str | None, plan: LabPlan, res, proto: str | None = None,
               port_option: str | int | None = None) -> Target:
    """The probe target for the first address of the answer (a ClusterIP, a pod, ...)."""
    address = found.addresses[0]
    text = f"{address}:{port}" if port else address
    target = resolve_target(text, plan, res, proto, port_option)
    return replace(target, label=f"{target.label} (DNS {found.answered_as})",
                   extra=dict(target.extra, dns=found.to_dict(), dns_request=(port, proto, port_option)))


def trace(plan: LabPlan, res, src: Source, target: Target, pcap: str | None, timeout: float = 1.0):
    """``netsim trace`` of a DNS name (``target`` from ``target_for``): the query for the
    name that answered, sent from the pod and traced like any probe, then the connection
    to the address in the traced answer."""
    from . import trace as tracing
    found = Lookup(**_from_dict(target.extra["dns"]))
    port, proto, port_option = target.extra["dns_request"]

    def target_of(raw: bytes) -> Target:
        answer = parse_response(raw)
        if answer.rcode != "NOERROR" or not answer.values("A"):
            raise ProbeError(f"{found.answered_as}: the traced query got {answer.rcode} with no address "
                             f"from {found.server}")
        return target_for(replace(found, addresses=tuple(answer.values("A"))), port, plan, res, proto, port_option)
    payload = build_query(found.answered_as, "A", int.from_bytes(os.urandom(2), "big"))
    return tracing.run_named(plan, src, dns_target(found, plan, res), payload, target_of, pcap, timeout)


def _from_dict(d: dict) -> dict:
    return {"name": d["name"], "server": d["server"], "answered_as": d["answeredAs"], "rcode": d["rcode"],
            "addresses": tuple(d["addresses"]), "tried": tuple((t["name"], t["rcode"]) for t in d["tried"])}


def dns_target(found: Lookup, plan: LabPlan, res) -> Target:
    """The query's own target: UDP 53 on the nameserver (the kube-dns ClusterIP)."""
    return resolve_target(f"{found.server}:53", plan, res, "udp")


def _rcodes(tried: list[tuple[str, str]]) -> str:
    """"NXDOMAIN for a, b; REFUSED for c" (each rcode with the names that got it, in order)."""
    by: dict[str, list[str]] = {}
    for n, r in tried:
        by.setdefault(r if r != "NOERROR" else "no address", []).append(n)
    return "; ".join(f"{r} for {', '.join(names)}" for r, names in by.items()) or "nothing"

