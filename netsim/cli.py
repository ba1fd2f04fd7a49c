"""``netsim`` command line: up, down, status, exec, shell, clean, validate, plan."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .errors import NetsimError, TopologyError

USAGE_EXIT = 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    try:
        from .kernel import guestlab
        guest = guestlab.target(args)
        if guest is not None:               # the lab runs in a UML guest: same command, in there
            return guestlab.forward(guest, args, argv)
        return args.func(args) or 0
    except TopologyError as err:
        print(f"netsim: invalid topology: {err}", file=sys.stderr)
        for line in err.lines():
            print(f"  - {line}", file=sys.stderr)
        return USAGE_EXIT
    except NetsimError as err:
        print(f"netsim: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netsim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                 # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netsim", description=(
        "Emulate the Kubernetes network data plane on the real Linux kernel."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("up", help="bring a topology up; returns when every pod answers")
    s.add_argument("topology")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness (default 60)")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")
    s.add_argument("--kernel", choices=("auto", "host", "uml"), default="auto",
                   help="host kernel, a user-mode Linux guest, or auto (UML only when the host lacks a feature)")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("run", help="batch: bring a topology up, selftest and verify it, tear it down (host or UML kernel)")
    s.add_argument("topology")
    s.add_argument("--kernel", choices=("auto", "host", "uml"), default="auto")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness (default 60)")
    s.add_argument("--max-time", type=float, default=900.0, help="UML: stop the guest after this many seconds")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("kernel", help="kernel features; run commands in a user-mode Linux guest")
    ksub = s.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    k = ksub.add_parser("check", help="what the host and UML kernels have, and what a topology needs")
    k.add_argument("topology", nargs="?")
    k.set_defaults(func=cmd_kernel_check)
    k = ksub.add_parser("run", help="run one command in one UML boot: netsim kernel run -- CMD...")
    k.add_argument("--timeout", type=float, default=None, help="stop the guest after this many seconds")
    k.add_argument("--mem", default="1G", help="guest memory (default 1G)")
    k.add_argument("cmd", nargs=argparse.REMAINDER)
    k.set_defaults(func=cmd_kernel_run)

    s = sub.add_parser("down", help="tear a lab down, leaving nothing behind")
    s.add_argument("lab", nargs="?", help="lab name (default: the only lab up)")
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="nodes, subnets and pods of a running lab")
    s.add_argument("lab", nargs="?")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("exec", help="run a command inside a node, pod or external host")
    s.add_argument("--lab", "-l")
    s.add_argument("target", help="node, external, pod or namespace/pod")
    s.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] (default: a shell)")
    s.set_defaults(func=cmd_exec)

    s = sub.add_parser("shell", help="interactive shell, Mininet style ('<node> <cmd>')")
    s.add_argument("lab", nargs="?")
    s.set_defaults(func=cmd_shell)

    s = sub.add_parser("proxy", help="kube-proxy: render a node's ruleset without root, switch a lab's mode")
    psub = s.add_subparsers(dest="proxy_command", required=True, metavar="ACTION")
    r = psub.add_parser("render", help="print the rules kube-proxy would program on a node")
    r.add_argument("topology")
    r.add_argument("--node", required=True)
    r.add_argument("--mode", choices=("iptables", "ipvs", "nftables"), default="iptables")
    r.set_defaults(func=cmd_proxy_render)
    m = psub.add_parser("mode", help="switch a running lab's kube-proxy mode (rolling agent restart)")
    m.add_argument("mode", choices=("iptables", "ipvs", "nftables"))
    m.add_argument("--lab", "-l")
    m.add_argument("--timeout", type=float, default=30.0)
    m.set_defaults(func=cmd_proxy_mode)

    s = sub.add_parser("apply", help="create or update Kubernetes objects on a running lab")
    s.add_argument("-f", "--filename", required=True)
    s.add_argument("--lab", "-l")
    s.set_defaults(func=cmd_apply)
    s = sub.add_parser("delete", help="delete the Kubernetes objects named in a file")
    s.add_argument("-f", "--filename", required=True)
    s.add_argument("--lab", "-l")
    s.set_defaults(func=cmd_apply)
    s = sub.add_parser("scale", help="set a Deployment's replicas: scale deployment/NAME --replicas N")
    s.add_argument("target")
    s.add_argument("--replicas", type=int, required=True)
    s.add_argument("--lab", "-l")
    s.set_defaults(func=cmd_apply)

    s = sub.add_parser("node", help="add or remove a node on a running lab")
    nsub = s.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    a = nsub.add_parser("add", help="join a new node: it leases a subnet and every peer programs it")
    a.add_argument("name")
    a.add_argument("--lab", "-l")
    a.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    a.set_defaults(func=cmd_node_add)
    r = nsub.add_parser("remove", help="remove a node: its lease is deleted and peers unprogram it")
    r.add_argument("name")
    r.add_argument("--lab", "-l")
    r.set_defaults(func=cmd_node_remove)

    s = sub.add_parser("registry", help="the lab's subnet registry: get/put/delete keys, stop/start its etcd")
    rsub = s.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    g = rsub.add_parser("get", help="print keys and values, as etcdctl get does")
    g.add_argument("key", nargs="?", default="/coreos.com/network/")
    g.add_argument("--prefix", action="store_true")
    g.add_argument("--lab", "-l")
    g.set_defaults(func=cmd_registry)
    g = rsub.add_parser("put", help="write a key (e.g. to see agents skip a corrupt lease)")
    g.add_argument("key")
    g.add_argument("value")
    g.add_argument("--lab", "-l")
    g.set_defaults(func=cmd_registry)
    g = rsub.add_parser("delete", help="delete a key")
    g.add_argument("key")
    g.add_argument("--lab", "-l")
    g.set_defaults(func=cmd_registry)
    for action, text in (("stop", "stop the lab's etcd (its data is kept)"),
                         ("start", "start the lab's etcd again on its data")):
        g = rsub.add_parser(action, help=text)
        g.add_argument("--lab", "-l")
        g.set_defaults(func=cmd_registry)

    s = sub.add_parser("selftest", help="check a running lab's paths with real traffic")
    s.add_argument("lab", nargs="?")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")
    s.set_defaults(func=cmd_selftest)

    s = sub.add_parser("probe", help="send one probe FROM a pod/node/external TO a target; exit 0 if reached")
    s.add_argument("source", metavar="FROM", help="pod, ns/pod, node or external")
    s.add_argument("target", metavar="TARGET", help="pod[:port], Service, ClusterIP:port, NodeIP:nodePort, LB-IP:port, node, external")
    s.add_argument("--proto", choices=("tcp", "udp", "icmp"))
    s.add_argument("--port", help="port number or name (a Service's port)")
    s.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for an answer (default 1)")
    s.add_argument("--lab", "-l")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("trace", help="follow one probe hop by hop: captures, NAT, rules matched, conntrack, pcapng")
    s.add_argument("source", metavar="FROM")
    s.add_argument("target", metavar="TARGET")
    s.add_argument("--proto", choices=("tcp", "udp", "icmp"))
    s.add_argument("--port")
    s.add_argument("--timeout", type=float, default=1.0)
    s.add_argument("-w", "--write", metavar="PCAPNG", help="where to write the pcapng (default: the lab's traces/ directory)")
    s.add_argument("--every-packet", action="store_true", help="text: also list the packets after the first answer")
    s.add_argument("--lab", "-l")
    s.add_argument("-o", "--output", choices=("text", "json"), default="text")
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser("graph", help="draw the running topology: nodes, bridges, pods, tunnels, Services")
    s.add_argument("lab", nargs="?")
    s.add_argument("-o", "--output", choices=("text", "svg", "png", "dot"), default="text")
    s.add_argument("-w", "--write", metavar="FILE", help="write the picture here (default: stdout for text/dot, "
                   "graph.<fmt> in the current directory for svg/png)")
    s.set_defaults(func=cmd_graph)

    s = sub.add_parser("verify", help="check a running lab against its verify: section and the default Service matrix")
    s.add_argument("lab", nargs="?", metavar="TOPO|LAB", help="a topology file (its verify: section) or a lab name")
    s.add_argument("--lab", "-l", dest="lab_name", help="the running lab, when TOPO's name differs")
    s.add_argument("--no-matrix", action="store_true", help="only the topology's verify: tests")
    s.add_argument("--matrix-only", action="store_true", help="only the default matrix")
    s.add_argument("--timeout", type=float, default=0.5, help="seconds per probe (default 0.5)")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("clean", help="remove everything netsim created (all labs, or one)")
    s.add_argument("lab", nargs="?")
    s.set_defaults(func=cmd_clean)

    s = sub.add_parser("validate", help="check a topology and its manifests; create nothing")
    s.add_argument("topology")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("plan", help="print the desired state planned for a topology (no root needed)")
    s.add_argument("topology")
    s.add_argument("-o", "--output", choices=("json", "yaml"), default="yaml")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("bench", help="benchmark the kube-proxy modes against this box's baselines")
    s.add_argument("--profile", choices=("quick", "full"), default="quick",
                   help="quick: under 5 minutes; full: under 45 (default quick)")
    s.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="iptables-legacy iptables-nft nftables ipvs (default: all the profile has)")
    s.add_argument("--services", nargs="+", type=int, metavar="N", help="synthetic Service counts (default: the profile's)")
    s.add_argument("--prefix", default="bench-", help="prefix of the labs and namespaces made (default bench-)")
    s.add_argument("--out", help="results directory (default benchmarks/results/proxy-modes-PROFILE)")
    s.add_argument("--no-plots", action="store_true", help="write no PNG/SVG plots")
    s.add_argument("--deadline", type=float, help="seconds: Service counts that would end past it are skipped "
                                                  "(default: the profile's)")
    s.set_defaults(func=cmd_bench)
    return p


def _warn(warnings) -> None:
    """Problems Kubernetes accepts (a selector matching nothing, an undeclared port name), as
    kubectl prints them: one ``Warning:`` line each, on stderr."""
    for w in warnings:
        print(f"Warning: {w}", file=sys.stderr)


def _need_root() -> None:
    if os.geteuid() != 0:
        raise NetsimError("this command programs network namespaces and needs root (try sudo)")


def _interrupt_on_term() -> None:
    """SIGTERM/SIGHUP during ``up`` unwind like Ctrl-C, so the partial lab is removed."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def cmd_up(args) -> int:
    from .apply import lab as applier
    from .plan.lab import plan_lab
    from .report import as_json, status_dict, status_text
    from .apply.labstate import LabState
    from .topology import expand, load

    topo = load(args.topology)
    _need_root()
    kernel = _kernel_for_up(topo, args.kernel)
    _interrupt_on_term()
    if kernel == "uml":
        from .kernel import guestlab
        return guestlab.up(args.topology, topo.name, args.timeout, args.output)
    report = applier.up(plan_lab(topo), os.path.abspath(args.topology), args.timeout,
                        replan=lambda subnets: plan_lab(topo, subnets=subnets),
                        objects=expand(args.topology), topology=topo)
    st = LabState.load(topo.name)
    from .apply.services import load_resolution
    res = load_resolution(topo.name)
    _warn(res.warnings if res else ())
    if args.output == "json":
        print(as_json(dict(status_dict(report.plan, st), upSeconds=round(report.seconds, 3))))
    else:
        print(status_text(report.plan, st))
        print(f"\nlab {topo.name} is up in {report.seconds:.2f}s; every pod answered. "
              f"Try: netsim exec {report.plan.nodes[0].name} -- ip route; netsim down {topo.name}")
    return 0


