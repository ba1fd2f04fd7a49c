"""``netsim verify``: the topology's ``verify:`` tests and a default matrix, as probes.

The default matrix asks what Kubernetes promises for every Service, by every access
path it offers:

* every pod → every Service port's ClusterIP: answered by a ready endpoint, the client's
  own address seen (no SNAT) — unless the pod reached itself (hairpin: SNAT to its
  node's bridge address); no endpoints: refused;
* the first external host → every node's NodePort: eTP=Cluster answered with SNAT;
  eTP=Local answered by a local endpoint with the client's address, or dropped on nodes
  without one;
* the first external host → every LoadBalancer IP.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

from ..dns.objects import is_dns_port
from ..plan.state import LabPlan
from . import dnsname, probe as probing
from ..errors import NetsimError
from .targets import Source, Target, resolve_source


@dataclass
class Expectation:
    reach: bool = True
    backends: tuple[str, ...] | None = None     # patterns (names, keys or globs)
    source: str | None = None                   # client | not-client | node | <node> | <IP>
    nat: str | None = None                      # none | dnat | snat | both
    hairpin_source: str | None = None           # when the client is its own backend: this source

    def text(self) -> str:
        if not self.reach:
            return "fail"
        parts = ["reach"]
        if self.backends is not None:
            parts.append(f"backend in {_group(self.backends)}")
        if self.source:
            parts.append(f"source {self.source}" + (f" ({self.hairpin_source} if itself)" if self.hairpin_source else ""))
        if self.nat:
            parts.append(f"nat {self.nat}")
        return ", ".join(parts)


@dataclass
class Case:
    name: str
    source: str                 # FROM as written
    target: str                 # TARGET as written
    expect: Expectation
    proto: str | None = None
    port: str | None = None
    description: str = ""


@dataclass
class Outcome:
    case: Case
    ok: bool
    got: str
    why: list[str] = field(default_factory=list)
    result: probing.ProbeResult | None = None

    def to_dict(self) -> dict:
        return {"name": self.case.name, "from": self.case.source, "to": self.case.target,
                "expect": self.case.expect.text(), "got": self.got, "ok": self.ok, "why": self.why,
                "probe": self.result.to_dict() if self.result else None}


def from_tests(tests) -> list[Case]:
    """Cases from a topology's ``verify:`` section (``VerifyTest`` objects)."""
    out = []
    for t in tests:
        exp = Expectation(reach=t.expect == "reach", backends=t.backend or None, source=t.seen, nat=t.nat)
        out.append(Case(t.name, t.source, t.target, exp, t.proto, t.port, t.description))
    return out


def default_matrix(plan: LabPlan, res) -> list[Case]:
    cases: list[Case] = []
    if res is None:
        return cases
    gateway = {n.name: n.gateway for n in plan.nodes}
    # kube-dns's port 53 is dnsmasq's: it cannot name its backend (selftest queries it)
    ports = [sp for sp in res.ports if not is_dns_port(sp)]
    for pod in plan.pods:
        for sp in ports:
            ready = [e for e in sp.endpoints if e.ready]
            if sp.internal_policy_local:
                ready = [e for e in ready if e.node == pod.node]
            keys = tuple(e.pod or e.ip for e in ready)
            exp = Expectation(reach=bool(keys), backends=keys or None, source="client" if keys else None,
                              hairpin_source=gateway[pod.node])
            cases.append(Case(f"pod→ClusterIP {sp.proto}", pod.key, f"svc/{sp.namespace}/{sp.name}:{sp.port}", exp,
                              sp.proto))
    for ext in plan.externals[:1]:
        for sp in ports:
            ready = [e for e in sp.endpoints if e.ready]
            if sp.node_port:
                for node in plan.nodes:
                    local = tuple(e.pod or e.ip for e in ready if e.node == node.name)
                    if sp.external_policy_local:
                        exp = Expectation(reach=bool(local), backends=local or None,
                                          source="client" if local else None)
                        name = "external→NodePort eTP=Local" + ("" if local else ", no local endpoint")
                    else:
                        keys = tuple(e.pod or e.ip for e in ready)
                        exp = Expectation(reach=bool(keys), backends=keys or None,
                                          source=node.name if keys else None)
                        name = "external→NodePort eTP=Cluster"
                    cases.append(Case(f"{name} {sp.proto}", ext.name, f"{node.address}:{sp.node_port}", exp, sp.proto))
            for ip in sp.load_balancer_ips:
                keys = tuple(e.pod or e.ip for e in ready)
                exp = Expectation(reach=bool(keys), backends=keys or None,
                                  source=("client" if sp.external_policy_local else "not-client") if keys else None)
                cases.append(Case(f"external→LoadBalancer eTP={'Local' if sp.external_policy_local else 'Cluster'} {sp.proto}",
                                  ext.name, f"{ip}:{sp.port}", exp, sp.proto))
    return cases


