"""Shared test configuration: tests marked ``root`` are skipped unless run as root on Linux."""
from __future__ import annotations

import os
import sys

import pytest


def pytest_collection_modifyitems(config, items):
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        _skip_ipvs_without_ipvs(items)
        return
    skip = pytest.mark.skip(reason="needs root and a Linux kernel (network namespaces)")
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(skip)


UML_BATCH = "netsim kernel run -- python -m pytest -m ipvs tests/integration (one UML boot; scripts/test-uml.sh)"


def _skip_ipvs_without_ipvs(items):
    """Tests marked ``ipvs`` need IPVS in the kernel: on a kernel without it they are skipped
    with the command that runs them all in one user-mode Linux boot."""
    if not any(item.get_closest_marker("ipvs") for item in items):
        return
    from netsim.kernel.features import host_features
    if host_features().have.get("ip_vs"):
        return
    skip = pytest.mark.skip(reason=f"this kernel has no IPVS; run them with {UML_BATCH}")
    for item in items:
        if item.get_closest_marker("ipvs"):
            item.add_marker(skip)