def _kernel_for_up(topo, kernel: str) -> str:
    """host or uml; says why when the lab goes into a user-mode Linux guest."""
    from .kernel import guestlab
    from .kernel.commands import choose
    if guestlab.load(topo.name):
        raise NetsimError(f"lab {topo.name!r} is already up in a UML guest; run 'netsim down {topo.name}' first")
    d = choose(topo, kernel)
    if d.kernel == "uml":
        print(f"netsim: {d.reason}", file=sys.stderr)
    return d.kernel


def cmd_run(args) -> int:
    from .kernel.commands import run_topology
    _need_root()
    return run_topology(args.topology, args.kernel, args.timeout, args.max_time)


def cmd_kernel_check(args) -> int:
    from .kernel.commands import check_text
    from .topology import load
    text, rc = check_text(load(args.topology) if args.topology else None)
    print(text)
    return rc


def cmd_kernel_run(args) -> int:
    from .kernel.commands import kernel_run
    _need_root()
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return kernel_run(command, args.timeout, args.mem)


def cmd_down(args) -> int:
    from .apply import lab as applier
    from .apply.labstate import resolve_lab
    _need_root()
    lab = resolve_lab(args.lab)
    applier.down(lab)
    print(f"lab {lab} is down; nothing of it is left")
    return 0


