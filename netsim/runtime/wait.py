"""Readiness by condition: poll until something is true, or say what never appeared."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from ..errors import ReadinessTimeout

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 10.0,
             interval: float = 0.005, max_interval: float = 0.1) -> T:
    """Call ``condition`` until it returns something truthy; return that value.

    The interval starts small and backs off, so fast conditions cost little latency.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ReadinessTimeout(what, timeout)
        time.sleep(interval)
        interval = min(interval * 2, max_interval)
