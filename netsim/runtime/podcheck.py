"""Does a pod answer? Asked from inside its node, the way a kubelet probe would.

TCP ports get ``GET /hostname`` and must return the pod's name; UDP ports get the
``hostname`` datagram; pods without ports must answer an ICMP echo.
"""
from __future__ import annotations

from ..plan.state import PodPlan
from ..probes.connect import http_get, ping, udp_ask

__all__ = ["answers", "http_get", "ping", "udp_ask"]


def answers(pod: PodPlan, node_netns: str, timeout: float = 0.5) -> bool:
    """One check, no retries. True when the pod replied with its own name (or to ping)."""
    try:
        tcp = [p for p in pod.ports if p.protocol == "TCP"]
        udp = [p for p in pod.ports if p.protocol == "UDP"]
        if tcp:
            return http_get(node_netns, pod.ip, tcp[0].port, "/hostname", timeout) == pod.name
        if udp:
            return udp_ask(node_netns, pod.ip, udp[0].port, b"hostname", timeout) == pod.name
        return ping(node_netns, pod.ip, timeout)
    except OSError:
        return False
