"""Labs that live in a background UML guest: ``netsim up TOPO --kernel uml`` and the host
commands forwarded to it (status, exec, selftest, apply, down, ...).

The host keeps a record, ``<state root>/<lab>/uml.json``, naming the guest's PID (with its
start time, so a reused PID is never signalled) and its run directory. Requests go through
that directory (see netsim.kernel.serve); the guest is woken over its management console.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..apply import labstate
from ..errors import GuestError, LabStateError, NetsimError
from ..runtime.wait import wait_for
from . import mconsole, uml

RECORD = "uml.json"
# Commands that never go to a guest: they work on files or on the host itself.
HOST_ONLY = {"up", "run", "kernel", "validate", "plan", "proxy", "clean", "bench"}
POWEROFF = 60.0


@dataclass
class GuestRecord:
    lab: str
    pid: int
    start_time: int
    run_dir: str
    topology: str
    started: float

    def save(self) -> None:
        labstate.lab_dir(self.lab).mkdir(parents=True, exist_ok=True)
        labstate.write_json(labstate.lab_dir(self.lab) / RECORD, asdict(self))

    def alive(self) -> bool:
        return labstate.start_time(self.pid) == self.start_time and bool(uml.group_members(self.pid))


def load(lab: str) -> GuestRecord | None:
    try:
        return GuestRecord(**json.loads((labstate.lab_dir(lab) / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def uml_labs() -> list[str]:
    try:
        return sorted(p.name for p in labstate.root().iterdir() if (p / RECORD).exists())
    except FileNotFoundError:
        return []


# -- up ---------------------------------------------------------------------------------------

def up(path: str, lab: str, timeout: float, output: str) -> int:
    """Boot a detached guest that brings the lab up and then serves forwarded commands."""
    if load(lab):
        raise LabStateError(f"lab {lab!r} is already up in a UML guest; run 'netsim down {lab}' first")
    if lab in labstate.labs():
        raise LabStateError(f"lab {lab!r} is already up; run 'netsim down {lab}' first")
    tmp = uml.new_run_dir()
    first = {"argv": ["up", os.path.abspath(path), "--kernel", "host", "--timeout", str(timeout), "-o", output],
             "cwd": os.getcwd()}
    proc = None
    try:
        uml.prepare([sys.executable, "-m", "netsim.kernel.serve", str(tmp), json.dumps(first)], tmp=tmp)
        with open(tmp / "console.log", "wb") as console:
            proc = uml.spawn(tmp, console, detached=True)
        rec = GuestRecord(lab, proc.pid, labstate.start_time(proc.pid), str(tmp), os.path.abspath(path), time.time())
        rec.save()
        t0 = time.monotonic()
        wait_for(lambda: _console_has(tmp, uml.BEGIN) or _boot_failed(proc, tmp),
                 "the UML guest to boot and start its request server", uml.BOOT_TIMEOUT)
        rc = follow(rec, "up", proc)
        if rc != 0:
            _power_off(rec, proc)
            _forget(rec)
            return rc
        print(f"\nlab {lab} runs in a user-mode Linux guest (pid {proc.pid}, booted and up in "
              f"{time.monotonic() - t0:.1f}s). status, exec NODE -- CMD, selftest, probe, trace, verify, "
              f"apply, scale, node, registry and down are forwarded to it; 'netsim down {lab}' powers it off.", file=sys.stderr)
        return 0
    except BaseException:
        if proc is not None:
            uml.stop(proc)
        labstate.remove_dir(lab)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _console_has(tmp: Path, marker: bytes) -> bool:
    try:
        return marker in (tmp / "console.log").read_bytes()
    except OSError:
        return False


def _boot_failed(proc, tmp: Path) -> bool:
    if proc.poll() is None and not _console_has(tmp, uml.SETUP_FAILED):
        return False
    raise GuestError("the UML guest stopped before its request server started; its console said:\n"
                     + console_tail(tmp))


def console_tail(tmp: Path, lines: int = 12) -> str:
    try:
        text = (tmp / "console.log").read_bytes().decode(errors="replace").replace("\r\n", "\n")
    except OSError:
        return "(no console log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


# -- forwarding -----------------------------------------------------------------------------------

def target(args) -> GuestRecord | None:
    """The UML lab a parsed command is about, if it is about one."""
    if args.command in HOST_ONLY or not hasattr(args, "lab"):
        return None
    name = _lab_named(args)
    if name:
        return load(name)
    guests = uml_labs()
    if not guests:
        return None
    hosts = [lab for lab in labstate.labs() if lab not in guests]
    if len(guests) == 1 and not hosts:
        return load(guests[0])
    raise LabStateError(f"several labs are up ({', '.join(sorted(hosts + guests))}); name one with --lab")


def _lab_named(args) -> str | None:
    """The lab a command names: ``verify`` takes ``--lab``, or a topology file (its name)."""
    name = getattr(args, "lab", None)
    if args.command == "verify":
        if getattr(args, "lab_name", None):
            return args.lab_name
        if name and os.path.isfile(name):
            from ..topology import load as load_topology
            return load_topology(name).name
    return name


def forward(rec: GuestRecord, args, argv: list[str]) -> int:
    """Run the same netsim command inside the lab's guest; stream its output; return its status."""
    if args.command == "shell" or (args.command == "exec" and not [a for a in args.cmd if a != "--"]):
        raise NetsimError(f"lab {rec.lab} runs in a UML guest: interactive shells are not forwarded; "
                          "run a command: netsim exec NODE -- CMD")
    if not rec.alive():
        raise GuestError(f"the UML guest of lab {rec.lab} (pid {rec.pid}) is gone; its console said:\n"
                         f"{console_tail(Path(rec.run_dir))}\nrun 'netsim clean {rec.lab}'")
    down = args.command == "down"
    rid = submit(rec, argv, shutdown_after=down)
    rc = follow(rec, rid)
    if down and rc == 0:
        _power_off(rec)
        _forget(rec)
        print(f"its UML guest (pid {rec.pid}) powered off", file=sys.stderr)
    return rc