def judge(exp: Expectation, r: probing.ProbeResult, src: Source, plan: LabPlan) -> list[str]:
    """Why ``r`` does not meet ``exp`` (empty: it does)."""
    why: list[str] = []
    if not exp.reach:
        if r.reached:
            why.append(f"expected no answer, but {r.backend or r.backend_ip or 'it'} answered")
        return why
    if not r.reached:
        return [f"not reached: {r.note or r.verdict}"]
    if exp.backends is not None and not _matches(r.backend or "", exp.backends):
        why.append(f"backend {r.backend} is not one of {', '.join(exp.backends)}")
    want = exp.source
    if want and exp.hairpin_source and r.backend == src.name:
        want = exp.hairpin_source                          # hairpin: masqueraded to the bridge
    if want and r.proto != "icmp":
        if not _source_ok(want, r, plan):
            why.append(f"source seen {r.seen_ip}, expected {_source_text(want, r)}")
    if exp.nat and r.proto != "icmp":
        got = {(False, False): "none", (True, False): "dnat", (False, True): "snat", (True, True): "both"}[
            (bool(r.dnat), bool(r.snat))]
        if got != exp.nat:
            why.append(f"nat {got}, expected {exp.nat}")
    return why


def node_addresses(plan: LabPlan, name: str | None = None) -> set[str]:
    """Addresses a node masquerades to: underlay IP, bridge (cni0), flannel.1 (subnet .0)."""
    out: set[str] = set()
    for n in plan.nodes:
        if name in (None, n.name):
            out |= {n.address, n.gateway, n.subnet.split("/")[0]}
    return out


def _source_ok(want: str, r: probing.ProbeResult, plan: LabPlan) -> bool:
    seen = r.seen_ip
    if want == "client":
        return seen == r.source_ip
    if want == "not-client":
        return seen != r.source_ip
    if want == "node":
        return seen in node_addresses(plan)
    if any(n.name == want for n in plan.nodes):
        return seen in node_addresses(plan, want)
    return seen == want


def _source_text(want: str, r) -> str:
    return {"client": f"the client's {r.source_ip}", "not-client": f"not {r.source_ip} (SNAT)",
            "node": "a node address (SNAT)"}.get(want, f"{want}")


def _group(keys) -> str:
    """Backends for people: replicas of one Deployment as ``{web-8t954n9w2c-* ×6}``."""
    short = [k.split("/")[-1] for k in keys]
    prefixes = {s.rsplit("-", 1)[0] for s in short}
    if len(short) > 2 and len(prefixes) == 1 and all("-" in s for s in short):
        return f"{{{prefixes.pop()}-* ×{len(short)}}}"
    return "{" + ", ".join(short) + "}"


def _matches(backend: str, patterns) -> bool:
    short = backend.split("/")[-1]
    return any(fnmatch.fnmatchcase(backend, p) or fnmatch.fnmatchcase(short, p) for p in patterns)


def run(plan: LabPlan, res, cases: list[Case], timeout: float = 0.5) -> tuple[list[Outcome], float]:
    """Probe every case; returns the outcomes and the seconds taken."""
    t0 = time.monotonic()
    out: list[Outcome] = []
    for case in cases:
        try:
            src = resolve_source(case.source, plan)
            target: Target = dnsname.resolve(case.target, plan, res, src, case.proto, case.port, timeout)
            r = probing.run(plan, src, target, timeout=timeout)
        except dnsname.NameNotFound as exc:          # a name that does not resolve is not reached
            ok = not case.expect.reach
            out.append(Outcome(case, ok, f"name not found ({exc.rcodes})", [] if ok else [str(exc)]))
            continue
        except (NetsimError, OSError) as exc:
            out.append(Outcome(case, False, f"error: {exc}", [str(exc)]))
            continue
        why = judge(case.expect, r, src, plan)
        out.append(Outcome(case, not why, _got(r), why, r))
    return out, time.monotonic() - t0


def _got(r: probing.ProbeResult) -> str:
    if not r.reached:
        return r.note or r.verdict
    if r.proto == "icmp":
        return f"{r.verdict} from {r.backend}"
    return f"{(r.backend or '?').split('/')[-1]}, source {r.seen_ip}"