def cmd_status(args) -> int:
    from .apply import labstate
    from .report import as_json, status_dict, status_text
    lab = labstate.resolve_lab(args.lab)
    plan, st = labstate.load_plan(lab), labstate.LabState.load(lab)
    print(as_json(status_dict(plan, st)) if args.output == "json" else status_text(plan, st))
    return 0


def cmd_exec(args) -> int:
    from .apply import labstate
    _need_root()
    lab = labstate.resolve_lab(args.lab)
    plan = labstate.load_plan(lab)
    target = plan.find(args.target)
    if target is None:
        names = [n.name for n in plan.nodes] + [e.name for e in plan.externals] + [p.name for p in plan.pods]
        raise NetsimError(f"no node, external or pod named {args.target!r} in lab {lab} "
                          f"(known: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    command = command or [os.environ.get("SHELL", "/bin/bash")]
    os.execvp("ip", ["ip", "netns", "exec", target.netns] + command)
    return 0   # not reached


def cmd_shell(args) -> int:
    from .apply import labstate
    from .shell import LabShell
    _need_root()
    lab = labstate.resolve_lab(args.lab)
    LabShell(labstate.load_plan(lab)).cmdloop()
    return 0


def cmd_proxy_render(args) -> int:
    from .plan.lab import plan_lab
    from .proxy.backend import render_text
    from .proxy.model import NodeContext
    from .proxy.services import resolve
    from .topology import load
    topo = load(args.topology)
    plan = plan_lab(topo)
    node = next((n for n in plan.nodes if n.name == args.node), None)
    if node is None:
        raise NetsimError(f"no node {args.node!r} in {args.topology} (nodes: {', '.join(n.name for n in plan.nodes)})")
    res = resolve(topo, plan)
    _warn(res.warnings)
    ctx = NodeContext(node.name, (node.address,), plan.pod_cidr, service_cidrs=(plan.service_cidr,),
                      ipvs_scheduler=plan.ipvs_scheduler)
    print(render_text(args.mode, res.ports, ctx), end="")
    return 0


def cmd_proxy_mode(args) -> int:
    from .apply import labstate, proxymode
    _need_root()
    lab = labstate.resolve_lab(args.lab)
    report = proxymode.switch(lab, args.mode, args.timeout)
    if report.old == report.new:
        print(f"lab {lab} already runs kube-proxy in {report.new} mode; nothing to do")
        return 0
    print(f"lab {lab}: kube-proxy switched from {report.old} to {report.new} mode on "
          f"{len(report.cleaned)} nodes in {report.seconds:.2f}s")
    for node, cleaned in report.cleaned.items():
        removed = "; ".join(f"{m}: {what}" for m, what in cleaned.items() if what != "nothing") or "nothing left"
        print(f"  {node}: removed {removed}")
    return 0


def cmd_apply(args) -> int:
    from .apply import changes, labstate
    _need_root()
    lab = labstate.resolve_lab(args.lab)
    doc = changes.load_objects(lab)
    if args.command == "scale":
        doc, touched = changes.scale(doc, args.target, args.replicas)
    else:
        doc, touched = changes.merge(doc, changes.read_file(args.filename), delete=args.command == "delete")
    result = changes.change(lab, doc, touched)
    # like kubectl, warn about the objects of this change only
    names = {f"Service {t.rsplit('/', 1)[-1]}:" for t in touched if t.startswith("Service ")}
    _warn(w for w in result.warnings if any(n in w.path for n in names))
    verb = {"apply": "applied", "delete": "deleted", "scale": "scaled"}[args.command]
    print(f"{verb}: {', '.join(touched)}; pods +{len(result.added)} -{len(result.removed)}"
          + (f"; {result.services_changed} Services reprogrammed on every node in "
             f"{result.programming_s * 1000:.0f} ms" if result.services_changed else "")
          + (f"; {result.dns_names} DNS names served by every cluster DNS replica in "
             f"{result.dns_s * 1000:.0f} ms" if result.dns_names else ""))
    for pod in result.added:
        print(f"  + {pod.key} on {pod.node} {pod.ip}")
    for pod in result.removed:
        print(f"  - {pod.key}")
    return 0


def cmd_node_add(args) -> int:
    from .apply import labstate, nodes
    _need_root()
    lab = labstate.resolve_lab(args.lab)
    labels = dict(kv.split("=", 1) for kv in args.label if "=" in kv)
    change = nodes.add_node(lab, args.name, labels)
    n = change.node
    print(f"node {n.name} joined lab {lab}: {n.address}, subnet {n.subnet}; "
          f"the overlay converged (every peer programmed it, it programmed every peer) {change.convergence_s * 1000:.0f} ms after its lease claim")
    return 0


def cmd_node_remove(args) -> int:
    from .apply import labstate, nodes
    _need_root()
    lab = labstate.resolve_lab(args.lab)
    change = nodes.remove_node(lab, args.name)
    print(f"node {args.name} removed from lab {lab}; every peer unprogrammed {change.node.subnet} "
          f"{change.convergence_s * 1000:.0f} ms after its lease was deleted")
    return 0


def cmd_registry(args) -> int:
    from .apply import labstate, registryctl
    lab = labstate.resolve_lab(args.lab)
    action = args.registry_command
    if action == "get":
        for key, value in registryctl.get(lab, args.key, args.prefix):
            print(key)
            print(value)
    elif action == "put":
        registryctl.put(lab, args.key, args.value)
        print("OK")
    elif action == "delete":
        print(registryctl.delete(lab, args.key))
    elif action == "stop":
        print(f"etcd of lab {lab} stopped (pid {registryctl.stop_etcd(lab)}); its data is kept")
    else:
        print(f"etcd of lab {lab} started again (pid {registryctl.start_etcd_again(lab)})")
    return 0


def cmd_selftest(args) -> int:
    from dataclasses import asdict
    from . import selftest
    from .apply import labstate
    from .report import as_json, table
    _need_root()
    lab = labstate.resolve_lab(args.lab)
    from .apply.services import load_resolution
    checks = selftest.run(labstate.load_plan(lab), load_resolution(lab))
    failed = [c for c in checks if not c.ok]
    if args.output == "json":
        print(as_json([asdict(c) for c in checks]))
    else:
        print(table([[c.name, c.source, c.target, c.expect, c.got, "ok" if c.ok else "FAIL"] for c in checks],
                    ["CHECK", "FROM", "TO", "EXPECT", "GOT", "RESULT"]))
        print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _probe_context(args):
    from .apply import labstate
    from .apply.services import load_resolution
    from .probes import dnsname
    from .probes.targets import resolve_source
    _need_root()
    lab = labstate.resolve_lab(args.lab)
    plan = labstate.load_plan(lab)
    res = load_resolution(lab)
    src = resolve_source(args.source, plan)       # a DNS name TARGET is asked from the source first
    return lab, plan, res, src, dnsname.resolve(args.target, plan, res, src, args.proto, args.port, args.timeout)


def cmd_probe(args) -> int:
    from .probes import probe
    from .report import as_json
    lab, plan, res, src, target = _probe_context(args)
    result = probe.run(plan, src, target, timeout=args.timeout)
    print(as_json(result.to_dict()) if args.output == "json" else probe.text(result))
    return 0 if result.reached else 1


def cmd_trace(args) -> int:
    import time as _time
    from .apply import labstate
    from .probes import trace
    from .report import as_json
    lab, plan, res, src, target = _probe_context(args)
    pcap = args.write or str(labstate.lab_dir(lab) / "traces" / f"trace-{_time.strftime('%Y%m%d-%H%M%S')}.pcapng")
    if "dns" in target.extra:
        from .probes import dnsname
        result = dnsname.trace(plan, res, src, target, pcap, timeout=args.timeout)
    else:
        result = trace.run(plan, src, target, pcap, timeout=args.timeout)
    print(as_json(result.to_dict()) if args.output == "json" else trace.text(result, args.every_packet))
    return 0 if result.crafted.reached else 1


def cmd_graph(args) -> int:
    from .apply import labstate
    from .apply.services import load_resolution
    from .probes import graph
    lab = labstate.resolve_lab(args.lab)
    plan, res = labstate.load_plan(lab), load_resolution(lab)
    if args.output == "text":
        body = graph.text(plan, res).encode() + b"\n"
    elif args.output == "dot":
        body = graph.dot(plan, res).encode()
    else:
        body = graph.render(graph.dot(plan, res), args.output)
    path = args.write or (f"graph.{args.output}" if args.output in ("svg", "png") else None)
    if path:
        with open(path, "wb") as f:
            f.write(body)
        print(f"wrote {path}")
    else:
        sys.stdout.write(body.decode())
    return 0


def cmd_verify(args) -> int:
    from .apply import changes, labstate
    from .apply.services import load_resolution
    from .probes import verify
    from .report import as_json, table
    from .topology import load
    from .topology.load import load_data
    _need_root()
    if args.lab and os.path.isfile(args.lab):
        topo = load(args.lab)
        lab = labstate.resolve_lab(args.lab_name or topo.name)
    else:
        lab = labstate.resolve_lab(args.lab or args.lab_name)
        topo = load_data(changes.load_objects(lab), source=f"lab {lab}")
    plan, res = labstate.load_plan(lab), load_resolution(lab)
    cases = [] if args.matrix_only else verify.from_tests(topo.verify)
    if not args.no_matrix:
        cases += verify.default_matrix(plan, res)
    outcomes, seconds = verify.run(plan, res, cases, timeout=args.timeout)
    failed = [o for o in outcomes if not o.ok]
    rate = len(outcomes) / seconds if seconds else 0.0
    if args.output == "json":
        print(as_json({"lab": lab, "seconds": round(seconds, 3), "probesPerSecond": round(rate, 1),
                       "passed": len(outcomes) - len(failed), "failed": len(failed),
                       "results": [o.to_dict() for o in outcomes]}))
    else:
        rows = [[o.case.name, o.case.source, o.case.target + (f"/{o.case.proto}" if o.case.proto else ""),
                 o.case.expect.text(), o.got, "ok" if o.ok else "FAIL: " + "; ".join(o.why)] for o in outcomes]
        print(table(rows, ["TEST", "FROM", "TO", "EXPECT", "GOT", "RESULT"]))
        print(f"\n{len(outcomes) - len(failed)} passed, {len(failed)} failed")
        print(f"{len(outcomes)} probes in {seconds:.2f}s ({rate:.0f} probes/s)")
    return 1 if failed else 0


def cmd_clean(args) -> int:
    from .apply import lab as applier
    from .kernel import guestlab
    _need_root()
    removed = guestlab.clean(args.lab)
    if not (args.lab and removed):
        removed += applier.clean(args.lab)
    print(f"removed: {', '.join(removed)}" if removed else "nothing to clean")
    return 0


def cmd_validate(args) -> int:
    from .plan.lab import plan_lab
    from .proxy.services import resolve
    from .topology import load
    topo = load(args.topology)
    _warn(resolve(topo, plan_lab(topo)).warnings)
    print(f"{args.topology}: ok — lab {topo.name}, {len(topo.nodes)} nodes, {len(topo.externals)} externals, "
          f"{len(topo.pods)} pods, {len(topo.services)} services"
          + (f", {len(topo.verify)} verify tests" if topo.verify else ""))
    return 0


def cmd_plan(args) -> int:
    from .plan.lab import plan_lab
    from .report import as_json
    from .topology import load
    plan = plan_lab(load(args.topology))
    if args.output == "json":
        print(as_json(plan.to_dict()))
    else:
        import yaml
        print(yaml.safe_dump(plan.to_dict(), sort_keys=False, width=120), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def cmd_bench(args) -> int:
    from pathlib import Path
    from .bench import report
    from .bench.profiles import PROFILES, VARIANTS
    from .bench.run import run
    profile = PROFILES[args.profile]
    variants = args.variants or list(profile.variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or any(n < 1 for n in args.services or ()):
        raise NetsimError(f"unknown variant {bad[0]!r} (one of {', '.join(VARIANTS)})" if bad
                          else "--services: every N must be at least 1")
    _need_root()
    result = run(profile, variants, args.prefix, args.services, deadline=args.deadline)
    out = Path(args.out or f"benchmarks/results/proxy-modes-{args.profile}")
    files = report.write(result, out, plots=not args.no_plots)
    print(f"results: {', '.join(str(f) for f in files)}")
    return 0
