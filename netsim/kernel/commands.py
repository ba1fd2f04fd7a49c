"""The CLI's kernel commands: ``run`` (batch), ``kernel check`` and ``kernel run``."""
from __future__ import annotations

import os
import sys
import time

from ..errors import KernelError
from . import decide, features, uml

NOT_INSTALLED = f"not installed ({decide.INSTALL_UML})"


def choose(topo, kernel: str, host: features.Features | None = None,
           guest: features.Features | None = None) -> decide.Decision:
    """Decide where ``topo`` runs; raises KernelError with what is missing."""
    host = host or features.host_features()
    if guest is None and not decide.in_guest():
        guest = features.uml_features()
    return decide.decide(kernel, features.needs(topo), host, guest)


_PROBE = object()


def check_text(topo=None, host=None, guest=_PROBE) -> tuple[str, int]:
    """What the host and the UML kernel have, what ``topo`` needs, and the verdict."""
    from ..report import table
    host = host or features.host_features()
    guest = features.uml_features() if guest is _PROBE else guest
    needed = {n.feature: n.why for n in features.needs(topo)} if topo else {}
    yes = lambda f, n: "-" if f is None else ("yes" if f.have.get(n) else "no")
    rows = [[features.FEATURES[n][0], yes(host, n), yes(guest, n), needed.get(n, "")] for n in features.FEATURES]
    head = ["FEATURE", f"HOST ({host.kernel.split()[1]})",
            f"UML ({guest.kernel.split()[1]})" if guest else "UML", "NEEDED BY" + (f" {topo.name}" if topo else "")]
    lines = [table(rows, head), "", f"host: {host.detail}",
             f"uml: {guest.detail if guest else NOT_INSTALLED}"]
    rc = 0
    if topo is not None:
        try:
            d = decide.decide("auto", features.needs(topo), host, guest)
            lines.append(f"{topo.name}: runs on the {'host kernel' if d.kernel == 'host' else 'UML kernel'}: {d.reason}")
        except KernelError as err:
            lines.append(f"{topo.name}: cannot run here: {err}")
            rc = 1
    return "\n".join(lines), rc


def run_here(path: str, timeout: float) -> int:
    """Bring the lab up on this kernel, check it (selftest, verify), tear it down."""
    from ..cli import main
    from ..topology import load
    lab = load(path).name
    t0 = time.monotonic()
    rc = main(["up", path, "--timeout", str(timeout), "--kernel", "host"])
    if rc != 0:
        return rc
    try:
        print(flush=True)
        rc = main(["selftest", lab])
        print(flush=True)
        rc = main(["verify", path]) or rc        # its verify: section and the default matrix
    finally:
        sys.stdout.flush()
        down = main(["down", lab])
    print(f"netsim run: {lab} {'passed' if rc == 0 else 'FAILED'} (up, selftest, verify, down in "
          f"{time.monotonic() - t0:.1f}s)", flush=True)
    return rc or down


def run_topology(path: str, kernel: str, timeout: float, max_time: float) -> int:
    """``netsim run``: the batch job, on the host kernel or inside a UML guest."""
    from ..topology import load
    topo = load(path)
    d = choose(topo, kernel)
    print(f"netsim: kernel: {d.kernel}: {d.reason}", flush=True)
    if d.kernel == "host":
        return run_here(path, timeout)
    guest_cmd = [sys.executable, "-m", "netsim", "run", os.path.abspath(path), "--kernel", "host",
                 "--timeout", str(timeout)]
    res = uml.run(guest_cmd, timeout=max_time)
    print(f"netsim: UML guest booted in {res.boot_seconds:.1f}s; whole run {res.seconds:.1f}s; "
          f"exit status {res.returncode}", flush=True)
    return res.returncode


def kernel_run(command: list[str], timeout: float | None, mem: str) -> int:
    """``netsim kernel run -- CMD``: one command (e.g. a pytest batch) in one UML boot."""
    if not command:
        raise KernelError("nothing to run: netsim kernel run -- COMMAND [ARGS...]")
    if decide.in_guest():
        raise KernelError("already inside a user-mode Linux guest")
    res = uml.run(command, timeout=timeout, mem=mem)
    print(f"netsim: UML guest booted in {res.boot_seconds:.1f}s; whole run {res.seconds:.1f}s; "
          f"exit status {res.returncode}", file=sys.stderr, flush=True)
    return res.returncode
