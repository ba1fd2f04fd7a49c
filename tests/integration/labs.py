"""Helpers for kernel tests: run the real CLI, write throw-away topologies, snapshot the machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
DEMO_APPS = REPO / "topologies" / "manifests" / "demo-apps.yaml"


def netsim(*args: str, check: bool = True, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m netsim ARGS`` and return the completed process."""
    done = subprocess.run([sys.executable, "-m", "netsim", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"netsim {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def lab_name(tag: str) -> str:
    """A lab name for this test process: ``$NETSIM_TEST_LAB_PREFIX`` (default ``t``), the pid
    and a tag, so suites running side by side never share a lab."""
    return f"{os.environ.get('NETSIM_TEST_LAB_PREFIX', 't')}{os.getpid() % 10000}{tag}"


@contextmanager
def running_lab(topology: Path, name: str, timeout: float = 60) -> Iterator[str]:
    """``netsim up`` the topology, yield the lab's name, ``netsim down`` it; the machine must
    then be exactly as before (namespaces, links, agents, iptables, pod resolv.conf files)."""
    before = machine_snapshot(name)
    netsim("up", str(topology), "--timeout", str(timeout), timeout=max(120, 2 * timeout))
    try:
        yield name
    finally:
        netsim("down", name, check=False)
    assert machine_snapshot(name) == before


def services(lab: str) -> dict:
    """The lab's Service allocations: cluster_ips, node_ports, lb_ips, ports."""
    return json.loads(Path(f"/run/netsim/{lab}/services.json").read_text())


def demo_copy(tmp: Path, name: str) -> Path:
    """The demo topology under another lab name (so a user's own demo is never touched)."""
    text = (REPO / "topologies" / "demo.yaml").read_text()
    text = text.replace("name: demo\n", f"name: {name}\n", 1).replace(
        "manifests/demo-apps.yaml", str(DEMO_APPS))
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def scaled_topology(tmp: Path, name: str, replicas: int, nodes: int = 3) -> Path:
    node_list = "\n".join(f"  - name: n{i + 1}" for i in range(nodes))
    path = tmp / f"{name}.yaml"
    path.write_text(f"""name: {name}
nodes:
{node_list}
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web}}
    spec:
      replicas: {replicas}
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec:
          containers:
            - name: web
              ports: [{{containerPort: 8080, name: http}}]
""")
    return path


def lab_netns(lab: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(f"netsim.{lab}."))
    except FileNotFoundError:
        return []


def machine_snapshot(lab: str | None = None) -> dict:
    """What a lab must never leave behind or touch: its namespaces and processes (every
    netsim lab's, when ``lab`` is None), the root namespace's links and rules. Other labs
    and other tests' namespaces are not counted when ``lab`` is given, so suites may run
    side by side."""
    marker = f"netsim.{lab}." if lab else "netsim."
    files = f"/run/netsim/{lab}/" if lab else "/run/netsim/"
    def out(cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout
    links = sorted(line.split(":")[1].strip().split("@")[0] for line in out(["ip", "-o", "link"]).splitlines())
    agents = sorted(p for p in os.listdir("/proc") if p.isdigit() and _is_agent(p, files))
    rules = "\n".join(l for l in out(["iptables-nft-save"]).splitlines() if not l.startswith("#"))
    netns = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    etc = sorted(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else []   # pods' resolv.conf
    return {"netns": [n for n in netns if n.startswith(marker)],
            "etc_netns": [n for n in etc if n.startswith(marker)],
            "links": links, "agents": agents, "iptables": rules}


def _is_agent(pid: str, files: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # netsim's agents and etcd servers belong to a lab: their files live under /run/netsim.
    return files.encode() in cmdline


def status(lab: str) -> dict:
    return json.loads(netsim("status", lab, "-o", "json").stdout)
