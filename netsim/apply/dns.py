"""The cluster DNS on a running lab: dnsmasq in the coredns pods, the zone it serves, and
every pod's resolv.conf.

Each replica is Debian's dnsmasq, started inside its pod's namespace (like every agent,
through ``ip netns exec``, recorded in the lab state, logging to ``logs/dnsmasq-<pod>.log``)
with no upstream at all: ``--no-resolv`` and ``--local=/cluster.local/`` make it answer
cluster names from its own records and NXDOMAIN for the rest of the zone, and refuse
anything else, so no query leaves the lab.

The zone (``netsim.dns.records``) lives in ``<lab>/dns/``: A records in ``hosts/cluster``,
a directory dnsmasq watches with inotify (a rewrite is served within milliseconds, no
signal), CNAME and SRV records in ``records.conf``, which dnsmasq reads only at start: when
that part changes, each replica gets a new dnsmasq, one replica at a time, handed over
without losing a query (``netsim.dns.server``: two ports and a REDIRECT of port 53 inside
the pod).

A pod's resolver is ``/etc/netns/<pod netns>/resolv.conf``: ``ip netns exec`` (and so
``netsim exec POD``) bind-mounts it over /etc/resolv.conf. Those files are recorded in
the lab state before they are written and removed with the pod or the lab.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from ..dns import objects, server
from ..dns.query import Answer, query
from ..dns.records import Srv, Zone, render_config, render_hosts, resolv_conf, zone
from ..errors import ApplyError
from ..plan.state import LabPlan, PodPlan
from ..proxy.services import Resolution
from ..runtime.wait import wait_for
from ..topology.model import Topology
from . import kernel, labstate
from .labstate import LabState, Process

ETC_NETNS = Path("/etc/netns")          # where ip netns exec looks for per-namespace /etc files
RESOLV_MARK = "# written by netsim for pod"
CHECK_NAMES = 8                 # changed names checked per replica when measuring an update


def dns_dir(lab: str) -> Path:
    return labstate.lab_dir(lab) / "dns"


def dns_pods(plan: LabPlan) -> list[PodPlan]:
    return [p for p in plan.pods if objects.is_dns_pod(p)]


def server_ip(plan: LabPlan) -> str:
    from ipaddress import IPv4Network
    return str(objects.service_ip(IPv4Network(plan.service_cidr)))


# -- resolv.conf ---------------------------------------------------------------------

def resolv_path(pod: PodPlan) -> Path:
    return ETC_NETNS / pod.netns / "resolv.conf"


def write_resolv(st: LabState, plan: LabPlan, pods: list[PodPlan]) -> None:
    """Give ``pods`` the cluster resolver (recorded in the lab state first)."""
    paths = [str(resolv_path(p)) for p in pods]
    st.files = list(dict.fromkeys(st.files + paths))
    st.save()
    server = server_ip(plan)
    for pod in pods:
        path = resolv_path(pod)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("resolv.conf.tmp")
        tmp.write_text(f"{RESOLV_MARK} {pod.key} (lab {plan.lab})\n" + resolv_conf(pod.namespace, server))
        os.replace(tmp, path)


def remove_files(paths: list[str]) -> None:
    """Remove files netsim wrote, and their /etc/netns/<name> directory once empty."""
    for p in map(Path, paths):
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".tmp").unlink(missing_ok=True)
        if p.parent.parent == ETC_NETNS:
            try:
                p.parent.rmdir()
            except OSError:
                pass


def sweep(netns_names: list[str]) -> None:
    """Remove resolv.conf files netsim wrote for these namespaces even if no state file
    lists them (``netsim clean`` after a crash)."""
    for name in netns_names:
        path = ETC_NETNS / name / "resolv.conf"
        try:
            ours = path.read_text().startswith(RESOLV_MARK)
        except OSError:
            continue
        if ours:
            remove_files([str(path)])


def prune(st: LabState, plan: LabPlan) -> None:
    """Drop the resolv.conf of pods the plan no longer has (their node was removed)."""
    keep = {str(resolv_path(p)) for p in plan.pods}
    gone = [f for f in st.files if Path(f).parent.parent == ETC_NETNS and f not in keep]
    if gone:
        remove_files(gone)
        st.files = [f for f in st.files if f not in gone]
        st.save()


def forget_pod(st: LabState, pod: PodPlan) -> None:
    path = str(resolv_path(pod))
    remove_files([path])
    if path in st.files:
        st.files = [f for f in st.files if f != path]
        st.save()


# -- the zone --------------------------------------------------------------------------

def write_zone(lab: str, z: Zone) -> tuple[Zone | None, bool]:
    """Write the zone files; return the previous zone and whether records.conf changed."""
    d = dns_dir(lab)
    (d / "hosts").mkdir(parents=True, exist_ok=True)
    old = load_zone(lab)
    config = render_config(z)
    conf = d / "records.conf"
    changed = not conf.exists() or conf.read_text() != config
    if changed:
        _replace(conf, config)
    # The temporary file sits outside the watched directory, so dnsmasq never reads half a file.
    _replace(d / "hosts" / "cluster", render_hosts(z), tmp=d / "cluster.hosts.tmp")
    labstate.write_json(d / "zone.json", {"hosts": [list(h) for h in z.hosts], "cnames": [list(c) for c in z.cnames],
                                         "srvs": [asdict(s) for s in z.srvs]})
    return old, changed


def load_zone(lab: str) -> Zone | None:
    try:
        data = json.loads((dns_dir(lab) / "zone.json").read_text())
    except (OSError, ValueError):
        return None
    return Zone(tuple(tuple(h) for h in data["hosts"]), tuple(tuple(c) for c in data["cnames"]),
                tuple(Srv(**s) for s in data["srvs"]))


def _replace(path: Path, text: str, tmp: Path | None = None) -> None:
    tmp = tmp or path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def expectations(z: Zone) -> dict[str, tuple[str, frozenset[str]]]:
    """name → (query type, the answer values every replica must give)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for ip, name in z.hosts:
        out.setdefault(name, ("A", set()))[1].add(ip)
    for alias, target in z.cnames:
        out[alias] = ("CNAME", {target})
    for s in z.srvs:
        out.setdefault(s.name, ("SRV", set()))[1].add(f"{s.priority} {s.weight} {s.port} {s.target}")
    return {k: (t, frozenset(v)) for k, (t, v) in out.items()}


