"""A tiny ``netsim bench`` run (iptables mode, N = 1 and 10): results of the right shape,
and nothing of the run left on the machine."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from netsim.bench import report
from netsim.bench.profiles import PROFILES
from netsim.bench.run import run

PREFIX = "bzt-"


def leftovers() -> list[str]:
    netns = [p.name for p in Path("/run/netns").glob("*")] if Path("/run/netns").exists() else []
    labs = [p.name for p in Path("/run/netsim").glob("*")] if Path("/run/netsim").exists() else []
    return [n for n in netns + labs if PREFIX in n]


@pytest.mark.root
def test_tiny_run_has_every_measurement_and_leaves_nothing(tmp_path):
    tiny = replace(PROFILES["quick"], name="tiny", repeat=2, iperf_repeat=1, connections=100,
                   connect_seconds=1.0, connect_warmup=10, programming_repeat=1, network_repeat=1)
    lines: list[str] = []
    result = run(tiny, ["iptables-legacy"], PREFIX, services=[1, 10], log=lines.append)
    assert leftovers() == []
    assert any("N=10" in line for line in lines)                     # progress was shown

    ms = result["measurements"]
    def one(**want):
        found = [m for m in ms if all(m.get(k) == v for k, v in want.items())]
        assert len(found) == 1, want
        return found[0]

    assert one(variant=None, metric="connect", path="raw-veth")["summary"]["p50_us"]["median"] > 0
    for streams in (1, tiny.parallel_streams):
        assert one(variant=None, metric="throughput", path="raw-veth", streams=streams)["summary"]["gbit_s"]["median"] > 0
    for path in ("pod-same-node", "pod-cross-node"):
        assert one(variant="iptables-legacy", metric="connect", path=path, services=0)
    for n in (1, 10):
        for pos in ("first", "last"):
            for path in ("clusterip-same-node", "clusterip-cross-node"):
                c = one(variant="iptables-legacy", metric="connect", path=path, services=n, position=pos)
                assert len(c["repetitions"]) == 2
                assert all(r["count"] > 0 and r["errors"] == 0 for r in c["repetitions"])
                s = c["summary"]
                assert s["p50_us"]["median"] <= s["p90_us"]["median"] <= s["p99_us"]["median"]
                assert s["p50_us"]["ci_low"] <= s["p50_us"]["median"] <= s["p50_us"]["ci_high"]
                for streams in (1, tiny.parallel_streams):
                    t = one(variant="iptables-legacy", metric="throughput", path=path, services=n,
                            position=pos, streams=streams)
                    assert t["summary"]["gbit_s"]["median"] > 0
        prog = one(variant="iptables-legacy", metric="programming", services=n)
        assert prog["repetitions"][0]["rules"] > 0 and prog["summary"]["full_sync_s"]["median"] > 0
        assert one(variant="iptables-legacy", metric="network_programming", services=n)["summary"]["seconds"]["n"] == 1
    # more Services, more rules
    assert (one(variant="iptables-legacy", metric="programming", services=10)["repetitions"][0]["rules"]
            > one(variant="iptables-legacy", metric="programming", services=1)["repetitions"][0]["rules"])
    info = result["variants"][0]
    assert info["sysctls"]["net.bridge.bridge-nf-call-iptables"] == "1"
    assert result["environment"]["kernel_kind"] in ("native", "uml")

    files = report.write(result, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["measurements"]
    assert (tmp_path / "connect_latency.png").exists() and (tmp_path / "summary.md").exists()
    assert len(files) == 9


@pytest.mark.root
def test_ctrl_c_in_the_middle_leaves_nothing():
    """SIGINT while a lab is up and a load generator may be running: the run says it was
    interrupted, and no namespace, lab or process of it remains."""
    import os
    import signal
    import subprocess
    import sys
    import time
    prefix = "bzi-"
    proc = subprocess.Popen([sys.executable, "-m", "netsim", "bench", "--variants", "iptables-legacy",
                             "--services", "1", "--prefix", prefix, "--no-plots", "--out", "/tmp/netsim-bzi"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:                       # wait until the lab is up and measured
            seen.append(line)
            if "N=0: pod IP connect" in line or time.monotonic() > deadline:
                break
        assert any("N=0: pod IP connect" in line for line in seen), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "interrupted" in rest
    netns = [p.name for p in Path("/run/netns").glob(f"{prefix}*")] if Path("/run/netns").exists() else []
    labs = [p.name for p in Path("/run/netsim").glob(f"{prefix}*")] if Path("/run/netsim").exists() else []
    assert netns == [] and labs == []
    mine = []
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = status.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"/run/netsim/{prefix}" in cmd or f"--prefix {prefix}" in cmd:
            mine.append(cmd)
    assert mine == [] and not os.path.exists("/tmp/netsim-bzi/results.json")
