"""What a kernel offers and what a topology needs.

Host probes run in a throw-away network namespace (``unshare --net``): each probe creates
the object it checks for (a dummy link, a netem qdisc, an nf_tables table, an IPVS virtual
server with a given scheduler, ...) and the namespace vanishes with the probe process, so
the host's root namespace is never touched. A module the host can still load counts as
present, because the probe triggers the kernel's own module autoloading.

The UML guest's features are read from the kernel config Debian ships with it.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# feature -> (what it is, the kernel config symbols it needs, shell probe run in a fresh netns)
FEATURES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "veth": ("veth pairs", ("VETH",), "ip link add p0 type veth peer name p1"),
    "bridge": ("Linux bridge", ("BRIDGE",), "ip link add b0 type bridge"),
    "vxlan": ("VXLAN (flannel overlay)", ("VXLAN",),
              "ip link add v0 type vxlan id 1 dstport 8472 local 127.0.0.1 nolearning"),
    "br_netfilter": ("bridge-nf-call-iptables", ("BRIDGE_NETFILTER",),
                     "ip link add nfb0 type bridge && { test -e /proc/sys/net/bridge/bridge-nf-call-iptables"
                     " || modprobe -q br_netfilter; } && test -e /proc/sys/net/bridge/bridge-nf-call-iptables"),
    "iptables_legacy": ("iptables, legacy backend (x_tables)", ("IP_NF_IPTABLES", "IP_NF_NAT"),
                        "iptables-legacy -w -t nat -S"),
    "nf_tables": ("nf_tables, ip family (iptables-nft, nft)", ("NF_TABLES", "NF_TABLES_IPV4"),
                  "nft add table ip netsim_probe"),
    "ipset": ("ipset (hash:ip,port sets)", ("IP_SET",), "ipset create netsim-probe hash:ip,port"),
    "dummy": ("dummy links (kube-ipvs0)", ("DUMMY",), "ip link add d0 type dummy"),
    "ip_vs": ("IPVS (ip_vs)", ("IP_VS",),
              "ipvsadm -A -t 10.0.0.1:80 -s rr && test -e /proc/net/ip_vs"),
    "netem": ("netem qdisc (delay, loss)", ("NET_SCH_NETEM",), "tc qdisc add dev lo root netem delay 1ms"),
}
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "sh")
for _i, _s in enumerate(IPVS_SCHEDULERS):
    # one virtual server per probe: the probes share one namespace, and a second "-A" of the
    # same address:port fails with "Service already exists" whatever the scheduler
    FEATURES[f"ip_vs_{_s}"] = (f"IPVS scheduler {_s}", (f"IP_VS_{_s.upper()}",),
                              f"ipvsadm -A -t 10.0.0.2:{81 + _i} -s {_s}")

UML_BINARY = "linux.uml"
UML_MODULES = Path("/usr/lib/uml/modules")
UML_CONFIG = Path("/usr/share/doc/user-mode-linux/config.gz")


@dataclass
class Features:
    """Which features a kernel has; ``detail`` says how that was found out."""

    kernel: str                         # "host 6.18.0" or "uml 6.1.176"
    have: dict[str, bool] = field(default_factory=dict)
    detail: str = ""

    def missing(self, needs) -> list[str]:
        return [n for n in needs if not self.have.get(n, False)]


@dataclass(frozen=True)
class Need:
    feature: str
    why: str                            # "proxyMode: ipvs"


# -- what a topology needs ------------------------------------------------------------------

def ipvs_scheduler(topo) -> str:
    """The topology's IPVS scheduler (rr unless the topology names one)."""
    c = topo.cluster
    sched = getattr(c, "ipvs_scheduler", None) or getattr(getattr(c, "ipvs", None), "scheduler", None)
    return sched or "rr"


