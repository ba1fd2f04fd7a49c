"""start_etcd's failure paths, with stand-in binaries (no etcd needed)."""
from __future__ import annotations

import os

import pytest

from netsim.errors import ReadinessTimeout
from netsim.registry import RegistryError
from netsim.registry.server import start_etcd


def fake_binary(tmp_path, body: str) -> str:
    path = tmp_path / "fake-etcd"
    path.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/fake.pid\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_never_healthy_times_out_and_is_killed(tmp_path):
    binary = fake_binary(tmp_path, "trap '' TERM\nwhile :; do sleep 1; done")   # ignores SIGTERM
    with pytest.raises(ReadinessTimeout, match=r"etcd /health at etcd\+unix://.*etcd.sock:0") as err:
        start_etcd(str(tmp_path / "state"), binary=binary, timeout=0.3, stop_timeout=0.2)
    assert "timed out after 0.3s" in str(err.value)
    pid = int((tmp_path / "fake.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)                                   # SIGKILLed and reaped
    assert not (tmp_path / "state" / "etcd" / "etcd.pid").exists()
    assert not (tmp_path / "state" / "etcd" / "data").exists()


def test_early_exit_reports_the_log(tmp_path):
    binary = fake_binary(tmp_path, "echo 'bind: address already in use' >&2\nexit 3")
    with pytest.raises(RegistryError, match="exited with status 3.*address already in use"):
        start_etcd(str(tmp_path), binary=binary, timeout=5)


def test_bad_arguments(tmp_path):
    with pytest.raises(RegistryError, match="not found"):
        start_etcd(str(tmp_path), binary=str(tmp_path / "none"))
    with pytest.raises(RegistryError, match="unix_socket=True or listen"):
        start_etcd(str(tmp_path), unix_socket=False)
    with pytest.raises(RegistryError, match="longer than 107 bytes"):
        start_etcd(str(tmp_path / ("x" * 120)), binary="/bin/true")
