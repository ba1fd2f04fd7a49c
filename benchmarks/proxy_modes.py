"""kube-proxy modes compared: the script form of ``netsim bench`` (same options).

    .venv/bin/python benchmarks/proxy_modes.py [--profile quick|full] [--variants ...] [--services N ...]

Results go to benchmarks/results/proxy-modes-<profile>/ (JSON, CSV, summary.md, plots).
What is measured and how: ``netsim bench --help`` and the README's Benchmarks section.
Runs as root; every lab, namespace and process it makes is removed, also on Ctrl-C.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from netsim.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        profile = argv[argv.index("--profile") + 1] if "--profile" in argv else "quick"
        argv += ["--out", str(REPO / "benchmarks" / "results" / f"proxy-modes-{profile}")]
    sys.exit(main(["bench", *argv]))
