"""Live changes on a running lab: ``netsim apply -f``, ``netsim delete -f``, scaling.

The lab keeps its desired objects in ``objects.json`` (the topology with every manifest
inline, node addresses pinned). A change edits that document, validates all of it (a
bad change is refused whole, with every problem, and nothing moves), plans again with
the running lab as ``previous`` (pods keep their nodes and addresses), then creates and
removes pod namespaces, tells the pod servers, and publishes the Services.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass, replace
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import yaml

from ..errors import ApplyError, Problem, TopologyError
from ..plan.lab import plan_lab
from ..plan.state import LabPlan, Namespace, PodPlan
from ..topology import load_data
from ..topology.model import Topology
from . import labstate, netns
from .lab import build_namespace, stop_processes, wait_answers
from .labstate import LabState

KINDS = ("Pod", "Deployment", "Service", "EndpointSlice")


@dataclass
class Change:
    plan: LabPlan
    topology: Topology
    added: list[PodPlan]
    removed: list[PodPlan]
    objects: list[str]          # "Kind ns/name" changed
    programming_s: float = 0.0  # Services written → rules in every node's kernel
    services_changed: int = 0
    warnings: tuple = ()        # what Kubernetes accepts but would warn about


# -- the desired-objects document ---------------------------------------------------

def objects_path(lab: str) -> Path:
    return labstate.lab_dir(lab) / "objects.json"


def save_objects(lab: str, doc: dict) -> None:
    labstate.write_json(objects_path(lab), doc)


def load_objects(lab: str) -> dict:
    return json.loads(objects_path(lab).read_text())


def pin_addresses(doc: dict, plan: LabPlan) -> dict:
    """Write every node's and external's underlay address into the document, so adding or
    removing a machine never moves another one."""
    addr = {m.name: m.address for m in plan.nodes + plan.externals}
    def pinned(items):
        out = []
        for item in items or []:
            item = {"name": item} if isinstance(item, str) else dict(item)
            if item.get("name") in addr:
                item["address"] = addr[item["name"]]
            out.append(item)
        return out
    return dict(doc, nodes=pinned(doc.get("nodes")), externals=pinned(doc.get("externals")))


def identity(obj: Any) -> tuple[str, str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    meta = obj["metadata"]
    return (str(obj.get("kind")), str(meta.get("namespace") or "default"), str(meta.get("name")))


def read_file(path: str) -> list[dict]:
    try:
        text = Path(path).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as exc:
        raise TopologyError([Problem(path, f"cannot read: {exc.strerror}")], path, "nothing was changed") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise TopologyError([Problem(where, f"malformed YAML: {getattr(exc, 'problem', exc)}")], path,
                            "nothing was changed") from None
    out = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            out.extend(doc.get("items") or [])
        else:
            out.append(doc)
    return out


def merge(doc: dict, objects: list[dict], delete: bool) -> tuple[dict, list[str]]:
    """``doc`` with ``objects`` applied (replace by kind/namespace/name, else append) or
    deleted. Unknown objects in a delete are an error, as kubectl says NotFound."""
    current = list(doc.get("manifests") or [])
    index = {identity(o): i for i, o in enumerate(current)}
    touched, problems = [], []
    for n, obj in enumerate(objects):
        ident = identity(obj)
        if ident is None:
            problems.append(Problem(f"document {n}", "is not a Kubernetes object with metadata.name"))
            continue
        label = f"{ident[0]} {ident[1]}/{ident[2]}"
        if delete:
            if ident not in index:
                problems.append(Problem(f"document {n}", f"{label} not found"))
                continue
            current[index[ident]] = None
        elif ident in index and current[index[ident]] is not None:
            current[index[ident]] = obj
        else:
            index[ident] = len(current)
            current.append(obj)
        touched.append(label)
    if problems:
        raise TopologyError(problems, "the change", "nothing was changed")
    return dict(doc, manifests=[o for o in current if o is not None]), touched


# -- applying -------------------------------------------------------------------------

def change(lab: str, doc: dict, touched: list[str], timeout: float = 30.0) -> Change:
    """Validate ``doc`` whole, then make the running lab match it."""
    old = labstate.load_plan(lab)
    try:
        topo = load_data(doc, source=f"lab {lab}")
    except TopologyError as err:
        raise TopologyError(err.problems, f"lab {lab} after this change", "nothing was changed") from None
    subnets = {n.name: IPv4Network(n.subnet) for n in old.nodes}
    new = plan_lab(topo, previous=old, subnets=subnets)
    st = LabState.load(lab)
    old_keys, new_keys = {p.key for p in old.pods}, {p.key for p in new.pods}
    removed = [p for p in old.pods if p.key not in new_keys]
    added = [p for p in new.pods if p.key not in old_keys]
    for pod in removed:
        remove_pod(lab, st, pod)
    st.netns += [p.netns for p in added]          # recorded before they exist
    st.save()
    for pod in added:
        add_pod(lab, new, pod)
    labstate.save_plan(new)
    save_objects(lab, doc)
    wait_answers(new, added, timeout)
    result = Change(new, topo, added, removed, touched)
    from .services import publish, wait_programmed
    res, keys, since = publish(lab, topo, new)
    result.services_changed, result.warnings = len(keys), res.warnings
    if keys:
        result.programming_s = wait_programmed(lab, new, res, keys, since, timeout)
    return result


def add_pod(lab: str, plan: LabPlan, pod: PodPlan) -> None:
    node = plan.node(pod.node)
    netns.create(pod.netns)
    cni = next(ns for ns in plan.namespaces if ns.role == "node-cni" and ns.owner == node.name)
    veth = next(l for l in cni.links if l.peer_netns == pod.netns)
    build_namespace(Namespace(node.netns, "node-cni", node.name, links=(veth,)), plan.iptables_backend)
    build_namespace(next(ns for ns in plan.namespaces if ns.name == pod.netns), plan.iptables_backend)
    reply = podserver_call(lab, pod.node, {"op": "add", "pod": {
        "name": pod.name, "namespace": pod.namespace, "netns": pod.netns,
        "ports": [{"port": x.port, "protocol": x.protocol, "name": x.name} for x in pod.ports]}})
    if not reply.get("ok"):
        raise ApplyError(f"starting pod {pod.key}", reply.get("error", "pod server refused"))


def remove_pod(lab: str, st: LabState, pod: PodPlan) -> None:
    """Close the pod's sockets, stop anything running inside it, drop its namespace."""
    podserver_call(lab, pod.node, {"op": "remove", "name": pod.name, "namespace": pod.namespace})
    stop_processes([], [pod.netns])
    netns.remove(pod.netns)
    st.netns = [n for n in st.netns if n != pod.netns]
    st.save()


def podserver_call(lab: str, node: str, request: dict, timeout: float = 10.0) -> dict:
    """One JSON-lines request to a node's pod server over its control socket."""
    path = labstate.lab_dir(lab) / f"podserver-{node}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            raise ApplyError(f"pod server on {node}", f"cannot reach {path}: {exc.strerror or exc}") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b"{}")


def scale(doc: dict, kind_name: str, replicas: int) -> tuple[dict, list[str]]:
    """``deployment/web`` (optionally ``ns/``-prefixed name) set to ``replicas``."""
    kind, _, name = kind_name.partition("/")
    namespace = "default"
    if "/" in name:
        namespace, name = name.split("/", 1)
    if kind.lower() not in ("deployment", "deploy", "deployments"):
        raise TopologyError([Problem(kind_name, "only deployments can be scaled", "use deployment/NAME")],
                            "scale", "nothing was changed")
    for obj in doc.get("manifests") or []:
        if identity(obj) == ("Deployment", namespace, name):
            new = json.loads(json.dumps(obj))
            new.setdefault("spec", {})["replicas"] = replicas
            return merge(doc, [new], delete=False)
    raise TopologyError([Problem(kind_name, f"Deployment {namespace}/{name} not found")], "scale",
                        "nothing was changed")