def needs(topo) -> list[Need]:
    """The kernel features a validated topology needs, each with the setting that asks for it."""
    c = topo.cluster
    out = [Need("veth", "nodes and pods"), Need("bridge", f"bridge {c.bridge}"),
           Need("br_netfilter", "kubeadm's bridge-nf-call-iptables")]
    if c.overlay == "vxlan":
        out.append(Need("vxlan", "overlay: vxlan"))
    backend = "nf_tables" if c.iptables_backend == "nft" else "iptables_legacy"
    out.append(Need(backend, f"iptablesBackend: {c.iptables_backend}"))
    if c.proxy_mode == "ipvs":
        sched = ipvs_scheduler(topo)
        out += [Need("ip_vs", "proxyMode: ipvs"), Need("dummy", "proxyMode: ipvs (kube-ipvs0)"),
                Need("ipset", "proxyMode: ipvs (KUBE-* ipsets)"),
                Need(f"ip_vs_{sched}", f"proxyMode: ipvs, scheduler {sched}")]
    elif c.proxy_mode == "nftables":
        out.append(Need("nf_tables", "proxyMode: nftables"))
    if getattr(c, "netem", None) or any(getattr(n, "netem", None) for n in getattr(topo, "nodes", ())):
        out.append(Need("netem", "link emulation (netem)"))
    seen, unique = set(), []
    for n in out:
        if n.feature not in seen:
            seen.add(n.feature)
            unique.append(n)
    return unique


# -- the host kernel ------------------------------------------------------------------------

def probe_script(names) -> str:
    """One shell script that runs each probe and prints ``<feature> <exit status>``."""
    lines = []
    for name in names:
        probe = FEATURES[name][2]
        lines.append(f"( {probe} ) >/dev/null 2>&1; echo {name} $?")
    return "\n".join(lines) + "\n"


def parse_probe_output(text: str, names) -> dict[str, bool]:
    results = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in FEATURES:
            results[parts[0]] = parts[1] == "0"
    return {n: results.get(n, False) for n in names}


def run_probes(script: str, timeout: float = 30.0) -> str:
    """Run ``script`` in a new network namespace that dies with it; return its output."""
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0 and not proc.stdout:
        raise OSError(proc.stderr.strip() or f"unshare exited {proc.returncode}")
    return proc.stdout


def host_features(runner=run_probes) -> Features:
    """Probe the host kernel (needs root; without it every feature reads as missing)."""
    names = list(FEATURES)
    release = os.uname().release
    if os.environ.get("NETSIM_IN_UML") == "1":
        release = f"{release}, the UML guest's"
    if os.geteuid() != 0:
        return Features(f"host {release}", {n: False for n in names}, "not probed: needs root")
    try:
        have = parse_probe_output(runner(probe_script(names)), names)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Features(f"host {release}", {n: False for n in names}, f"probe failed: {exc}")
    return Features(f"host {release}", have, "probed in a throw-away network namespace")


# -- the UML guest kernel -------------------------------------------------------------------

def uml_binary() -> str | None:
    return shutil.which(UML_BINARY) or (f"/usr/bin/{UML_BINARY}" if os.access(f"/usr/bin/{UML_BINARY}", os.X_OK) else None)


def uml_release(modules_root: Path = UML_MODULES) -> str | None:
    """The guest kernel's release, from its modules directory (one per installed version)."""
    try:
        versions = sorted(p.name for p in modules_root.iterdir() if (p / "modules.dep").exists())
    except FileNotFoundError:
        return None
    return versions[-1] if versions else None


def parse_config(text: str) -> set[str]:
    """Config symbols set to y or m (without the CONFIG_ prefix)."""
    out = set()
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line[7:].split("=", 1)
            if value in ("y", "m"):
                out.add(key)
    return out


def uml_features(binary: str | None = None, config: Path = UML_CONFIG,
                 modules_root: Path = UML_MODULES) -> Features | None:
    """Features of the installed UML kernel, or None when it is not installed."""
    binary = binary or uml_binary()
    release = uml_release(modules_root)
    if not binary or not release:
        return None
    try:
        symbols = parse_config(gzip.decompress(config.read_bytes()).decode())
    except OSError:
        return Features(f"uml {release}", {n: False for n in FEATURES}, f"{config} is missing")
    have = {n: all(s in symbols for s in FEATURES[n][1]) for n in FEATURES}
    return Features(f"uml {release}", have, f"from {config}")
