"""A lab's state directory: what netsim created, written before it is created.

``<root>/<lab>/state.json`` names every namespace the lab will have and every process it
started, so ``netsim down`` and ``netsim clean`` remove exactly that, even after the
controller was killed. ``plan.json`` keeps the planned lab for status, exec and probes.
The root is /run/netsim (tmpfs, like /run/netns), or $NETSIM_STATE_DIR.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LabStateError
from ..plan.state import LabPlan


def root() -> Path:
    return Path(os.environ.get("NETSIM_STATE_DIR", "/run/netsim"))


def lab_dir(lab: str) -> Path:
    return root() / lab


def labs() -> list[str]:
    try:
        return sorted(p.name for p in root().iterdir() if (p / "state.json").exists())
    except FileNotFoundError:
        return []


@dataclass
class Process:
    pid: int
    role: str            # e.g. podserver
    netns: str
    start_time: int      # /proc/<pid>/stat field 22: tells a reused PID from ours


@dataclass
class LabState:
    lab: str
    source: str = ""
    status: str = "creating"          # creating | up | failed | deleting
    controller_pid: int = 0
    created: float = 0.0
    netns: list[str] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    files: list[str] = field(default_factory=list)     # outside the state dir (pods' resolv.conf)

    @property
    def dir(self) -> Path:
        return lab_dir(self.lab)

    def save(self) -> None:
        data = dict(self.__dict__, processes=[p.__dict__ for p in self.processes])
        write_json(self.dir / "state.json", data)

    @staticmethod
    def load(lab: str) -> "LabState":
        try:
            data = json.loads((lab_dir(lab) / "state.json").read_text())
        except FileNotFoundError:
            up = labs()
            hint = f"; running labs: {', '.join(up)}" if up else "; no lab is up"
            raise LabStateError(f"lab {lab!r} is not up{hint}") from None
        data["processes"] = [Process(**p) for p in data.get("processes", [])]
        return LabState(**data)


def begin(lab: str, source: str, netns: list[str]) -> LabState:
    """Claim the lab's directory and record the namespaces about to be created."""
    d = lab_dir(lab)
    if (d / "state.json").exists():
        st = LabState.load(lab)
        if st.status == "creating" and not pid_alive(st.controller_pid):
            raise LabStateError(f"lab {lab!r} was left half-built by an interrupted run; run 'netsim clean {lab}'")
        raise LabStateError(f"lab {lab!r} is already up; run 'netsim down {lab}' first")
    d.mkdir(parents=True, exist_ok=True)
    (d / "logs").mkdir(exist_ok=True)
    st = LabState(lab, source, "creating", os.getpid(), time.time(), list(netns))
    st.save()
    return st


def save_plan(plan: LabPlan) -> None:
    write_json(lab_dir(plan.lab) / "plan.json", plan.to_dict())


def load_plan(lab: str) -> LabPlan:
    try:
        return LabPlan.from_dict(json.loads((lab_dir(lab) / "plan.json").read_text()))
    except FileNotFoundError:
        raise LabStateError(f"lab {lab!r} has no plan; is it up?") from None


def remove_dir(lab: str) -> None:
    shutil.rmtree(lab_dir(lab), ignore_errors=True)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def start_time(pid: int) -> int:
    """Kernel start time of ``pid`` in clock ticks, or 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def resolve_lab(name: str | None) -> str:
    """The lab a command means: the one given, or the only one up."""
    if name:
        return name
    up = labs()
    if len(up) == 1:
        return up[0]
    if not up:
        raise LabStateError("no lab is up; start one with 'netsim up TOPOLOGY'")
    raise LabStateError(f"several labs are up ({', '.join(up)}); name one with --lab")
