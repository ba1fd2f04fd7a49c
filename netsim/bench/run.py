"""Orchestrate a benchmark run: baselines, then one lab per proxy mode, N growing.

Order of a run (every step prints a progress line):

1. the raw veth between two namespaces (``<prefix>raw-a``/``-b``): throughput, connect;
2. per variant (mode + iptables back end): ``netsim up`` of a 2-node lab with no Services;
   pod IPs measured with no Services at all; the four target Services published; then for
   each N the synthetic Services grown to N and measured: connect latency and rate to
   each target and to the pod IPs, iperf3 through each target, one Service changed
   through the lab's agents (network-programming latency), and the mode's Backend timed
   in a throw-away namespace (full sync, one Service changed). The lab is then removed.

Repetitions are interleaved (round r measures every target once), so noise from other
load on the machine is spread over all targets. Everything created is recorded before it
is made, and removed in a ``finally``: Ctrl-C or SIGTERM end the started processes by PID,
take the labs down and delete the namespaces.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import stats
from .lab import CONNECT_PORT, POD_PORT, BenchLab
from .profiles import VARIANTS, Profile
from .system import SYSCTLS, environment, loadavg
from .tools import BenchError, RawVeth, Reaper, iperf, sh, wait_listening

PY = sys.executable


@dataclass
class Measurement:
    """One thing measured, with its repetitions. ``summary`` maps each per-repetition
    field to ``stats.summarize`` of it."""

    variant: str | None          # None: the raw veth, which belongs to no lab
    metric: str                  # throughput | connect | programming | network_programming | lab_load
    path: str                    # raw-veth | pod-same-node | pod-cross-node | clusterip-same-node | ... | backend
    services: int | None = None  # synthetic Services loaded (0: none at all)
    position: str | None = None  # first | last (ClusterIP targets only)
    streams: int | None = None   # iperf3 -P
    repetitions: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def summarize(self, fields: list[str]) -> None:
        self.summary = {f: stats.summarize([r[f] for r in self.repetitions])
                        for f in fields if self.repetitions and all(f in r for r in self.repetitions)}


CONNECT_FIELDS = ["p50_us", "p90_us", "p99_us", "rate_per_s", "mean_us"]


class Interrupted(Exception):
    pass


class Runner:
    def __init__(self, profile: Profile, variants: list[str], prefix: str = "bench-",
                 services: list[int] | None = None, log: Callable[[str], None] | None = None,
                 deadline: float | None = None):
        self.p = profile
        self.variants = variants
        self.prefix = prefix
        self.levels = list(services) if services else list(profile.services)
        self.reaper = Reaper()
        self.labs: list[str] = []            # labs brought up (or being brought up)
        self.namespaces: list[str] = []      # namespaces made by hand
        self.measurements: list[Measurement] = []
        self.variant_info: list[dict] = []
        self.t0 = time.monotonic()
        self._log = log or (lambda m: print(m, flush=True))
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}bench-"))
        self.deadline = deadline if deadline is not None else profile.deadline_s
        self.host_deadline = self.deadline             # less when a UML guest run follows
        self.level_seconds: dict[str, float] = {}      # data-plane seconds of a variant's last level
        self.guest: dict | None = None                 # environment of the UML guest, if one ran

    # -- progress -----------------------------------------------------------------------
    def log(self, msg: str) -> None:
        s = int(time.monotonic() - self.t0)
        self._log(f"[{s // 60:2d}:{s % 60:02d}] {msg}")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- load generators ----------------------------------------------------------------
    def connect(self, ns: str, ip: str, port: int) -> dict:
        p = self.p
        argv = ["ip", "netns", "exec", ns, PY, "-m", "netsim.bench.connect", ip, str(port),
                "--count", str(p.connections), "--seconds", str(p.connect_seconds),
                "--warmup", str(p.connect_warmup)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=p.connect_seconds + 60)
        if done.returncode != 0:
            raise BenchError(f"connect loop in {ns} to {ip}:{port}: {done.stderr.strip()}")
        out = json.loads(done.stdout)
        if not out["latencies_ns"]:
            raise BenchError(f"connect loop in {ns} to {ip}:{port}: no connection succeeded "
                             f"({out['errors']} errors)")
        return stats.connect_repetition(out["latencies_ns"], out["seconds"], out["errors"])

    def iperf(self, server_ns: str, bind_ip: str, client_ns: str, connect_ip: str, streams: int) -> dict:
        return iperf(server_ns, bind_ip, client_ns, self.p.iperf_seconds, self.reaper,
                     connect_ip=connect_ip, streams=streams, omit=self.p.iperf_omit)

    def interleaved(self, targets: list[tuple[Measurement, Callable[[], dict]]], repeat: int,
                    fields: list[str]) -> None:
        """Round r runs every target once; then each target's repetitions are summarised."""
        for _ in range(repeat):
            for m, fn in targets:
                m.repetitions.append(fn())
        for m, _ in targets:
            m.summarize(fields)
            self.measurements.append(m)

    # -- baselines ------------------------------------------------------------------------
    def raw_baseline(self) -> None:
        raw = RawVeth(f"{self.prefix}raw-a", f"{self.prefix}raw-b")
        self.namespaces += [raw.ns_a, raw.ns_b]
        self.log(f"raw veth baseline: namespaces {raw.ns_a}, {raw.ns_b}")
        raw.up()
        srv = self.reaper.popen(["ip", "netns", "exec", raw.ns_a, PY, "-m", "netsim.bench.connect", "--serve",
                                 raw.ip_a, str(POD_PORT), "--seconds", "600"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(srv, POD_PORT)
        c = Measurement(None, "connect", "raw-veth")
        self.interleaved([(c, lambda: self.connect(raw.ns_b, raw.ip_a, POD_PORT))], self.p.repeat, CONNECT_FIELDS)
        srv.kill()
        srv.wait()
        ms = [(Measurement(None, "throughput", "raw-veth", streams=s),
               (lambda s=s: self.iperf(raw.ns_a, raw.ip_a, raw.ns_b, raw.ip_a, s)))
              for s in (1, self.p.parallel_streams)]
        self.interleaved(ms, self.p.iperf_repeat, ["gbit_s"])
        self.log(f"raw veth: connect p50 {c.summary['p50_us']['median']:.1f} µs, "
                 + ", ".join(f"{m.streams} stream(s) {m.summary['gbit_s']['median']:.1f} Gbit/s" for m, _ in ms))
        raw.down()

    # -- one variant ----------------------------------------------------------------------
    def where(self, variant: str) -> str:
        """"host" when the variant runs on this kernel, "uml" when it needs the user-mode
        Linux guest (IPVS on a kernel without it), otherwise the reason it cannot run."""
        mode, _ = VARIANTS[variant]
        from ..proxy.backend import backend_class
        try:
            backend_class(mode)
        except ImportError:
            return f"skipped: netsim has no {mode} Backend (netsim.proxy.{mode}_apply)"
        if mode == "ipvs" and not Path("/proc/net/ip_vs").exists() and sh("ipvsadm", "-Ln", check=False).returncode != 0:
            from ..kernel.decide import in_guest
            from ..kernel.features import uml_binary
            if in_guest():
                return "skipped: this UML guest kernel has no IPVS"
            if uml_binary() is None:
                return "skipped: this kernel has no IPVS and user-mode Linux is not installed"
            return "uml"
        return "host"

    def run_variant(self, variant: str) -> None:
        mode, ipt = VARIANTS[variant]
        info = {"variant": variant, "mode": mode, "iptables_backend": ipt}
        self.variant_info.append(info)
        why = self.where(variant)
        if why != "host":
            info["skipped"] = why
            self.log(f"{variant}: " + ("this kernel has no IPVS: it runs in a user-mode Linux guest after the "
                                       "host variants" if why == "uml" else why))
            return
        name = f"{self.prefix}{variant}"[:32]
        self.labs.append(name)
        self.log(f"{variant}: netsim up {name} (proxyMode {mode}, iptablesBackend {ipt})")
        lab = BenchLab.up(name, mode, ipt, self.tmp)
        info.update(lab=name, sysctls=lab.sysctls(SYSCTLS), kernel_kind=environment()["kernel_kind"])
        client = lab.pods["client"]
        near, far = lab.pods["near"], lab.pods["far"]
        where = {"same-node": near, "cross-node": far}

        def pod_cell(n: int) -> None:
            ms = [(Measurement(variant, "connect", f"pod-{w}", services=n),
                   (lambda pod=pod: self.connect(client.netns, pod.ip, POD_PORT))) for w, pod in where.items()]
            self.interleaved(ms, self.p.repeat, CONNECT_FIELDS)
            self.log(f"{variant} N={n}: pod IP connect p50 " + ", ".join(
                f"{m.path} {m.summary['p50_us']['median']:.1f} µs" for m, _ in ms))

        # no Services at all: pod IPs (throughput too: the data-plane baseline of this lab)
        pod_cell(0)
        ms = [(Measurement(variant, "throughput", f"pod-{w}", services=0, streams=s),
               (lambda pod=pod, s=s: self.iperf(pod.netns, pod.ip, client.netns, pod.ip, s)))
              for w, pod in where.items() for s in (1, self.p.parallel_streams)]
        self.interleaved(ms, self.p.iperf_repeat, ["gbit_s"])
        self.log(f"{variant} N=0: pod IP throughput " + ", ".join(
            f"{m.path} ×{m.streams} {m.summary['gbit_s']['median']:.1f}" for m, _ in ms) + " Gbit/s")

        took = lab.load_targets()
        self.log(f"{variant}: 4 target Services programmed on both nodes in {took * 1000:.0f} ms")
        prog_ns = f"{self.prefix}prog"
        self.namespaces.append(prog_ns)
        if Path(f"/run/netns/{prog_ns}").exists():
            sh("ip", "netns", "del", prog_ns)
        sh("ip", "netns", "add", prog_ns)
        try:
            levels = list(self.levels)
            i = 0
            while i < len(levels):
                n = levels[i]
                cost = self.predicted_level_s(variant, n)
                if self.elapsed() + cost > self.host_deadline:
                    info.setdefault("skipped_services", []).append(n)
                    self.log(f"{variant} N={n}: skipped: predicted {cost:.0f} s would pass the "
                             f"{self.host_deadline:.0f} s deadline")
                    i += 1
                    continue
                self.level(variant, lab, n, prog_ns)
                i += 1
                if i == len(levels) and self.p.large and n < self.p.large and not self.levels_given():
                    fits, predicted = self.large_fits(variant)
                    info["large"] = {"services": self.p.large, "predicted_full_sync_s": predicted, "run": fits}
                    if fits:
                        levels.append(self.p.large)
                    else:
                        self.log(f"{variant}: N={self.p.large} skipped: full sync predicted at "
                                 f"{predicted:.0f} s > {self.p.large_budget_s:.0f} s budget")
        finally:
            sh("ip", "netns", "del", prog_ns, check=False)
            self.namespaces.remove(prog_ns)
        self.log(f"{variant}: netsim down {name}")
        BenchLab.down(name)
        self.labs.remove(name)

    def predicted_level_s(self, variant: str, n: int) -> float:
        """Rough cost of measuring at ``n``: the data-plane part as the last level took, plus
        loading n into the lab and the programming repetitions, from the predicted full sync."""
        pts = sorted((m.services, m.summary["full_sync_s"]["median"]) for m in self.measurements
                     if m.variant == variant and m.metric == "programming" and "full_sync_s" in m.summary)
        if not pts:
            return 0.0
        sync = predict(pts, n)
        reps = min(self.p.programming_repeat, max(1, int(self.p.programming_budget_s // max(sync, 1e-3)) + 1))
        return self.level_seconds.get(variant, 0.0) + sync * (3 + reps)

    def levels_given(self) -> bool:
        return list(self.levels) != list(self.p.services)

    def large_fits(self, variant: str) -> tuple[bool, float]:
        """Predict the full-sync time at the large N from the two largest measured Ns
        (growth exponent between 1 and 2) and compare it with the profile's budget."""
        pts = sorted((m.services, m.summary["full_sync_s"]["median"]) for m in self.measurements
                     if m.variant == variant and m.metric == "programming" and "full_sync_s" in m.summary)
        if len(pts) < 2:
            return False, math.inf
        predicted = predict(pts, self.p.large)
        return predicted <= self.p.large_budget_s, predicted

    def level(self, variant: str, lab: BenchLab, n: int, prog_ns: str) -> None:
        p = self.p
        started = time.monotonic()
        took = lab.load_synthetic(n, timeout=max(120.0, n / 20))
        load = Measurement(variant, "lab_load", "agents", services=n, repetitions=[{"seconds": took}])
        load.summarize(["seconds"])
        self.measurements.append(load)
        self.log(f"{variant} N={n}: synthetic Services programmed on both nodes in {took:.2f} s")
        client = lab.pods["client"]
        pods = {"same-node": lab.pods["near"], "cross-node": lab.pods["far"]}
        side = {"same-node": "near", "cross-node": "far"}

        # connect: every ClusterIP target and the pod IPs, interleaved
        ms = []
        for pos in ("first", "last"):
            for w in pods:
                vip = lab.target(pos, side[w])
                ms.append((Measurement(variant, "connect", f"clusterip-{w}", services=n, position=pos),
                           (lambda vip=vip: self.connect(client.netns, vip, CONNECT_PORT))))
        for w, pod in pods.items():
            ms.append((Measurement(variant, "connect", f"pod-{w}", services=n),
                       (lambda pod=pod: self.connect(client.netns, pod.ip, POD_PORT))))
        self.interleaved(ms, p.repeat, CONNECT_FIELDS)
        self.log(f"{variant} N={n}: connect p50 " + ", ".join(
            f"{m.path}{'/' + m.position if m.position else ''} {m.summary['p50_us']['median']:.1f}"
            for m, _ in ms) + " µs")

        # throughput through each ClusterIP target, 1 and P streams
        ms = []
        for pos in ("first", "last"):
            for w, pod in pods.items():
                vip = lab.target(pos, side[w])
                for s in (1, p.parallel_streams):
                    ms.append((Measurement(variant, "throughput", f"clusterip-{w}", services=n, position=pos,
                                           streams=s),
                               (lambda pod=pod, vip=vip, s=s: self.iperf(pod.netns, pod.ip, client.netns, vip, s))))
        self.interleaved(ms, p.iperf_repeat, ["gbit_s"])
        self.log(f"{variant} N={n}: ClusterIP throughput " + ", ".join(
            f"{m.path.split('-', 1)[1]}/{m.position}×{m.streams} {m.summary['gbit_s']['median']:.1f}"
            for m, _ in ms) + " Gbit/s")

        # one Service changed, through the lab's agents (registry write → both nodes' kernels)
        net = Measurement(variant, "network_programming", "agents", services=n)
        t_net = time.monotonic()
        for k in range(p.network_repeat):
            if k and time.monotonic() - t_net > p.programming_budget_s:
                break                                  # bounded in time like the Backend's repetitions
            net.repetitions.append({"seconds": lab.change_one(k)})
        net.summarize(["seconds"])
        self.measurements.append(net)

        # the mode's Backend alone, in a throw-away namespace
        mode, ipt = VARIANTS[variant]
        argv = ["ip", "netns", "exec", prog_ns, PY, "-m", "netsim.bench.programming", "--mode", mode,
                "--iptables-backend", ipt, "--services", str(n), "--repeat", str(p.programming_repeat),
                "--budget", str(p.programming_budget_s), "--warmup", "1" if n <= 1000 else "0"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=p.programming_budget_s * 4 + 600)
        if done.returncode != 0:
            how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            raise BenchError(f"programming benchmark ({variant}, N={n}) failed ({how}): "
                             f"{done.stderr.strip()[-500:] or 'no output'}")
        prog = Measurement(variant, "programming", "backend", services=n,
                           repetitions=json.loads(done.stdout)["repetitions"])
        prog.summarize(["full_sync_s", "one_changed_s"])
        self.measurements.append(prog)
        spent = time.monotonic() - started - took - sum(r["full_sync_s"] + r["one_changed_s"] for r in prog.repetitions)
        self.level_seconds[variant] = max(spent, 0.0)
        self.log(f"{variant} N={n}: full sync {prog.summary['full_sync_s']['median'] * 1000:.0f} ms, "
                 f"one Service changed {prog.summary['one_changed_s']['median'] * 1000:.0f} ms "
                 f"(Backend, {len(prog.repetitions)} reps); through the agents "
                 f"{net.summary['seconds']['median'] * 1000:.0f} ms")

    # -- the whole run ----------------------------------------------------------------------
    def conntrack_limits(self, env: dict) -> None:
        """Inside the UML guest only (its own kernel; never the host's global sysctls): raise
        the conntrack table as kube-proxy does at start (--conntrack-max-per-core 32768,
        --conntrack-min 131072; hashsize = max/4). The guest boots with 8192 entries, which a
        connect loop fills (every connection leaves a TCP entry and two VXLAN UDP flows)."""
        if env["kernel_kind"] != "uml":
            return
        path = Path("/proc/sys/net/netfilter/nf_conntrack_max")
        want = max(131072, 32768 * (env["cores"] or 1))
        if path.exists() and int(path.read_text()) < want:
            path.write_text(str(want))
            Path("/sys/module/nf_conntrack/parameters/hashsize").write_text(str(want // 4))
            env["conntrack_max_set"] = want
            self.log(f"UML guest: nf_conntrack_max raised to {want} (kube-proxy's minimum), hashsize {want // 4}")

    def run(self) -> dict:
        env = environment()
        self.conntrack_limits(env)
        self.log(f"profile {self.p.name}: variants {', '.join(self.variants)}; N = "
                 f"{', '.join(map(str, self.levels))}"
                 + (f" (+{self.p.large} where it fits)" if self.p.large and not self.levels_given() else "")
                 + f"; kernel {env['kernel']} ({env['kernel_kind']}), {env['cores']} cores")
        self.raw_baseline()
        if any(self.where(v) == "uml" for v in self.variants):
            self.host_deadline = self.deadline - self.p.uml_reserve_s
        for v in self.variants:
            self.run_variant(v)
        in_uml = [i["variant"] for i in self.variant_info if i.get("skipped") == "uml"]
        measurements = [asdict(m) for m in self.measurements]
        if in_uml:
            self.variant_info = [i for i in self.variant_info if i.get("skipped") != "uml"]
            # the same kernel's iptables mode beside it, so the modes compare on one kernel
            guest_variants = in_uml + (["iptables-legacy"] if "iptables-legacy" not in in_uml else [])
            measurements += self.run_guest(guest_variants)
        env["loadavg_end"] = loadavg()
        env["seconds"] = round(self.elapsed(), 1)
        if self.guest:
            env["uml_guest"] = self.guest
        return {"benchmark": "proxy_modes", "profile": asdict(self.p), "environment": env,
                "variants": self.variant_info, "measurements": measurements}

    def run_guest(self, variants: list[str]) -> list[dict]:
        """Run the benchmark for ``variants`` inside a user-mode Linux guest (``netsim kernel
        run``) with what is left of the deadline, stream its progress, and merge its results:
        its variants become ``<name>@uml`` and its raw veth ``raw-veth-uml``."""
        left = max(60.0, self.deadline - self.elapsed())
        out = self.tmp / "uml"
        argv = [PY, "-m", "netsim", "kernel", "run", "--timeout", str(int(left + 300)), "--",
                PY, "-m", "netsim", "bench", "--profile", self.p.name, "--variants", *variants,
                "--prefix", self.prefix, "--out", str(out), "--no-plots", "--deadline", str(int(left))]
        levels = self.levels if self.levels_given() else self.p.uml_services
        argv[argv.index("--no-plots"):argv.index("--no-plots")] = ["--services", *map(str, levels)]
        self.log(f"{', '.join(variants)}: in a user-mode Linux guest (netsim kernel run), {left:.0f} s left")
        proc = self.reaper.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            self.log(f"uml | {line.rstrip()}")
        if proc.wait() != 0 or not (out / "results.json").exists():
            for v in variants:
                self.variant_info.append({"variant": f"{v}@uml", "mode": VARIANTS[v][0],
                                          "iptables_backend": VARIANTS[v][1],
                                          "skipped": f"the UML guest run failed (exit {proc.returncode})"})
            return []
        guest = json.loads((out / "results.json").read_text())
        self.guest = guest["environment"]
        for info in guest["variants"]:
            info["variant"] += "@uml"
            self.variant_info.append(info)
        for m in guest["measurements"]:
            if m["variant"] is None:
                m["path"] += "-uml"
            else:
                m["variant"] += "@uml"
        return guest["measurements"]

    def cleanup(self) -> None:
        """End every started process by PID, take labs down, delete namespaces."""
        self.reaper.reap()
        for name in list(self.labs):
            self.log(f"cleanup: netsim down {name}")
            BenchLab.down(name)
            self.labs.remove(name)
        for ns in list(self.namespaces):
            if Path(f"/run/netns/{ns}").exists():
                sh("ip", "netns", "del", ns, check=False)
            self.namespaces.remove(ns)
        shutil.rmtree(self.tmp, ignore_errors=True)


def predict(points: list[tuple[int, float]], n: int) -> float:
    """Extrapolate a time measured at growing N to ``n``, with the growth exponent of the two
    largest points held between 1 (linear) and 2 (quadratic). Below 100 Services fixed costs
    dominate, so nothing is extrapolated from there: the last time is returned."""
    n2, t2 = points[-1]
    if n <= n2 or n2 < 100:
        return t2
    if len(points) == 1:
        return t2 * n / n2
    n1, t1 = points[-2]
    k = min(2.0, max(1.0, math.log(max(t2, 1e-6) / max(t1, 1e-6)) / math.log(n2 / n1)))
    return t2 * (n / n2) ** k


def run(profile: Profile, variants: list[str], prefix: str, services: list[int] | None = None,
        log: Callable[[str], None] | None = None, deadline: float | None = None) -> dict:
    """Run and always clean up; SIGTERM unwinds like Ctrl-C, and a second Ctrl-C during the
    cleanup is ignored so that the cleanup finishes."""
    def term(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, term)
    runner = Runner(profile, variants, prefix, services, log, deadline)
    try:
        return runner.run()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            runner.cleanup()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, old)
