"""Fixtures shared by the unit tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from netsim.plan.lab import plan_lab
from netsim.proxy.services import resolve
from netsim.topology import load

DEMO = Path(__file__).resolve().parents[2] / "topologies" / "demo.yaml"


@pytest.fixture(scope="session")
def demo():
    """The demo topology planned and its Services resolved, as ``(plan, resolution)``."""
    topo = load(DEMO)
    plan = plan_lab(topo)
    return plan, resolve(topo, plan)
