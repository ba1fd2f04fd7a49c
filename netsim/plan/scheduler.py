"""Place pods on nodes the way kube-scheduler's defaults would, but deterministically.

``nodeName`` pins a pod; otherwise the pod goes to the feasible node (matching its
``nodeSelector``) with the fewest pods so far, ties broken by node order, which spreads
a Deployment's replicas evenly.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..topology.model import NodeSpec, Pod


@dataclass(frozen=True)
class Unschedulable:
    pod: Pod
    reason: str


def schedule(pods: list[Pod] | tuple[Pod, ...], nodes: tuple[NodeSpec, ...],
             existing: dict[str, str] | None = None) -> tuple[dict[str, str], list[Unschedulable]]:
    """Return ``{pod key: node}`` and the pods that fit nowhere.

    ``existing`` holds placements already made (``namespace/name`` → node) and is kept.
    Pods with ``nodeName`` are placed first so they count before spreading starts.
    """
    placed: dict[str, str] = dict(existing or {})
    load = {n.name: 0 for n in nodes}
    for node in placed.values():
        if node in load:
            load[node] += 1
    failed: list[Unschedulable] = []
    ordered = sorted(pods, key=lambda p: p.node_name is None)   # stable: pinned pods first
    for pod in ordered:
        key = pod_key(pod)
        if key in placed:
            continue
        if pod.node_name is not None:
            if pod.node_name not in load:
                failed.append(Unschedulable(pod, f"nodeName {pod.node_name!r} is not a node"))
                continue
            target = pod.node_name
        else:
            feasible = [n.name for n in nodes
                        if all(n.labels.get(k) == v for k, v in pod.node_selector.items())]
            if not feasible:
                failed.append(Unschedulable(pod, f"no node matches nodeSelector {pod.node_selector}"))
                continue
            target = min(feasible, key=lambda name: load[name])
        placed[key] = target
        load[target] += 1
    return placed, failed


def pod_key(pod: Pod) -> str:
    return f"{pod.namespace}/{pod.name}"
