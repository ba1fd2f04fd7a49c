"""The UML runner without booting: its init script, module list and console protocol."""
from __future__ import annotations

import io
import queue
import subprocess
import time

import pytest

from netsim.errors import GuestError
from netsim.kernel import uml


def script(command=("python", "-m", "pytest", "-k", "a b"), cwd="/repo dir"):
    return uml.init_script(list(command), cwd, "/tmp/netsim-uml-x/result", ["ip_vs", "dummy"],
                           uml.guest_env({"EXTRA": "it's"}))


def test_init_script_is_valid_shell_with_private_mounts_and_power_off():
    text = script()
    assert subprocess.run(["sh", "-n"], input=text, text=True).returncode == 0
    for must in ("mount -t tmpfs -o mode=755 tmpfs /run", "tmpfs /dev/shm", "tmpfs /etc/netns", "/run/netns",
                 "/proc/sys/kernel/modprobe", "modprobe -a ip_vs dummy", "poweroff -f", "sysrq-trigger"):
        assert must in text
    assert "/lib/modules" not in text.replace("/run/netsim-uml/modroot/lib/modules", "")   # nothing on the host's /lib


def test_init_script_quotes_the_command_cwd_and_environment():
    text = script()
    assert "python -m pytest -k 'a b' </dev/null" in text
    assert "cd '/repo dir'" in text
    assert "export EXTRA='it'\"'\"'s'" in text and "export NETSIM_IN_UML=1" in text
    assert "export TMPDIR=/run/netsim-uml/tmp" in text


def test_available_modules_reads_the_guest_module_lists(tmp_path):
    d = tmp_path / "6.1.9"
    d.mkdir()
    (d / "modules.dep").write_text("kernel/net/netfilter/ipvs/ip_vs.ko: kernel/net/a.ko\n"
                                   "kernel/drivers/net/dummy.ko:\n")
    (d / "modules.builtin").write_text("kernel/net/ipv4/xt_tcpudp.ko\n")
    assert uml.available_modules(["ip_vs", "dummy", "xt_tcpudp", "nope"], "6.1.9", tmp_path) == \
        ["ip_vs", "dummy", "xt_tcpudp"]


class FakeProc:
    def wait(self, timeout=None):
        return 1


def follow(lines, **kw):
    q: queue.Queue = queue.Queue()
    for line in lines:
        q.put(line)
    out = io.BytesIO()
    args = dict(timeout=None, boot_timeout=5.0, command=["true"])
    args.update(kw)
    rc, _ = uml._follow(FakeProc(), q, out, time.monotonic(), **args)
    return rc, out.getvalue()


def test_console_protocol_streams_only_the_command_output_and_its_status():
    rc, out = follow([b"Checking ptrace...\r\n", uml.BEGIN + b"\r\n", b"hello\r\n", b"partial",
                      uml.EXIT + b"7@@\r\n", b"Powering off.\r\n", None])
    assert rc == 7 and out == b"hello\npartial"


def test_setup_failure_names_the_step():
    with pytest.raises(GuestError, match="failed to modprobe ip_vs"):
        follow([b"modprobe: FATAL: Module ip_vs not found\n", uml.SETUP_FAILED + b" modprobe ip_vs\n", None])


def test_guest_that_dies_before_the_command_shows_its_console():
    with pytest.raises(GuestError, match="before starting the command(.|\n)*Kernel panic"):
        follow([b"Kernel panic - not syncing\n", None])


def test_boot_and_run_timeouts_name_what_never_happened():
    with pytest.raises(uml.GuestTimeout, match="boot and start the command"):
        follow([b"booting\n"], boot_timeout=0.05)
    with pytest.raises(uml.GuestTimeout, match="sleep 9 to finish in the UML guest"):
        follow([uml.BEGIN + b"\n"], timeout=0.05, command=["sleep", "9"])


def test_guest_env_keeps_the_lab_state_private(monkeypatch):
    monkeypatch.setenv("NETSIM_STATE_DIR", "/tmp/somewhere")
    monkeypatch.setenv("NETSIM_UPDATE_GOLDEN", "1")
    env = uml.guest_env()
    assert "NETSIM_STATE_DIR" not in env and env["NETSIM_UPDATE_GOLDEN"] == "1"
    assert env["PATH"].startswith("/run/netsim-uml/bin:") and env["NETSIM_IN_UML"] == "1"


def test_sweep_removes_only_run_directories_whose_owner_is_gone(tmp_path):
    import os
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, owner in (("netsim-uml-dead", dead.pid), ("netsim-uml-live", os.getpid())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "owner").write_text(f"{owner}\n")
    (tmp_path / "netsim-uml-starting").mkdir()          # no owner yet: being set up
    assert uml.sweep_stale(str(tmp_path)) == [str(tmp_path / "netsim-uml-dead")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["netsim-uml-live", "netsim-uml-starting"]
