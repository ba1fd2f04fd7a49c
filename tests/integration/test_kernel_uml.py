"""Kernel tests that boot user-mode Linux for real (each boot ~2 s; a lab inside is slower)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from netsim.kernel import decide, features, guestlab, uml

from labs import REPO, lab_netns, machine_snapshot, netsim

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(features.uml_features() is None, reason="user-mode-linux is not installed"),
    pytest.mark.skipif(decide.in_guest(), reason="no UML inside UML"),
]


def test_a_command_returns_its_output_and_exit_status():
    out = io.BytesIO()
    res = uml.run(["sh", "-c", "echo hello from $(uname -r); echo to stderr >&2; exit 3"], output=out)
    assert res.returncode == 3
    assert out.getvalue().decode().splitlines() == [f"hello from {features.uml_release()}", "to stderr"]
    assert 0 < res.boot_seconds <= res.seconds


def test_modules_ipvs_and_private_namespaces_inside_leave_the_host_alone():
    out = io.BytesIO()
    res = uml.run(["sh", "-ec", """
        modprobe ip_vs; modprobe ip_vs_wlc
        ipvsadm -A -t 10.1.1.1:80 -s wlc && ipvsadm -Ln
        ip netns add um-guest-ns
        ip netns exec um-guest-ns ip link add kube-ipvs0 type dummy
        ip netns exec um-guest-ns tc qdisc add dev lo root netem delay 1ms
        ip netns exec um-guest-ns ipset create KUBE-CLUSTER-IP hash:ip,port
        ip netns exec um-guest-ns iptables-legacy -t nat -N KUBE-SERVICES
        ip netns list; echo TMPDIR=$TMPDIR
    """], output=out)
    text = out.getvalue().decode()
    assert res.returncode == 0, text
    assert "TCP  10.1.1.1:80 wlc" in text and "um-guest-ns" in text and "TMPDIR=/run/netsim-uml/tmp" in text
    assert not os.path.exists("/run/netns/um-guest-ns")      # the guest's /run/netns is its own
    assert not Path("/lib/modules").exists() or not (Path("/lib/modules") / features.uml_release()).exists()


def _uml_child(proc: subprocess.Popen) -> tuple[int, str]:
    """The linux.uml process the netsim CLI started, and its run directory."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in children:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if cmd and cmd[0].endswith(b"linux.uml"):
            uml_dir = next(a for a in cmd if a.startswith(b"uml_dir=")).decode()[8:]
            return int(pid), str(Path(uml_dir).parent)
    raise AssertionError(f"no linux.uml child of {proc.pid}")


def _start(*extra: str) -> tuple[subprocess.Popen, int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "netsim", "kernel", "run", *extra, "--",
                             "sh", "-c", "echo started; sleep 120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "started"
    pid, run_dir = _uml_child(proc)
    assert Path(run_dir, "init").exists()
    return proc, pid, run_dir


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "timeout", "SIGKILL"])
def test_ctrl_c_sigterm_and_timeout_leave_no_guest_and_no_files(how):
    proc, pid, run_dir = _start(*(["--timeout", "6"] if how == "timeout" else []))
    if how != "timeout":
        proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    if how == "timeout":
        assert proc.returncode == 1 and "timed out after 6s" in err
    elif how == "SIGKILL":                      # no chance to clean: the guest dies with its parent,
        from netsim.runtime.wait import wait_for   # and the next run sweeps the directory
        wait_for(lambda: not uml.group_members(pid), "the orphaned guest to exit", 15)
        assert run_dir in uml.sweep_stale()
    else:
        assert proc.returncode == 130
    assert uml.group_members(pid) == []
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not Path(run_dir).exists()


SMALL = """name: um-small
cluster:
  iptablesBackend: legacy
  loadBalancerPool: [192.168.100.240/29]
nodes: [{name: n1}, {name: n2}]
externals: [{name: ext}]
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web}
    spec:
      replicas: 2
      selector: {matchLabels: {app: web}}
      template:
        metadata: {labels: {app: web}}
        spec:
          containers: [{name: web, ports: [{containerPort: 8080, name: http}]}]
  - apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec:
      type: NodePort
      selector: {app: web}
      ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
"""


def test_netsim_run_of_a_legacy_iptables_topology_in_uml_passes_selftest(tmp_path):
    topo = tmp_path / "um-small.yaml"
    topo.write_text(SMALL)
    before = machine_snapshot("um-small")
    done = netsim("run", str(topo), "--kernel", "uml", check=False, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "netsim: kernel: uml" in done.stdout and "0 failed" in done.stdout
    assert "lab um-small is down" in done.stdout
    assert lab_netns("um-small") == [] and machine_snapshot("um-small") == before


def test_run_with_the_nft_backend_in_uml_is_refused_with_a_hint(tmp_path):
    topo = tmp_path / "um-nft.yaml"
    topo.write_text(SMALL.replace("name: um-small", "name: um-nft").replace("iptablesBackend: legacy", "iptablesBackend: nft"))
    done = netsim("run", str(topo), "--kernel", "uml", check=False)
    assert done.returncode == 1 and "iptablesBackend: legacy" in done.stderr


def test_up_in_uml_forwards_status_exec_selftest_and_down(tmp_path):
    topo = tmp_path / "um-live.yaml"
    topo.write_text(SMALL.replace("name: um-small", "name: um-live"))
    up = netsim("up", str(topo), "--kernel", "uml", timeout=600)
    try:
        assert "runs in a user-mode Linux guest" in up.stderr
        rec = guestlab.load("um-live")
        assert rec is not None and rec.alive()
        status = json.loads(netsim("status", "um-live", "-o", "json").stdout)
        assert status["lab"] == "um-live" and all(n["present"] for n in status["nodes"])
        done = netsim("exec", "--lab", "um-live", "n1", "--", "sh", "-c", "ip -br link show cni0; exit 4", check=False)
        assert done.returncode == 4 and "cni0" in done.stdout
        assert "0 failed" in netsim("selftest", "um-live").stdout
        assert lab_netns("um-live") == []            # the lab's namespaces live in the guest only
    finally:
        down = netsim("down", "um-live", check=False, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "powered off" in down.stderr
    assert guestlab.load("um-live") is None and uml.group_members(rec.pid) == []
    assert not Path(rec.run_dir).exists()


TINY = """name: {name}
cluster: {{iptablesBackend: legacy}}
nodes: [{{name: n1}}]
"""


def _guest_of(lab: str):
    return guestlab.load(lab)


def test_ctrl_c_during_up_in_uml_and_clean_of_a_running_guest_leave_nothing(tmp_path):
    topo = tmp_path / "um-tiny.yaml"
    topo.write_text(TINY.format(name="um-tiny"))
    proc = subprocess.Popen([sys.executable, "-m", "netsim", "up", str(topo), "--kernel", "uml"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    from netsim.runtime.wait import wait_for
    rec = wait_for(lambda: _guest_of("um-tiny"), "the guest record of um-tiny", 60)
    wait_for(lambda: Path(rec.run_dir, "out").exists(), "the guest's request server", 60)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert guestlab.load("um-tiny") is None and uml.group_members(rec.pid) == []
    assert not Path(rec.run_dir).exists()

    netsim("up", str(topo), "--kernel", "uml", timeout=300)
    rec = guestlab.load("um-tiny")
    assert rec.alive()
    cleaned = netsim("clean", "um-tiny")
    assert "um-tiny (UML guest" in cleaned.stdout
    assert guestlab.load("um-tiny") is None and uml.group_members(rec.pid) == []
    assert not Path(rec.run_dir).exists()
