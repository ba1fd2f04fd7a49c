"""The applier: build a planned lab in the kernel, start its node agents, tear it down.

Everything created is recorded in the lab's state directory *before* it is created, and
any failure (or Ctrl-C) tears the partial lab down again, so nothing is left half-built.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Callable

from .. import naming
from ..errors import ApplyError, NetsimError
from ..plan.overlay import parse_subnet_env
from ..plan.state import ExternalPlan, LabPlan, Namespace
from ..registry import open_registry
from ..registry.flannel import CONFIG_KEY, NetworkConfig
from ..runtime.podcheck import answers
from ..runtime.wait import wait_for
from . import kernel, labstate, netns
from .labstate import LabState, Process

STOP_GRACE = 3.0



@dataclass
class UpReport:
    plan: LabPlan
    seconds: float


def up(plan: LabPlan, source: str = "", timeout: float = 30.0,
       replan: Callable[[dict], LabPlan] | None = None, objects: dict | None = None,
       topology=None) -> UpReport:
    """Create the lab and return once every pod answers. On any failure, undo it all.

    Order, as on a real cluster: machines and underlay; the registry and the network
    config; a flannel agent per node, which leases the node's subnet and builds the
    overlay; then the CNI part (cni0, pods) on the leased subnets; then the pods' servers.
    ``replan(subnets)`` plans again if the registry leased other subnets than planned.
    """
    t0 = time.monotonic()
    st = labstate.begin(plan.lab, source, unique_netns(plan))
    labstate.save_plan(plan)
    try:
        for name in unique_netns(plan):
            netns.create(name)
        build(plan, ("underlay", "node", "external"))
        url = start_registry(plan, st)
        agents = {node.name: start_flannel(plan, node.name, url, st) for node in plan.nodes}
        leased = wait_leases(plan, timeout, agents)
        if any(leased[n.name] != n.subnet for n in plan.nodes):
            if replan is None:
                raise ApplyError("leasing subnets", f"the registry leased {leased}, not the planned subnets")
            plan = replan({k: IPv4Network(v) for k, v in leased.items()})
            labstate.save_plan(plan)
        build(plan, ("node-cni", "pod"))
        for node in plan.nodes:
            start_podserver(plan, node.name, st)
        for ext in plan.externals:
            start_external_server(ext, st)
        wait_pods(plan, max(timeout - (time.monotonic() - t0), 1.0))
        if topology is not None:
            from .services import publish
            publish(plan.lab, topology, plan)
            proxies = {n.name: start_kubeproxy(plan, n.name, url, st) for n in plan.nodes}
            wait_kubeproxies(plan, proxies, max(timeout - (time.monotonic() - t0), 1.0))
        if objects is not None:
            from .changes import pin_addresses, save_objects
            save_objects(plan.lab, pin_addresses(objects, plan))
        st.status = "up"
        st.save()
    except BaseException as exc:
        st.status = "failed"
        st.save()
        teardown(st)
        if isinstance(exc, (NetsimError, KeyboardInterrupt, SystemExit)):
            raise
        raise ApplyError(f"bringing up lab {plan.lab}", f"{type(exc).__name__}: {exc}") from exc
    return UpReport(plan, time.monotonic() - t0)


def unique_netns(plan: LabPlan) -> list[str]:
    return list(dict.fromkeys(ns.name for ns in plan.namespaces))


def build(plan: LabPlan, roles: tuple[str, ...]) -> None:
    """Program the namespaces of the given roles, in plan order.

    The order (underlay, nodes, externals, node bridges, pods) means every interface a
    namespace configures was already created by the namespace that owns its veth peer.
    """
    for ns in plan.namespaces:
        if ns.role in roles:
            build_namespace(ns, plan.iptables_backend)


# -- registry and flannel ----------------------------------------------------------

def start_registry(plan: LabPlan, st: LabState) -> str:
    """Start the lab's registry (embedded file or a real etcd) and write the network config."""
    if plan.registry_endpoint:
        url = plan.registry_endpoint               # the user's own etcd: netsim only uses it
    elif plan.registry == "etcd":
        from ..registry.server import start_etcd
        server = start_etcd(str(st.dir))
        atexit.unregister(server.stop)            # it belongs to the lab, not to this command
        st.processes.append(Process(server.pid, "etcd", "", labstate.start_time(server.pid)))
        st.save()
        url = server.url
    else:
        url = f"sqlite://{st.dir / 'registry.db'}"
    write_json_text(st.dir / "registry.url", url)
    reg = open_registry(url)
    try:
        current = reg.get(CONFIG_KEY)
        if current is None:
            reg.put(CONFIG_KEY, plan.network_config)
        elif NetworkConfig.parse(current.value) != NetworkConfig.parse(plan.network_config):
            raise ApplyError("registry", f"{CONFIG_KEY} already holds a different network config: {current.value}")
    finally:
        reg.close()
    return url


