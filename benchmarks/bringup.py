"""Bring-up benchmark: ``up`` and ``down`` time and memory for N pods on 3 nodes.

    .venv/bin/python benchmarks/bringup.py [--pods 10 100 500] [--repeat 3] [--out FILE]

Memory is what the lab adds to the machine while it is up: the RSS of its agent
processes (read from /proc) and the kernel's own growth (MemAvailable before and
after ``up``, which includes namespaces, veths and sockets). Each size runs
``--repeat`` times; medians are reported. Runs as root; every lab is torn down.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from labs import scaled_topology  # noqa: E402


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def agents_rss_kib(lab: str) -> tuple[int, int]:
    state = json.loads(Path(f"/run/netsim/{lab}/state.json").read_text())
    total = 0
    for proc in state["processes"]:
        for line in Path(f"/proc/{proc['pid']}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total, len(state["processes"])


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - t0


def measure(pods: int, tmp: Path) -> dict:
    lab = f"bench{pods}"
    topo = scaled_topology(tmp, lab, pods)
    netsim = [sys.executable, "-m", "netsim"]
    before = mem_available_kib()
    up = run(netsim + ["up", str(topo), "--timeout", "300"])
    try:
        kernel_and_agents = before - mem_available_kib()
        rss, procs = agents_rss_kib(lab)
    finally:
        down = run(netsim + ["down", lab])
    return {"pods": pods, "up_s": up, "down_s": down, "agents_rss_mib": rss / 1024,
            "agent_processes": procs, "mem_growth_mib": kernel_and_agents / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bringup.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # The demo itself (3 nodes, 12 pods, 1 external), as a user runs it.
        demo = []
        for _ in range(args.repeat):
            demo.append(run([sys.executable, "-m", "netsim", "up", "topologies/demo.yaml"]))
            run([sys.executable, "-m", "netsim", "down", "demo"])
        for pods in args.pods:
            samples = [measure(pods, Path(tmp)) for _ in range(args.repeat)]
            row = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
            row["samples"] = samples
            rows.append(row)
            print(f"{pods:4d} pods: up {row['up_s']:.2f}s  down {row['down_s']:.2f}s  "
                  f"agents RSS {row['agents_rss_mib']:.1f} MiB  machine memory +{row['mem_growth_mib']:.0f} MiB "
                  f"({row['mem_growth_mib'] * 1024 / pods:.0f} KiB/pod)", flush=True)
    result = {"benchmark": "bringup", "kernel": platform.release(), "cores": os.cpu_count(),
              "python": platform.python_version(), "demo_up_s": statistics.median(demo), "results": rows,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"demo (3 nodes, 12 pods, 1 external): up {statistics.median(demo):.2f}s "
          f"(whole command, median of {len(demo)}); results in {args.out}")


if __name__ == "__main__":
    main()
