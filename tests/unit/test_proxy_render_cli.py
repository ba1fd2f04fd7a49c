"""``netsim proxy render``: the demo's ruleset, deterministic and golden-checked, no root."""
from __future__ import annotations

import os
from pathlib import Path

from netsim.cli import main

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "iptables" / "demo-node-1.rules"


def render(capsys) -> str:
    assert main(["proxy", "render", str(REPO / "topologies" / "demo.yaml"), "--node", "node-1"]) == 0
    return capsys.readouterr().out


def test_demo_render_matches_golden_and_is_deterministic(capsys):
    first, second = render(capsys), render(capsys)
    assert first == second
    if os.environ.get("NETSIM_UPDATE_GOLDEN"):
        GOLDEN.write_text(first)
    assert first == GOLDEN.read_text()
    # The shapes a reader looks for first.
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000" in first
    assert '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully' in first
    assert "--probability 0.1666666667" in first          # web: 6 endpoints, first of 1/(n-i)
    assert "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS" in first


def test_unknown_node_is_one_readable_line(capsys):
    code = main(["proxy", "render", str(REPO / "topologies" / "demo.yaml"), "--node", "nope"])
    err = capsys.readouterr().err
    assert code == 1 and "no node 'nope'" in err and "Traceback" not in err