def registry_url(lab: str) -> str:
    return (labstate.lab_dir(lab) / "registry.url").read_text().strip()


def flannel_dir(lab: str, node: str) -> Path:
    return labstate.lab_dir(lab) / "flannel" / node


def start_flannel(plan: LabPlan, node: str, url: str, st: LabState) -> Process:
    """Start the node's flannel agent. Its subnet.env starts out holding the planned subnet,
    which flannel reads as the node's previous subnet and takes back if it is free."""
    n = plan.node(node)
    d = flannel_dir(plan.lab, node)
    d.mkdir(parents=True, exist_ok=True)
    overlay = next(o for o in plan.overlay_state if o.node == node)
    if not (d / "subnet.env").exists():
        write_json_text(d / "subnet.env", overlay.subnet_env)
    (d / "ready").unlink(missing_ok=True)
    args = [sys.executable, "-m", "netsim.agents.flannel", "--registry", url, "--node", node,
            "--public-ip", n.address, "--iface", naming.UPLINK, "--underlay", plan.underlay_cidr,
            "--subnet-file", str(d / "subnet.env"), "--status-file", str(d / "status.json"),
            "--ready-file", str(d / "ready"), "--ip-masq", "--iptables-backend", plan.iptables_backend,
            "--lease-ttl", str(plan.lease_ttl), "--renew-margin", str(plan.renew_margin)]
    if n.vtep_mac:
        args += ["--vtep-mac", n.vtep_mac]
    return start_agent(st, "flannel", n.netns, node, args)


def start_kubeproxy(plan: LabPlan, node: str, url: str, st: LabState) -> Process:
    """Start the node's kube-proxy agent in the plan's proxy mode."""
    n = plan.node(node)
    d = labstate.lab_dir(plan.lab) / "kube-proxy"
    d.mkdir(exist_ok=True)
    (d / f"{node}.ready").unlink(missing_ok=True)
    args = [sys.executable, "-m", "netsim.agents.kubeproxy", "--registry", url, "--node", node,
            "--node-ip", n.address, "--pod-cidr", plan.pod_cidr,
            "--service-cidr", plan.service_cidr, "--iface", naming.UPLINK,
            "--mode", plan.proxy_mode, "--iptables-backend", plan.iptables_backend, "--min-sync-period", str(plan.min_sync_period),
            "--status-file", str(d / f"{node}.json"), "--ready-file", str(d / f"{node}.ready")]
    if plan.proxy_mode == "ipvs":
        args += ["--backend-opt", f"scheduler={plan.ipvs_scheduler}"]
    return start_agent(st, "kube-proxy", n.netns, node, args)


def wait_kubeproxies(plan: LabPlan, agents: dict[str, Process], timeout: float) -> None:
    """Wait for each kube-proxy's first full sync."""
    deadline = time.monotonic() + timeout
    d = labstate.lab_dir(plan.lab)
    for node, proc in agents.items():
        log = d / "logs" / f"kube-proxy-{node}.log"
        wait_for(lambda: ready_or_dead(d / "kube-proxy" / f"{node}.ready", proc, log, f"kube-proxy on {node}"),
                 f"kube-proxy on {node} to sync its rules (log: {log})", max(deadline - time.monotonic(), 0.1))


