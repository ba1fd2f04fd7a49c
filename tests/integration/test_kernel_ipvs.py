"""Kernel tests that need IPVS (marked ``ipvs``): natively on a kernel with ip_vs, otherwise
all of them in one UML boot with scripts/test-uml.sh (conftest skips them with that hint)."""
from __future__ import annotations

import subprocess

import pytest

pytestmark = [pytest.mark.root, pytest.mark.ipvs]
NS = "netsim.um-ipvs.probe"


def sh(*cmd: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", NS, *cmd], capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def netns():
    subprocess.run(["ip", "netns", "add", NS], check=True)
    yield NS
    subprocess.run(["ip", "netns", "del", NS], check=True)


@pytest.mark.parametrize("scheduler", ["rr", "wrr", "lc", "sh"])
def test_ipvs_virtual_servers_with_each_scheduler_on_a_dummy_address(netns, scheduler):
    sh("ip", "link", "add", "kube-ipvs0", "type", "dummy")
    sh("ip", "addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0")
    sh("ipvsadm", "-A", "-t", "10.96.0.10:80", "-s", scheduler)
    sh("ipvsadm", "-a", "-t", "10.96.0.10:80", "-r", "10.244.1.2:8080", "-m")
    listing = sh("ipvsadm", "-Ln")
    assert f"TCP  10.96.0.10:80 {scheduler}" in listing and "10.244.1.2:8080" in listing
    assert "Masq" in listing
