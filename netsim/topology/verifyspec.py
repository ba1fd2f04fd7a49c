"""The topology's ``verify:`` section: expected outcomes of probes, netlab ``validate:`` style.

::

    verify:
      client-to-web:                 # test name
        description: a pod reaches a ClusterIP; DNAT, no SNAT
        from: client                 # pod, node or external
        to: web                      # anything `netsim probe` takes as TARGET
        proto: tcp                   # tcp | udp | icmp (default: the target's)
        port: http                   # number or a Service port's name
        expect: reach                # reach | fail
        source: client               # what the backend saw: client | not-client | node | <node> | <IP>
        backend: [web-*]             # the answer comes from one of these pods (names or globs)
        nat: dnat                    # none | dnat | snat | both: the translations on the path

Every problem is reported with its path (``verify.client-to-web.nat``) and a hint.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from .check import Checker, join

FIELDS = {"description", "from", "to", "proto", "port", "expect", "source", "backend", "nat"}
EXPECTS = ("reach", "fail")
NATS = ("none", "dnat", "snat", "both")
PROTOS = ("tcp", "udp", "icmp")
SOURCE_WORDS = ("client", "not-client", "node")


@dataclass(frozen=True)
class VerifyTest:
    name: str
    source: str                          # FROM
    target: str                          # TARGET
    description: str = ""
    proto: str | None = None
    port: str | None = None
    expect: str = "reach"
    seen: str | None = None              # expected source seen by the backend
    backend: tuple[str, ...] = ()
    nat: str | None = None


def read(raw: Any, ck: Checker, machines: set[str], pods: set[str], services: set[str]) -> tuple[VerifyTest, ...]:
    """Validate the section; ``machines`` are node and external names, ``pods`` pod names
    and ``ns/name`` keys, ``services`` Service names and ``ns/name`` keys."""
    tests = ck.mapping(raw, "verify")
    out = []
    for name, body in tests.items():
        path = join("verify", str(name))
        if not isinstance(body, dict):
            ck.mapping(body, path, required=True)      # records the problem
            continue
        ck.fields(body, path, FIELDS)
        src = ck.string(body.get("from"), join(path, "from"), required=True)
        if src is not None and src not in machines | pods:
            ck.error(join(path, "from"), f"{src!r} is no pod, node or external of this topology",
                     _near(src, machines | pods))
        dst = ck.string(body.get("to"), join(path, "to"), required=True)
        if dst is not None:
            _check_target(dst, join(path, "to"), ck, machines, pods, services)
        proto = ck.choice(body.get("proto"), join(path, "proto"), PROTOS, None) if "proto" in body else None
        port = body.get("port")
        if port is not None:
            if isinstance(port, bool) or not isinstance(port, (int, str)) or (isinstance(port, int) and not 1 <= port <= 65535):
                ck.error(join(path, "port"), f"must be a port number 1–65535 or a port name, got {port!r}")
                port = None
            else:
                port = str(port)
        expect = ck.choice(body.get("expect"), join(path, "expect"), EXPECTS, "reach")
        seen = _source(body.get("source"), join(path, "source"), ck, machines)
        backend = _backends(body.get("backend"), join(path, "backend"), ck)
        nat = ck.choice(body.get("nat"), join(path, "nat"), NATS, None) if "nat" in body else None
        if expect == "fail":
            for key in ("source", "backend", "nat"):
                if key in body:
                    ck.error(join(path, key), "cannot be checked on a probe expected to fail",
                             "remove it, or expect: reach")
        desc = body.get("description", "")
        if not isinstance(desc, str):
            ck.error(join(path, "description"), f"must be a string, got {desc!r}")
            desc = ""
        out.append(VerifyTest(str(name), src or "", dst or "", desc, proto, port, expect, seen, backend, nat))
    return tuple(out)


def _check_target(dst: str, path: str, ck: Checker, machines, pods, services) -> None:
    if dst.startswith("dns:"):               # a DNS name: asked from the source pod when verify runs
        name, _, tail = dst[4:].partition(":")
        if not name:
            ck.error(path, f"{dst!r}: 'dns:' needs a name", "dns:web or dns:web.default.svc.cluster.local:80")
        elif tail and not tail.isdigit():
            ck.error(path, f"{dst!r}: the part after the name must be a port number", "or give the port with port:")
        return
    host = dst.rsplit(":", 1)[0] if dst.count(":") == 1 else dst
    tail = dst.rsplit(":", 1)[1] if dst.count(":") == 1 else ""
    if tail and not tail.isdigit():
        ck.error(path, f"{dst!r}: the part after ':' must be a port number", "or give the port with port:")
        return
    kind, _, rest = host.partition("/")
    if kind in ("pod", "svc", "service", "node", "ext", "external") and rest:
        host = rest
    try:
        IPv4Address(host)
        return
    except ValueError:
        pass
    if "." in host.rstrip(".") and "/" not in host:
        return                               # a DNS name (web.default.svc.cluster.local): resolved at run time
    if host not in machines | pods | services:
        ck.error(path, f"{host!r} is no pod, Service, node or external of this topology",
                 _near(host, machines | pods | services))


def _source(value: Any, path: str, ck: Checker, machines: set[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        ck.error(path, f"must be a string, got {value!r}", "client, not-client, node, a node's name or an IP")
        return None
    if value in SOURCE_WORDS or value in machines:
        return value
    try:
        IPv4Address(value)
        return value
    except ValueError:
        ck.error(path, f"{value!r} is not client, not-client, node, a node's name or an IP",
                 _near(value, set(SOURCE_WORDS) | machines))
        return None


def _backends(value: Any, path: str, ck: Checker) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        ck.error(path, f"must be a pod name or a list of pod names (globs allowed), got {value!r}",
                 "for example backend: [web-*]")
        return ()
    return tuple(items)


def _near(word: str, choices: set[str]) -> str:
    import difflib
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""
