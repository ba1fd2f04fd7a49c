"""Boot a user-mode Linux guest that runs one command on this machine's own files.

The guest kernel (Debian's ``linux.uml``) is an ordinary process. It mounts the host's ``/``
through hostfs, so the repository, its ``.venv`` and the topology files are at the same
paths inside; its writes land on the host's files. Inside, PID 1 is a small shell script
(:func:`init_script`) that gives the guest private tmpfs mounts on ``/run`` (so
``/run/netns`` and ``/run/netsim``), ``/dev/shm``, ``/etc/netns`` and a private ``$TMPDIR``, makes the UML
modules loadable (they live in /usr/lib/uml/modules; a ``modprobe`` wrapper points there,
also for the kernel's own autoloading), loads the networking modules, runs the command
with its output on the guest console, and powers off.

The console is a pipe to this process: lines before the begin marker are the boot log
(shown only on failure), lines after it are the command's output (streamed as they come),
and the exit marker carries the exit status, which the guest also writes to a result file
in the run's host temporary directory. The UML process runs in its own process group, so
Ctrl-C, SIGTERM, a timeout, or an exception end the whole guest (by its PID's group) and
the temporary directory is removed in every case.
"""
from __future__ import annotations

import os
import queue
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from ..apply.labstate import pid_alive
from ..errors import GuestError, NetsimError
from ..runtime.wait import wait_for
from .decide import IN_GUEST_ENV, INSTALL_UML
from .features import UML_MODULES, uml_binary, uml_release

BEGIN = b"@@netsim-uml:begin@@"
EXIT = b"@@netsim-uml:exit="
SETUP_FAILED = b"@@netsim-uml:setup-failed@@"
TMP_PREFIX = "netsim-uml-"
DEFAULT_MEM = "1G"
BOOT_TIMEOUT = 60.0          # boot, mounts and modules take ~2 s; generous for a loaded machine
POWEROFF_TIMEOUT = 15.0

# Loaded at boot (the kernel autoloads anything else through the modprobe wrapper).
MODULES = (
    "veth", "bridge", "br_netfilter", "vxlan", "dummy", "sch_netem",
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_sh",
    "ip_set", "ip_set_hash_ip", "ip_set_hash_ipport", "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet", "ip_set_hash_net", "ip_set_bitmap_port",
    "iptable_filter", "iptable_nat", "iptable_mangle", "iptable_raw",
    "xt_comment", "xt_mark", "xt_conntrack", "xt_statistic", "xt_recent", "xt_set",
    "xt_MASQUERADE", "xt_nat", "xt_addrtype", "xt_physdev", "xt_multiport", "xt_tcpudp",
    "nf_conntrack_netlink",
)
# Environment passed into the guest (PID 1 starts with an empty one).
PASS_ENV = ("TERM", "LANG", "LC_ALL", "PYTEST_ADDOPTS", "COLUMNS")


class GuestTimeout(GuestError):
    def __init__(self, what: str, timeout: float):
        super().__init__(f"timed out after {timeout:g}s waiting for {what}; the UML guest was stopped")


@dataclass
class Result:
    returncode: int
    boot_seconds: float          # host start to the command starting in the guest
    seconds: float               # host start to the guest's exit


def available_modules(names: Sequence[str], release: str, modules_root: Path = UML_MODULES) -> list[str]:
    """The names among ``names`` that the guest kernel has as modules or built in."""
    have = set()
    for listing in ("modules.dep", "modules.builtin"):
        try:
            text = (modules_root / release / listing).read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            path = line.split(":", 1)[0]
            if path:
                have.add(Path(path).name.split(".ko")[0].replace("-", "_"))
    return [n for n in names if n.replace("-", "_") in have]


def guest_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The command's environment in the guest: the venv on PATH, a private TMPDIR."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": f"/run/netsim-uml/bin:{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"), "TMPDIR": "/run/netsim-uml/tmp",
        "PYTHONUNBUFFERED": "1", IN_GUEST_ENV: "1",
    }
    if not sys.stdout.isatty():                 # the guest console is a tty; the host's output is not
        env.update(NO_COLOR="1", PY_COLORS="0")
    for key in PASS_ENV:
        if key in os.environ:
            env[key] = os.environ[key]
    for key, value in os.environ.items():
        if key.startswith("NETSIM_") and key not in (IN_GUEST_ENV, "NETSIM_STATE_DIR"):   # state stays private
            env[key] = value
    env.update(extra or {})
    return env


