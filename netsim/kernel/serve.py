"""The request server inside a long-running UML guest (``netsim up TOPO --kernel uml``).

It runs ``netsim up`` first, then serves the netsim commands the host forwards for the lab
(status, exec, selftest, apply, down, ...). The exchange is the run directory, which the
guest sees at the same path through hostfs:

  req/<id>.json    {"argv": [...], "cwd": "...", "shutdown_after": bool} or {"cancel": "<id>"}
  out/<id>.out     the command's stdout, flushed to the host as it comes
  out/<id>.err     its stderr
  out/<id>.rc      its exit status, written last (the host waits for this file)

The host wakes the server by writing ``netsim-request <id>`` into the guest's kernel log
over the management console; the server blocks on /dev/kmsg (and rescans once a second in
case a wake-up was lost). It exits after a request marked ``shutdown_after`` succeeds (the
forwarded ``down``), and the guest's init then powers off.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

RESCAN = 1.0


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _copy(stream, path: Path) -> None:
    with open(path, "wb") as out:
        for chunk in iter(lambda: stream.read1(65536), b""):
            out.write(chunk)
            out.flush()
            os.fsync(out.fileno())      # hostfs: make it visible to the host now


class Server:
    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.req, self.out = run_dir / "req", run_dir / "out"
        self.req.mkdir(exist_ok=True)
        self.out.mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.seen: set[str] = set()
        self.shutdown = threading.Event()
        self.wake_r, self.wake_w = os.pipe()

    def handle(self, rid: str, req: dict) -> int:
        proc = subprocess.Popen([sys.executable, "-m", "netsim", *req["argv"]], cwd=req.get("cwd") or "/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs[rid] = proc
        copiers = [threading.Thread(target=_copy, args=(proc.stdout, self.out / f"{rid}.out")),
                   threading.Thread(target=_copy, args=(proc.stderr, self.out / f"{rid}.err"))]
        for t in copiers:
            t.start()
        rc = proc.wait()
        for t in copiers:
            t.join()
        self.procs.pop(rid, None)
        write_atomic(self.out / f"{rid}.rc", f"{rc}\n".encode())
        if rc == 0 and req.get("shutdown_after"):
            self.shutdown.set()
            os.write(self.wake_w, b"x")
        return rc

    def scan(self) -> None:
        for path in sorted(self.req.glob("*.json")):
            rid = path.stem
            if rid in self.seen:
                continue
            self.seen.add(rid)
            try:
                req = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if "cancel" in req:
                proc = self.procs.get(req["cancel"])
                if proc is not None:
                    proc.terminate()
                continue
            t = threading.Thread(target=self.handle, args=(rid, req), daemon=True)
            self.threads[rid] = t
            t.start()

    def loop(self) -> None:
        try:
            kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(kmsg, 0, os.SEEK_END)
        except OSError:
            kmsg = None                              # no kernel log to wait on: rescan only
        waits = [self.wake_r] + ([kmsg] if kmsg is not None else [])
        while not (self.shutdown.is_set() and not any(t.is_alive() for t in self.threads.values())):
            self.scan()
            if self.shutdown.is_set():
                for t in self.threads.values():
                    t.join()
                break
            ready, _, _ = select.select(waits, [], [], RESCAN)
            if self.wake_r in ready:
                os.read(self.wake_r, 64)
            while kmsg is not None:                              # drain the log; any record may be a wake-up
                try:
                    if not os.read(kmsg, 8192):
                        break
                except BlockingIOError:
                    break
                except BrokenPipeError:              # records overwritten meanwhile: keep going
                    continue


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir, first = Path(argv[0]), json.loads(argv[1])
    server = Server(run_dir)
    server.seen.add("up")
    if server.handle("up", first) != 0:
        return 1
    server.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
