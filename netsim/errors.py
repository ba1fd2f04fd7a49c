"""Typed errors. Each formats its own one-line message; the CLI prints it without a traceback."""
from __future__ import annotations

from dataclasses import dataclass


class NetsimError(Exception):
    """Base class: an error the user can act on. ``str(err)`` is the readable line."""


@dataclass(frozen=True)
class Problem:
    """One validation finding: where it is, what is wrong, and how to fix it."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{text} (hint: {self.hint})" if self.hint else text


class TopologyError(NetsimError):
    """The topology or its manifests are invalid; carries every problem found."""

    def __init__(self, problems: list[Problem], source: str = "", consequence: str = "nothing was created"):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''}{where}; {consequence}")

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class LabStateError(NetsimError):
    """A lab is in the wrong state for the request (already up, not found, ...)."""


class ApplyError(NetsimError):
    """Programming the kernel failed; ``step`` names what was being done."""

    def __init__(self, step: str, detail: str):
        self.step = step
        self.detail = detail
        super().__init__(f"{step}: {detail}")


class ReadinessTimeout(NetsimError):
    """A condition polled for never became true; the message names what never appeared."""

    def __init__(self, what: str, timeout: float):
        self.what = what
        self.timeout = timeout
        super().__init__(f"timed out after {timeout:g}s waiting for {what}")


class KernelError(NetsimError):
    """Neither the host kernel nor a user-mode Linux guest can run what was asked."""


class GuestError(NetsimError):
    """The user-mode Linux guest failed to boot, to set up, or to report a result."""
