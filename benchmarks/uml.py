"""UML kernel runner figures: guest boot time, and ``netsim run`` of the demo (iptables mode,
legacy backend) in UML next to the same run on the host kernel.

    .venv/bin/python benchmarks/uml.py [--boots 5] [--runs 2] [--out FILE]

Boot time is from starting linux.uml to the command starting in the guest (mounts and the
networking modules included); "whole" adds running ``true`` and powering off. Medians.
Runs as root; the demo runs under the lab name um-bench-demo.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))
from labs import demo_copy  # noqa: E402
from netsim.kernel import features, uml  # noqa: E402


def netsim_run(topo: Path, kernel: str) -> float:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "netsim", "run", str(topo), "--kernel", kernel],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0 or "0 failed" not in done.stdout:
        raise SystemExit(f"netsim run --kernel {kernel} failed:\n{done.stdout[-2000:]}\n{done.stderr}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "uml.json"))
    args = ap.parse_args()
    boots = [uml.run(["true"], output=io.BytesIO()) for _ in range(args.boots)]
    with tempfile.TemporaryDirectory() as tmp:
        topo = demo_copy(Path(tmp), "um-bench-demo")
        topo.write_text(topo.read_text().replace("  proxyMode: iptables\n", "  proxyMode: iptables\n  iptablesBackend: legacy\n"))
        uml_runs = [netsim_run(topo, "uml") for _ in range(args.runs)]
        host_runs = [netsim_run(topo, "host") for _ in range(args.runs)]
    result = {
        "machine": {"kernel": platform.release(), "uml": features.uml_release(), "python": platform.python_version()},
        "boot_to_command_s": round(statistics.median(b.boot_seconds for b in boots), 2),
        "boot_run_true_poweroff_s": round(statistics.median(b.seconds for b in boots), 2),
        "boots": [round(b.boot_seconds, 2) for b in boots],
        "netsim_run_demo_legacy_uml_s": round(statistics.median(uml_runs), 1),
        "netsim_run_demo_legacy_host_s": round(statistics.median(host_runs), 1),
        "runs": {"uml": [round(x, 1) for x in uml_runs], "host": [round(x, 1) for x in host_runs]},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