def changed_names(old: Zone | None, new: Zone) -> dict[str, tuple[str, frozenset[str]] | None]:
    """Names whose answer changes: name → new expectation (None: must be NXDOMAIN)."""
    a, b = expectations(old or Zone()), expectations(new)
    out: dict[str, tuple[str, frozenset[str]] | None] = {}
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            out[name] = b.get(name)
    return out


def answers_as_expected(answer: Answer, want: tuple[str, frozenset[str]] | None) -> bool:
    if want is None:
        return answer.rcode == "NXDOMAIN"
    qtype, values = want
    return answer.rcode == "NOERROR" and frozenset(answer.values(qtype)) == values


# -- dnsmasq ---------------------------------------------------------------------------

def start_server(st: LabState, pod: PodPlan, port: int) -> Process:
    from .lab import start_agent
    return start_agent(st, "dnsmasq", pod.netns, pod.name, server.dnsmasq_args(dns_dir(st.lab), port))


def server_of(st: LabState, pod: PodPlan) -> Process | None:
    from .lab import process_running
    return next((p for p in reversed(st.processes)
                 if p.role == "dnsmasq" and p.netns == pod.netns and process_running(p)), None)


def port_of(proc: Process | None) -> int | None:
    """The port a running dnsmasq was started on (from its command line)."""
    try:
        args = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0") if proc else []
    except OSError:
        return None
    return next((int(a.split(b"=", 1)[1]) for a in args if a.startswith(b"--port=")), None)


def replica_answers(plan: LabPlan, pod: PodPlan, name: str, want, timeout: float = 0.3,
                    port: int = objects.DNS_PORT) -> bool:
    try:
        qtype = want[0] if want else "A"
        return answers_as_expected(query(pod.ip, name, qtype, netns=plan.node(pod.node).netns,
                                         timeout=timeout, port=port), want)
    except OSError:
        return False


def wait_serving(st: LabState, plan: LabPlan, pod: PodPlan, proc: Process, port: int, timeout: float) -> None:
    """Wait until the replica's dnsmasq answers for the kube-dns Service's own name on
    ``port``; if it exits instead, fail with the last line of its log."""
    from .lab import process_running
    name = f"{objects.SERVICE}.{objects.NAMESPACE}.svc.{objects.DOMAIN}"
    want = ("A", frozenset({server_ip(plan)}))
    log = st.dir / "logs" / f"dnsmasq-{pod.name}.log"

    def serving() -> bool:
        if replica_answers(plan, pod, name, want, port=port):
            return True
        if not process_running(proc):
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            raise ApplyError(f"dnsmasq in {pod.key}", lines[-1] if lines else "exited without a word")
        return False
    wait_for(serving, f"dnsmasq in {pod.key} ({pod.ip}:{port}) to answer {name} (log: {log})", timeout)