def wait_leases(plan: LabPlan, timeout: float, agents: dict[str, Process]) -> dict[str, str]:
    """Wait for every flannel agent to hold a lease; return node → leased subnet.
    An agent that exits instead (pool exhausted, bad config) fails the wait with its reason."""
    leased = {}
    deadline = time.monotonic() + timeout
    for n in plan.nodes:
        d = flannel_dir(plan.lab, n.name)
        log = labstate.lab_dir(plan.lab) / "logs" / f"flannel-{n.name}.log"
        wait_for(lambda: ready_or_dead(d / "ready", agents[n.name], log, f"flannel agent on {n.name}"),
                 f"the flannel agent on {n.name} to lease a subnet (log: {log})",
                 max(deadline - time.monotonic(), 0.1))
        env = parse_subnet_env((d / "subnet.env").read_text())
        leased[n.name] = str(IPv4Network(env["FLANNEL_SUBNET"], strict=False))
    return leased


def ready_or_dead(ready: Path, proc: Process, log: Path, what: str) -> bool:
    """True once ``ready`` exists; raises ApplyError with the log's last line if ``proc`` died."""
    if ready.exists():
        return True
    if not process_running(proc):
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        raise ApplyError(what, lines[-1] if lines else "exited without a word")
    return False


def process_running(proc: Process) -> bool:
    try:
        if os.waitpid(proc.pid, os.WNOHANG)[0] == proc.pid:
            return False                              # our child, and it has exited
    except ChildProcessError:
        pass
    return labstate.start_time(proc.pid) == proc.start_time and not _zombie(proc.pid)


def write_json_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_namespace(ns: Namespace, iptables_backend: str) -> None:
    ipr = netns.iproute(ns.name)
    try:
        kernel.create_links(ns, ipr)
        kernel.configure(ns, ipr)
    finally:
        ipr.close()
    kernel.set_sysctls(ns)
    kernel.restore_iptables(ns.name, ns.iptables, iptables_backend)


# -- node agents ----------------------------------------------------------------

def podserver_spec(plan: LabPlan, node: str) -> dict:
    return {"node": node, "pods": [
        {"name": p.name, "namespace": p.namespace, "netns": p.netns,
         "ports": [{"port": x.port, "protocol": x.protocol, "name": x.name} for x in p.ports]}
        for p in plan.pods if p.node == node]}


def start_podserver(plan: LabPlan, node: str, st: LabState) -> Process:
    """Start the node's pod server (one process serves every pod of the node)."""
    d = st.dir
    spec = d / f"podserver-{node}.json"
    labstate.write_json(spec, podserver_spec(plan, node))
    ready = d / f"podserver-{node}.ready"
    ready.unlink(missing_ok=True)
    args = [sys.executable, "-m", "netsim.agents.podserver", "--spec", str(spec),
            "--control", str(d / f"podserver-{node}.sock"), "--ready-file", str(ready)]
    return start_agent(st, "podserver", plan.node(node).netns, node, args)


def start_external_server(ext: ExternalPlan, st: LabState) -> Process:
    """The built-in server on an external host (it serves in its own namespace)."""
    d = st.dir
    spec = d / f"extserver-{ext.name}.json"
    labstate.write_json(spec, {"node": ext.name, "pods": [
        {"name": ext.name, "namespace": "external", "netns": None,
         "ports": [{"port": x.port, "protocol": x.protocol, "name": x.name} for x in ext.ports]}]})
    ready = d / f"extserver-{ext.name}.ready"
    ready.unlink(missing_ok=True)
    args = [sys.executable, "-m", "netsim.agents.podserver", "--spec", str(spec),
            "--control", str(d / f"extserver-{ext.name}.sock"), "--ready-file", str(ready)]
    return start_agent(st, "extserver", ext.netns, ext.name, args)


def start_agent(st: LabState, role: str, ns: str, node: str, args: list[str]) -> Process:
    """Run ``args`` inside namespace ``ns`` as a detached process recorded in the lab state."""
    log = open(st.dir / "logs" / f"{role}-{node}.log", "ab")
    try:
        proc = subprocess.Popen(["ip", "netns", "exec", ns] + args, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, close_fds=True)
    finally:
        log.close()
    rec = Process(proc.pid, role, ns, labstate.start_time(proc.pid))
    # A restarted agent replaces its dead predecessor's record (status reads the first match).
    st.processes = [p for p in st.processes
                    if not (p.role == role and p.netns == ns and not process_running(p))]
    st.processes.append(rec)
    st.save()
    return rec


