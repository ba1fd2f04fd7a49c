"""Pick the kernel a topology runs on: the host's, or a user-mode Linux guest's."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import KernelError
from .features import FEATURES, Features, Need

CHOICES = ("auto", "host", "uml")
IN_GUEST_ENV = "NETSIM_IN_UML"          # set inside the guest: its kernel is "the host" there
INSTALL_UML = "apt-get install user-mode-linux"


@dataclass(frozen=True)
class Decision:
    kernel: str                          # "host" | "uml"
    reason: str                          # one line for the user


def describe(missing: list[Need]) -> str:
    """'IPVS (ip_vs) (proxyMode: ipvs), dummy links (kube-ipvs0) (...)'"""
    return ", ".join(f"{FEATURES[n.feature][0]} [{n.why}]" for n in missing)


def _hint_for_uml(missing: list[Need]) -> str:
    hints = []
    for n in missing:
        if n.feature == "nf_tables" and n.why.startswith("iptablesBackend"):
            hints.append("set cluster.iptablesBackend: legacy to run it in UML")
        elif n.feature == "nf_tables":
            hints.append("nftables mode needs a kernel with nf_tables (the host's)")
    return "; ".join(dict.fromkeys(hints))


def in_guest() -> bool:
    return os.environ.get(IN_GUEST_ENV) == "1"


def decide(choice: str, needs: list[Need], host: Features, uml: Features | None) -> Decision:
    """Host when it has every need (or when asked), UML when the host lacks one; else explain."""
    if choice not in CHOICES:
        raise KernelError(f"--kernel must be one of {', '.join(CHOICES)}, got {choice!r}")
    on_host = [n for n in needs if not host.have.get(n.feature, False)]
    if in_guest():
        if choice == "uml":
            raise KernelError("already inside a user-mode Linux guest; use --kernel host here")
        if on_host:
            raise KernelError(f"this UML guest kernel has no {describe(on_host)}")
        return Decision("host", f"running on this guest kernel ({host.kernel})")
    if choice == "host":
        if on_host:
            raise KernelError(f"this kernel ({host.kernel}) has no {describe(on_host)}; "
                              "run it with --kernel uml (a user-mode Linux kernel that has them)")
        return Decision("host", f"running on the host kernel ({host.kernel}), as asked")
    if choice == "auto" and not on_host:
        return Decision("host", f"the host kernel ({host.kernel}) has everything this topology needs")
    if uml is None:
        what = f"this kernel ({host.kernel}) has no {describe(on_host)}, and " if on_host else ""
        raise KernelError(f"{what}user-mode Linux is not installed ({INSTALL_UML})")
    on_uml = [n for n in needs if not uml.have.get(n.feature, False)]
    if on_uml:
        hint = _hint_for_uml(on_uml)
        lead = f"this kernel ({host.kernel}) has no {describe(on_host)}, and " if on_host else ""
        raise KernelError(f"{lead}the user-mode Linux kernel ({uml.kernel}) has no {describe(on_uml)}"
                          + (f"; {hint}" if hint else ""))
    if choice == "uml":
        return Decision("uml", f"running in a user-mode Linux kernel ({uml.kernel}), as asked")
    return Decision("uml", f"the host kernel ({host.kernel}) has no {describe(on_host)}; "
                           f"running in a user-mode Linux kernel ({uml.kernel})")