def init_script(command: Sequence[str], cwd: str, result: str, modules: Sequence[str],
                env: dict[str, str]) -> str:
    """The guest's PID 1: private mounts, modules, the command, its status, power off."""
    q = shlex.quote
    exports = "\n".join(f"export {k}={q(v)}" for k, v in env.items())
    return f"""#!/bin/sh
# PID 1 of a netsim user-mode Linux guest (written by netsim.kernel.uml; removed after the run).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
halt_now() {{ sync; poweroff -f; echo 1 > /proc/sys/kernel/sysrq; echo o > /proc/sysrq-trigger; }}
fail() {{ echo "{SETUP_FAILED.decode()} $1"; halt_now; }}
stty -onlcr 2>/dev/null
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
dmesg -n 1
mount -t tmpfs -o mode=755 tmpfs /run || fail "private tmpfs on /run"
mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "private tmpfs on /dev/shm"
# pods' resolv.conf files (ip netns exec reads /etc/netns/<netns>/): the guest's own, never the host's
mkdir -p /etc/netns && mount -t tmpfs -o mode=755 tmpfs /etc/netns || fail "private tmpfs on /etc/netns"
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /run/netns /run/lock /run/netsim-uml/bin /run/netsim-uml/tmp /run/netsim-uml/modroot
K=$(uname -r)
mkdir -p /run/netsim-uml/modroot/lib/modules/$K
mount --bind {q(str(UML_MODULES))}/$K /run/netsim-uml/modroot/lib/modules/$K || fail "bind-mount the UML modules"
printf '#!/bin/sh\\nexec /usr/sbin/modprobe -d /run/netsim-uml/modroot "$@"\\n' > /run/netsim-uml/bin/modprobe
chmod 755 /run/netsim-uml/bin/modprobe && echo /run/netsim-uml/bin/modprobe > /proc/sys/kernel/modprobe
/run/netsim-uml/bin/modprobe -a {' '.join(q(m) for m in modules)} || fail "modprobe {' '.join(modules)}"
ip link set lo up
hostname netsim-uml
{exports}
cd {q(cwd)} || fail "cd {cwd}"
echo "{BEGIN.decode()}"
{shlex.join(command)} </dev/null
rc=$?
echo $rc > {q(result)}.tmp && mv {q(result)}.tmp {q(result)}
sync
echo "{EXIT.decode()}$rc@@"
halt_now
"""


def uml_command(binary: str, tmp: Path, umid: str, mem: str) -> list[str]:
    return [binary, f"mem={mem}", "root=/dev/root", "rootfstype=hostfs", "hostfs=/", "rw",
            f"init={tmp / 'init'}", "con=null", "con0=null,fd:1", "ssl=null", "quiet",
            f"uml_dir={tmp / 'uml'}", f"umid={umid}"]


def _pdeathsig() -> None:
    """In the child: get SIGTERM if the netsim process dies (even by SIGKILL)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)      # PR_SET_PDEATHSIG


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (the UML process and its helpers)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry))
    return out


def stop(proc: subprocess.Popen) -> None:
    """End the guest: SIGTERM to its process group (UML then kills its own helpers), SIGKILL
    if it lingers; return once no process of the group is left."""
    pgid = proc.pid
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is None or group_members(pgid):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
                wait_for(lambda: not group_members(pgid), f"UML process group {pgid} to exit", grace)
                return
            except (subprocess.TimeoutExpired, NetsimError):
                continue
    proc.wait()


def sweep_stale(root: str | None = None) -> list[str]:
    """Remove run directories left by a netsim process that was killed (SIGKILL)."""
    removed = []
    base = Path(root or tempfile.gettempdir())
    for d in base.glob(f"{TMP_PREFIX}*"):
        try:
            owner = int((d / "owner").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not pid_alive(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def prepare(command: Sequence[str], cwd: str | None = None, env: dict[str, str] | None = None,
            modules: Sequence[str] = MODULES, tmp: Path | None = None) -> Path:
    """A fresh run directory holding the guest's init script; its result file goes there too."""
    binary, release = uml_binary(), uml_release()
    if not binary or not release:
        raise GuestError(f"user-mode Linux is not installed ({INSTALL_UML})")
    if os.geteuid() != 0:
        raise GuestError("running a UML guest needs root (its netsim labs program network namespaces)")
    if not os.access("/usr/sbin/modprobe", os.X_OK):
        raise GuestError("the UML guest loads its modules with modprobe, which is missing (apt-get install kmod)")
    sweep_stale()
    tmp = tmp or new_run_dir()
    init = tmp / "init"
    init.write_text(init_script(list(command), cwd or os.getcwd(), str(tmp / "result"),
                                available_modules(modules, release), guest_env(env)))
    init.chmod(0o755)
    return tmp