def wait_pods(plan: LabPlan, timeout: float) -> None:
    """Wait for each pod server's ready file, then for every pod to answer from its node."""
    deadline = time.monotonic() + timeout
    d = labstate.lab_dir(plan.lab)
    servers = [("podserver", n.name) for n in plan.nodes] + [("extserver", e.name) for e in plan.externals]
    for role, name in servers:
        wait_for(lambda: (d / f"{role}-{name}.ready").exists(),
                 f"the {role} on {name} (log: {d / 'logs' / f'{role}-{name}.log'})",
                 max(deadline - time.monotonic(), 0.1))
    wait_answers(plan, plan.pods, max(deadline - time.monotonic(), 0.1))


def wait_answers(plan: LabPlan, pods, timeout: float) -> None:
    """Wait until each of ``pods`` answers from inside its node."""
    deadline = time.monotonic() + timeout
    netns_of = {n.name: n.netns for n in plan.nodes}
    for pod in pods:
        wait_for(lambda: answers(pod, netns_of[pod.node]),
                 f"pod {pod.key} ({pod.ip} on {pod.node}) to answer",
                 max(deadline - time.monotonic(), 0.1))


# -- teardown --------------------------------------------------------------------

def down(lab: str) -> LabState:
    st = LabState.load(lab)
    teardown(st)
    return st


def teardown(st: LabState) -> None:
    """Stop the lab's processes, then unpin its namespaces, then forget it."""
    st.status = "deleting"
    if st.dir.exists():
        st.save()
    stop_processes(st.processes, st.netns)
    for name in reversed(st.netns):
        netns.remove(name)
    labstate.remove_dir(st.lab)


def stop_processes(procs: list[Process], netns_names: list[str] = ()) -> None:
    """SIGTERM the recorded processes (still ours: same start time), then anything else
    running inside ``netns_names`` (a user's exec, a stray agent); SIGKILL what lingers."""
    ours = [p.pid for p in procs if labstate.start_time(p.pid) == p.start_time]
    for pid in ours:
        _signal(pid, signal.SIGTERM)
    _wait_gone(ours)
    inodes = {i for name in netns_names if (i := netns.inode(name)) is not None}
    strays = [pid for pid in netns.pids_inside(inodes) if pid != os.getpid()]
    for pid in strays:
        _signal(pid, signal.SIGTERM)
    _wait_gone(strays)


def clean(lab: str | None = None) -> list[str]:
    """Remove labs from their state files, and namespaces carrying netsim's marker that
    no state file accounts for (left by a crash between mkdir and the first save)."""
    removed = []
    for name in ([lab] if lab else labstate.labs()):
        try:
            st = LabState.load(name)
        except NetsimError:
            st = LabState(name, netns=netns.listed(naming.lab_prefix(name)))
        st.netns = sorted(set(st.netns) | set(netns.listed(naming.lab_prefix(name))))
        teardown(st)
        removed.append(name)
    known = set(labstate.labs())
    prefix = naming.lab_prefix(lab) if lab else naming.NETNS_PREFIX
    orphans = [n for n in netns.listed(prefix) if n.split(".")[1] not in known]
    if orphans:
        labs = sorted({n.split(".")[1] for n in orphans})
        for name in labs:
            teardown(LabState(name, netns=[n for n in orphans if n.split(".")[1] == name]))
            if name not in removed:
                removed.append(name)
    return removed


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pids: list[int]) -> None:
    def gone() -> bool:
        alive = False
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)          # reap our own children
            except ChildProcessError:
                pass
            alive = alive or labstate.pid_alive(pid) and not _zombie(pid)
        return not alive
    try:
        wait_for(gone, "processes to exit", STOP_GRACE)
    except NetsimError:
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        wait_for(gone, f"processes {pids} to exit after SIGKILL", STOP_GRACE)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
