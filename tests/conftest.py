"""Shared test configuration: tests marked ``root`` are skipped unless run as root on Linux."""
from __future__ import annotations

import os
import sys

import pytest


def pytest_collection_modifyitems(config, items):
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root and a Linux kernel (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