def new_run_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix=TMP_PREFIX))


def spawn(tmp: Path, stdout, mem: str = DEFAULT_MEM, detached: bool = False) -> subprocess.Popen:
    """Start linux.uml on ``tmp``'s init in its own process group. Unless ``detached``, the
    guest gets SIGTERM when this process dies (even by SIGKILL). The run directory's
    ``owner`` file names the process whose death makes the directory stale."""
    uml_env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TMP", "TEMP")}
    umid = f"netsim-{os.getpid()}-{secrets.token_hex(3)}"
    proc = subprocess.Popen(uml_command(uml_binary(), tmp, umid, mem), stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=subprocess.STDOUT, env=uml_env, start_new_session=True,
                            preexec_fn=None if detached else _pdeathsig)
    (tmp / "owner").write_text(f"{proc.pid if detached else os.getpid()}\n")
    return proc


def mconsole_path(tmp: Path) -> Path | None:
    """The guest's management console socket (uml_dir/<umid>/mconsole)."""
    found = list((tmp / "uml").glob("*/mconsole"))
    return found[0] if found else None


def run(command: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
        timeout: float | None = None, mem: str = DEFAULT_MEM, modules: Sequence[str] = MODULES,
        output: BinaryIO | None = None, boot_timeout: float = BOOT_TIMEOUT) -> Result:
    """Run ``command`` in a fresh UML guest; stream its output to ``output``; return its status.

    Raises GuestError when UML is missing or the guest fails before the command starts,
    GuestTimeout when ``timeout`` (the whole run) passes, and re-raises KeyboardInterrupt
    (also for SIGTERM/SIGHUP) after the guest is stopped. Nothing is left behind.
    """
    output = output or sys.stdout.buffer
    tmp = prepare(command, cwd, env, modules)
    restore = _trap_termination()
    proc = None
    t0 = time.monotonic()
    try:
        proc = spawn(tmp, subprocess.PIPE, mem)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        rc, boot_s = _follow(proc, lines, output, t0, timeout, boot_timeout, command)
        if rc is None:
            try:
                rc = int((tmp / "result").read_text())
            except (OSError, ValueError):
                raise GuestError("the UML guest ended without reporting the command's exit status") from None
        return Result(rc, boot_s, time.monotonic() - t0)
    finally:
        if proc is not None:
            stop(proc)
            if proc.stdout:
                proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)
        restore()


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


def _follow(proc, lines: queue.Queue, output: BinaryIO, t0: float, timeout: float | None,
            boot_timeout: float, command) -> tuple[int | None, float]:
    """Read the console: boot log, then the command's output, then its exit marker."""
    boot_log: list[bytes] = []
    started = None
    rc = None
    while True:
        now = time.monotonic()
        if started is None:
            limit, what = t0 + boot_timeout, "the UML guest to boot and start the command"
        elif rc is None:
            limit = None if timeout is None else t0 + timeout
            what = f"{shlex.join(command)} to finish in the UML guest"
        else:
            limit, what = now + POWEROFF_TIMEOUT, "the UML guest to power off"
        wait = None if limit is None else max(0.0, limit - now)
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            if rc is not None:
                return rc, started - t0        # powered off too slowly: we have the status, stop it
            raise GuestTimeout(what, (limit - t0)) from None
        if line is None:
            if started is None:
                tail = b"".join(boot_log[-15:]).decode(errors="replace").rstrip()
                raise GuestError(f"the UML guest exited (status {proc.wait()}) before starting the command; "
                                 f"its console said:\n{tail}")
            return rc, started - t0
        line = line.replace(b"\r\n", b"\n")
        if started is None:
            if SETUP_FAILED in line:
                step = line.split(SETUP_FAILED, 1)[1].strip().decode(errors="replace")
                tail = b"".join(boot_log[-10:]).decode(errors="replace").rstrip()
                raise GuestError(f"the UML guest failed to {step}" + (f":\n{tail}" if tail else ""))
            if BEGIN in line:
                started = time.monotonic()
            else:
                boot_log.append(line)
        elif rc is None:
            if EXIT in line:
                head, tail = line.split(EXIT, 1)
                if head:
                    output.write(head)
                    output.flush()
                rc = int(tail.split(b"@@", 1)[0])
            else:
                output.write(line)
                output.flush()


def _trap_termination():
    """SIGTERM and SIGHUP unwind like Ctrl-C while a guest runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]
