"""``netsim probe FROM TARGET``: was it reached, which backend answered, what source it saw.

Two opinions, both from inside the source namespace:

1. scapy's crafted packet (``scapyprobe``): does a SYN get a SYN-ACK, a datagram an
   answer, an echo a reply — or a RST, an ICMP error, nothing?
2. a real connection to the built-in server (``connect.ask``): the backend's own name
   and the ``ip:port`` it saw as its peer, on one flow.

From the two follow the facts a teacher asks about: DNAT (the backend is not the address
dialled) and SNAT (the backend saw another source than the client's own address).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..plan.state import LabPlan
from . import connect, scapyprobe
from .targets import Source, Target


@dataclass
class ProbeResult:
    source: str                    # "default/client"
    source_ip: str                 # the address the probe left with
    target: str                    # Target.label
    kind: str                      # Target.kind
    address: str                   # ip[:port] dialled
    proto: str
    reached: bool
    verdict: str                   # scapy's view: SYN-ACK, RST, UDP reply, ICMP ..., no answer
    backend: str | None = None     # who answered: a pod key or an external's name
    backend_ip: str | None = None
    seen: str | None = None        # "ip:port" the backend saw as its peer
    dnat: bool | None = None       # the backend is not the address dialled
    snat: bool | None = None       # the backend saw another source than ours
    rtt_ms: float | None = None
    note: str = ""
    local: str | None = None       # "ip:port" of the real connection's socket
    dns: dict | None = None        # a DNS name TARGET: what the pod's nameserver answered

    @property
    def seen_ip(self) -> str | None:
        return self.seen.rsplit(":", 1)[0] if self.seen else None

    def to_dict(self) -> dict:
        """JSON keys in camelCase, as ``netsim status -o json``."""
        return camel(dict(asdict(self), seen_ip=self.seen_ip))


def camel(data: dict) -> dict:
    """``source_ip`` → ``sourceIP``, ``rtt_ms`` → ``rttMs`` (IP stays upper case)."""
    def key(k: str) -> str:
        head, *rest = k.split("_")
        return head + "".join("IP" if w == "ip" else w.capitalize() for w in rest)
    return {key(k): v for k, v in data.items()}


def run(plan: LabPlan, src: Source, target: Target, timeout: float = 1.0) -> ProbeResult:
    crafted = scapyprobe.send(src.netns, target.ip, target.proto, target.port, timeout=timeout)
    result = ProbeResult(src.name, crafted.src, target.label, target.kind, target.address, target.proto,
                         crafted.reached, crafted.verdict, rtt_ms=crafted.rtt_ms, dns=target.extra.get("dns"))
    if target.proto == "icmp":
        if crafted.reached:
            result.backend_ip = crafted.reply_from
            result.backend = _name_of(plan, crafted.reply_from)
        return result
    if not crafted.reached:
        return result
    try:
        # UDP: the same source port, so conntrack steers it to the backend scapy's datagram reached.
        answer = connect.ask(src.netns, target.ip, target.port, target.proto, timeout=timeout,
                             sport=crafted.sport if target.proto == "udp" else 0)
    except OSError as exc:
        result.reached = False
        result.note = f"scapy got {crafted.verdict}, but a real connection failed: {exc.strerror or exc}"
        return result
    result.backend, result.backend_ip = _key_of(plan, answer.hostname, target)
    result.seen = answer.seen
    result.dnat = result.backend_ip is not None and result.backend_ip != target.ip
    result.local = answer.local
    result.snat = result.seen != answer.local       # the address, or only the port (masquerade to itself)
    if target.proto == "udp" and crafted.payload and crafted.payload != answer.hostname:
        result.note = f"scapy's datagram was answered by {crafted.payload}"
    return result


def _key_of(plan: LabPlan, hostname: str, target: Target) -> tuple[str, str | None]:
    ns = target.service.split("/")[0] if target.service else None
    pods = [p for p in plan.pods if p.name == hostname]
    pod = next((p for p in pods if ns is None or p.namespace == ns), pods[0] if pods else None)
    if pod is not None:
        return pod.key, pod.ip
    ext = next((e for e in plan.externals if e.name == hostname), None)
    if ext is not None:
        return ext.name, ext.address
    return hostname, None


def _name_of(plan: LabPlan, ip: str) -> str:
    for p in plan.pods:
        if p.ip == ip:
            return p.key
    for group in (plan.nodes, plan.externals):
        for m in group:
            if m.address == ip:
                return m.name
    return ip


def text(r: ProbeResult) -> str:
    """A short report for people."""
    if r.reached:
        how = f"reached ({r.verdict}{f' in {r.rtt_ms:g} ms' if r.rtt_ms is not None else ''})"
    else:
        how = f"NOT reached ({r.verdict})"
    lines = [f"from     {r.source} ({r.source_ip})"]
    if r.dns:
        lines.append(f"dns      {r.dns['name']} → {r.dns['answeredAs']} A {', '.join(r.dns['addresses'])} "
                     f"(from {r.dns['server']})")
    lines += [f"to       {r.target}",
             f"result   {how}"]
    if r.backend:
        nat = f"DNAT {r.address} → {r.backend_ip}" if r.dnat else "no DNAT"
        lines.append(f"backend  {r.backend} {r.backend_ip or ''}  ({nat})")
    if r.seen:
        lines.append(f"source   the backend saw {r.seen}  "
                     f"({'SNAT: not ' + (r.local or r.source_ip) if r.snat else 'no SNAT, the client address'})")
    if r.note:
        lines.append(f"note     {r.note}")
    return "\n".join(lines)
