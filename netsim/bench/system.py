"""What the results depend on, recorded with them: kernel, native or UML, cores, tools, sysctls."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

# Read inside a lab node (network sysctls are per namespace). conn_reuse_mode and
# expire_nodest_conn exist only once ip_vs is loaded; they stay null otherwise.
SYSCTLS = [
    "net.ipv4.vs.conn_reuse_mode", "net.ipv4.vs.expire_nodest_conn", "net.ipv4.vs.conntrack",
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
    "net.netfilter.nf_conntrack_tcp_timeout_close", "net.bridge.bridge-nf-call-iptables",
    "net.ipv4.ip_forward", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_tw_reuse",
    "net.core.somaxconn", "net.ipv4.conf.all.route_localnet",
]


def _first_line(*cmd: str) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_model() -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def in_uml() -> bool:
    """True inside a user-mode Linux guest (its kernel release ends in ``um``-style names
    and /proc/cpuinfo says so), or when netsim's UML runner set NETSIM_IN_UML."""
    if os.environ.get("NETSIM_IN_UML") == "1":
        return True
    try:
        return "User Mode Linux" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def environment() -> dict:
    import numpy
    try:
        import matplotlib
        mpl = matplotlib.__version__
    except ImportError:
        mpl = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "kernel": platform.release(), "kernel_version": platform.version(),
        "kernel_kind": "uml" if in_uml() else "native",
        "machine": platform.machine(), "cores": os.cpu_count(), "cpu": cpu_model(),
        "python": platform.python_version(), "numpy": numpy.__version__, "matplotlib": mpl,
        "iperf3": _first_line("iperf3", "--version"),
        "iptables_legacy": _first_line("iptables-legacy", "--version"),
        "iptables_nft": _first_line("iptables-nft", "--version"),
        "nft": _first_line("nft", "--version"),
        "ipvsadm": _first_line("ipvsadm", "--version"),
        "loadavg_start": loadavg(),
    }


def write_result(benchmark: str, rows: list, out: str | Path, **extra) -> None:
    """A benchmark script's JSON: its rows plus the kernel, cores, Python and date."""
    result = {"benchmark": benchmark, "kernel": platform.release(), "cores": os.cpu_count(),
              "python": platform.python_version(), **extra, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "results": rows}
    Path(out).write_text(json.dumps(result, indent=1))
