"""``netsim proxy mode MODE``: switch a running lab's kube-proxy mode.

What an administrator does when changing ``kube-proxy --proxy-mode``: a rolling restart
of the kube-proxy DaemonSet. Node by node, the agent is stopped and started again in the
new mode; at start-up it removes what every other mode left on the node (kube-proxy's
``cleanupLeftovers``) and then does its first full sync. The lab's plan records the new
mode, so ``netsim status`` shows it and nodes added later run it. If a node's agent fails
to come up, every node switched so far goes back to the old mode.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

from ..errors import LabStateError, NetsimError
from ..proxy.backend import MODES, backend_class
from . import labstate
from .lab import process_running, registry_url, start_kubeproxy, stop_processes, wait_kubeproxies
from .labstate import LabState


@dataclass
class SwitchReport:
    lab: str
    old: str
    new: str
    seconds: float = 0.0
    cleaned: dict[str, dict[str, str]] = field(default_factory=dict)   # node → {mode: what was removed}


def switch(lab: str, mode: str, timeout: float = 30.0) -> SwitchReport:
    if mode not in MODES:
        raise NetsimError(f"unknown proxy mode {mode!r} (one of {', '.join(MODES)})")
    try:
        backend_class(mode)
    except ImportError:
        raise NetsimError(f"proxy mode {mode} is not available in this netsim (no netsim.proxy.{mode}_apply)") from None
    plan, st = labstate.load_plan(lab), LabState.load(lab)
    if st.status != "up":
        raise LabStateError(f"lab {lab!r} is {st.status}, not up")
    report = SwitchReport(lab, plan.proxy_mode, mode)
    if plan.proxy_mode == mode:
        return report
    t0 = time.monotonic()
    new_plan = replace(plan, proxy_mode=mode)
    labstate.save_plan(new_plan)
    url = registry_url(lab)
    done: list[str] = []
    try:
        for node in plan.nodes:
            _restart(new_plan, node.name, url, st, max(timeout - (time.monotonic() - t0), 1.0))
            done.append(node.name)
    except BaseException:
        labstate.save_plan(plan)                              # back to the old mode
        for name in done + [n.name for n in plan.nodes if n.name not in done][:1]:
            try:
                _restart(plan, name, url, st, timeout)
            except NetsimError:
                pass
        raise
    report.seconds = time.monotonic() - t0
    for node in plan.nodes:
        status = json.loads((labstate.lab_dir(lab) / "kube-proxy" / f"{node.name}.json").read_text())
        report.cleaned[node.name] = status.get("cleanup", {})
    return report


def _restart(plan, node: str, url: str, st: LabState, timeout: float) -> None:
    """Stop ``node``'s kube-proxy agent (by its recorded PID) and start it in ``plan``'s mode."""
    netns = plan.node(node).netns
    old = [p for p in st.processes if p.role == "kube-proxy" and p.netns == netns and process_running(p)]
    stop_processes(old)
    st.processes = [p for p in st.processes if p not in old]
    st.save()
    proc = start_kubeproxy(plan, node, url, st)
    wait_kubeproxies(plan, {node: proc}, timeout)