def submit(rec: GuestRecord, argv: list[str], shutdown_after: bool = False, cancel: str | None = None) -> str:
    rid = f"{time.time_ns()}-{secrets.token_hex(3)}"
    req = {"cancel": cancel} if cancel else {"argv": argv, "cwd": os.getcwd(), "shutdown_after": shutdown_after}
    reqdir = Path(rec.run_dir) / "req"
    tmp = reqdir / f".{rid}.tmp"
    tmp.write_text(json.dumps(req))
    os.replace(tmp, reqdir / f"{rid}.json")
    sock = uml.mconsole_path(Path(rec.run_dir))
    if sock is not None:
        try:
            mconsole.send(sock, f"log netsim-request {rid}\n")
        except OSError:
            pass                      # the server rescans once a second anyway
    return rid


class _Tail:
    def __init__(self, path: Path, sink):
        self.path, self.sink, self.pos = path, sink, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.pos += len(data)
            self.sink.write(data)
            self.sink.flush()


def follow(rec: GuestRecord, rid: str, proc: subprocess.Popen | None = None) -> int:
    """Stream a request's stdout and stderr until its exit status appears; Ctrl-C cancels it."""
    out = Path(rec.run_dir) / "out"
    tails = [_Tail(out / f"{rid}.out", sys.stdout.buffer), _Tail(out / f"{rid}.err", sys.stderr.buffer)]
    rc_file = out / f"{rid}.rc"

    def done():
        for t in tails:
            t.pump()
        if rc_file.exists():
            for t in tails:
                t.pump()
            return rc_file.read_text().strip() or "0"
        gone = proc.poll() is not None if proc is not None else not rec.alive()
        if gone:
            raise GuestError(f"the UML guest of lab {rec.lab} stopped while running the command; "
                             f"its console said:\n{console_tail(Path(rec.run_dir))}")
        return None
    try:
        return int(wait_for(done, f"netsim {rid} in the UML guest", timeout=10**9, max_interval=0.05))
    except KeyboardInterrupt:
        if proc is None and rec.alive():
            submit(rec, [], cancel=rid)
        raise


# -- power off and clean ------------------------------------------------------------------------------

def _power_off(rec: GuestRecord, proc: subprocess.Popen | None = None) -> None:
    """Wait for the guest to power off by itself (after down); stop it if it does not."""
    try:
        wait_for(lambda: (proc.poll() is not None) if proc is not None else not rec.alive(),
                 f"the UML guest of lab {rec.lab} to power off", POWEROFF)
    except NetsimError:
        pass
    if proc is not None:
        uml.stop(proc)
    else:
        stop_pid(rec)


def stop_pid(rec: GuestRecord) -> None:
    """End a guest we did not start in this process: halt over mconsole, then signals."""
    if not rec.alive():
        return
    sock = uml.mconsole_path(Path(rec.run_dir))
    for how in ("halt", signal.SIGTERM, signal.SIGKILL):
        try:
            if how == "halt":
                if sock is None:
                    continue
                mconsole.send(sock, "halt", timeout=2)
            else:
                os.killpg(rec.pid, how)
            wait_for(lambda: not uml.group_members(rec.pid), f"UML guest {rec.pid} to exit", 5)
            return
        except (OSError, NetsimError):
            continue


def _forget(rec: GuestRecord) -> None:
    shutil.rmtree(rec.run_dir, ignore_errors=True)
    try:
        (labstate.lab_dir(rec.lab) / RECORD).unlink()
        labstate.lab_dir(rec.lab).rmdir()
    except OSError:
        pass


def clean(lab: str | None = None) -> list[str]:
    """Stop UML guests of labs (all, or one) and remove their records and run directories."""
    removed = []
    for name in ([lab] if lab else uml_labs()):
        rec = load(name)
        if rec is None:
            continue
        stop_pid(rec)
        _forget(rec)
        removed.append(f"{name} (UML guest {rec.pid})")
    return removed