def start_replica(st: LabState, plan: LabPlan, pod: PodPlan, timeout: float) -> None:
    """A replica's first dnsmasq (or one replacing a dead one): start, wait, redirect 53 to it."""
    first = not _redirect_installed(pod, plan.iptables_backend)
    port = server.SERVER_PORTS[0]
    wait_serving(st, plan, pod, start_server(st, pod, port), port, timeout)
    kernel.restore_iptables(pod.netns, server.redirect_rules(port, first), plan.iptables_backend)


def _redirect_installed(pod: PodPlan, backend: str) -> bool:
    """Does the pod's nat table already jump to NETSIM-DNS? (A replica rescheduled to
    another node keeps its name but gets a fresh namespace.)"""
    save = kernel.RESTORE[backend].replace("-restore", "-save")
    out = subprocess.run(["ip", "netns", "exec", pod.netns, save, "-t", "nat"], capture_output=True, text=True).stdout
    return f"-j {server.CHAIN}" in out


def restart(st: LabState, plan: LabPlan, pod: PodPlan, timeout: float) -> None:
    """Replace a replica's dnsmasq without losing a query: the new one starts on the other
    port and answers, port 53 is redirected to it, the old one drains and exits."""
    from .lab import stop_processes
    old = server_of(st, pod)
    if old is None:
        start_replica(st, plan, pod, timeout)
        return
    old_port = port_of(old)
    port = server.other_port(old_port)
    wait_serving(st, plan, pod, start_server(st, pod, port), port, timeout)
    kernel.restore_iptables(pod.netns, server.redirect_rules(port, first=False), plan.iptables_backend)
    if old_port is not None:
        # Flows NATed to the old port (a client reusing a source port within the UDP
        # conntrack timeout) would keep reaching it: forget them, so they meet the new one.
        _forget_flows(pod, old_port)
        wait_for(lambda: not _queued(old.pid, old_port), f"dnsmasq {old.pid} in {pod.key} to drain its queries", timeout)
    stop_processes([old])
    st.processes = [p for p in st.processes if p != old]
    st.save()
    if old_port is not None:
        _forget_flows(pod, old_port)


def _forget_flows(pod: PodPlan, port: int) -> None:
    """Delete the pod's conntrack entries redirected to ``port`` (marked with it): one
    kernel-side flush, however many flows a busy client left."""
    from pyroute2 import NFCTSocket
    ct = NFCTSocket(netns=pod.netns)          # created inside the pod (netns=, not setns around it)
    try:
        ct.flush(mark=port, mark_mask=0xFFFFFFFF)
    finally:
        ct.close()


def _queued(pid: int, port: int) -> bool:
    """Does the UDP socket on ``port`` of process ``pid`` (its namespace's view) hold unread datagrams?"""
    try:
        lines = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and int(fields[4].split(":")[1], 16):
            return True
    return False


def bring_up(st: LabState, topo: Topology, plan: LabPlan, res: Resolution, timeout: float = 30.0) -> None:
    """Write the zone, start dnsmasq in every coredns pod, point every pod at it."""
    write_zone(st.lab, zone(topo, plan, res))
    write_resolv(st, plan, list(plan.pods))
    for pod in dns_pods(plan):
        start_replica(st, plan, pod, timeout)


def sync(st: LabState, topo: Topology, plan: LabPlan, res: Resolution, timeout: float = 30.0) -> tuple[float, int]:
    """Bring the running DNS in line with ``topo``/``plan``: new replicas started, the zone
    rewritten, the replicas replaced one at a time if CNAME/SRV records changed. Returns the
    update latency (zone written → every replica gives the new answers for the changed
    names, asked on port 53; 0 if none) and how many names changed."""
    new = zone(topo, plan, res)
    written = time.monotonic()
    old, config_changed = write_zone(st.lab, new)           # before any start: new replicas read it
    changed = changed_names(old, new)
    started = [p for p in dns_pods(plan) if server_of(st, p) is None]
    for pod in started:
        start_replica(st, plan, pod, timeout)
    if config_changed:
        for pod in dns_pods(plan):
            if pod not in started:
                restart(st, plan, pod, timeout)
    check = list(changed.items())[:CHECK_NAMES]
    for pod in dns_pods(plan):
        for name, want in check:
            wait_for(lambda: replica_answers(plan, pod, name, want),
                     f"dnsmasq in {pod.key} to answer {name} with {_short(want)}",
                     max(timeout - (time.monotonic() - written), 0.1))
    return (time.monotonic() - written if changed else 0.0), len(changed)


def _short(want) -> str:
    if want is None:
        return "NXDOMAIN"
    values = sorted(want[1])
    return ", ".join(values[:3]) + (f" and {len(values) - 3} more" if len(values) > 3 else "")
