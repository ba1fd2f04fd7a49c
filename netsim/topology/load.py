"""Read a topology file and its manifests, validate everything, return a ``Topology``.

Every problem is collected with its path and a hint; if there is any, ``TopologyError``
is raised before anything is created.
"""
from __future__ import annotations

import difflib
import os
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import yaml

from .. import naming
from ..errors import Problem, TopologyError
from ..plan import scheduler   # a module reference: plan.scheduler imports topology.model
from .check import Checker, _kind, join
from .manifests import ManifestSet, expand_deployment, read_object
from .model import (IPTABLES_BACKENDS, IPVS_SCHEDULERS, OVERLAYS, PROXY_MODES, REGISTRIES, Cluster, ExternalSpec,
                    NodeSpec, Topology)

TOP_FIELDS = {"name", "cluster", "nodes", "externals", "manifests"}
CLUSTER_FIELDS = {"podCIDR", "serviceCIDR", "nodeSubnetLength", "underlayCIDR", "underlayMTU",
                  "proxyMode", "overlay", "registry", "registryEndpoint", "loadBalancerPool",
                  "bridge", "iptablesBackend", "directRouting", "leaseTTL", "renewMargin", "minSyncPeriod",
                  "ipvsScheduler"}
LAB_NAME_MAX = 32


def load(path: str | os.PathLike) -> Topology:
    """Load and validate the topology at ``path``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError([Problem(str(path), f"cannot read topology file: {exc.strerror}")], str(path)) from None
    except UnicodeDecodeError as exc:
        raise TopologyError([Problem(str(path), f"cannot read topology file: not UTF-8 text ({exc.reason} at byte {exc.start})")],
                            str(path)) from None
    return load_text(text, base_dir=path.parent, source=str(path))


def load_data(data: Any, base_dir: str | os.PathLike = ".", source: str = "<topology>") -> Topology:
    """Validate an already parsed topology document (as ``load_text`` does for text)."""
    ck = Checker()
    topo = _build(data, Path(base_dir), source, ck)
    if ck.problems:
        raise TopologyError(ck.problems, source)
    assert topo is not None
    return topo


def expand(path: str | os.PathLike) -> dict:
    """The topology document with every manifest file read in, as inline objects: what a
    running lab keeps so that ``netsim apply`` can change it without the original files."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        return data
    objects = []
    for item in data.get("manifests") or []:
        if isinstance(item, str):
            objects.extend(d for d in yaml.safe_load_all((path.parent / item).read_text()) if d is not None)
        else:
            objects.append(item)
    return dict(data, manifests=objects)


def load_text(text: str, base_dir: str | os.PathLike = ".", source: str = "<topology>") -> Topology:
    """Validate topology YAML given as text; manifest paths are relative to ``base_dir``."""
    ck = Checker()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError([_yaml_problem(source, exc)], source) from None
    topo = _build(data, Path(base_dir), source, ck)
    if ck.problems:
        raise TopologyError(ck.problems, source)
    assert topo is not None
    return topo


def _yaml_problem(source: str, exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return Problem(where, f"malformed YAML: {reason}", "check indentation and quoting near that line")


def _build(data: Any, base: Path, source: str, ck: Checker) -> Topology | None:
    if not isinstance(data, dict):
        # An empty file, or a list/scalar at the top: say so instead of a path-less "is required".
        got = "an empty document" if data is None else _kind(data)
        ck.error(source, f"a topology must be a mapping, got {got}",
                 "it needs at least name: and nodes:, see topologies/demo.yaml")
        return None
    top = data
    ck.fields(top, "", TOP_FIELDS)
    name = ck.dns_label(top.get("name"), "name", LAB_NAME_MAX)
    cluster = _cluster(ck.mapping(top.get("cluster"), "cluster"), ck)
    nodes = _hosts(top.get("nodes"), "nodes", ck, NodeSpec, required=True)
    externals = _hosts(top.get("externals"), "externals", ck, ExternalSpec)
    manifests = _manifests(top.get("manifests"), base, ck)
    pods = list(manifests.pods)
    for dep in manifests.deployments:
        pods.extend(expand_deployment(dep))
    _cross_check(cluster, nodes, externals, manifests, pods, ck)
    if name is None or ck.problems:
        return None
    return Topology(name, cluster, tuple(nodes), tuple(externals), tuple(pods),
                    tuple(manifests.deployments), tuple(manifests.services),
                    tuple(manifests.slices), source)


def _cluster(raw: dict, ck: Checker) -> Cluster:
    ck.fields(raw, "cluster", CLUSTER_FIELDS)
    d = Cluster()
    net = lambda key, default: (ck.network(raw[key], f"cluster.{key}") or default) if key in raw else default
    pod_cidr = net("podCIDR", d.pod_cidr)
    if pod_cidr.prefixlen > 28:
        ck.error("cluster.podCIDR", f"{pod_cidr} is too small for node subnets",
                 "flannel needs room for at least 4 /30 node subnets: use a /28 or larger")
        pod_cidr = d.pod_cidr
    length = d.node_subnet_length
    if pod_cidr.prefixlen > 22:
        length = min(pod_cidr.prefixlen + 2, 30)          # flannel's SubnetLen default rule
    if "nodeSubnetLength" in raw:
        lo = min(pod_cidr.prefixlen + 2, 30)
        got = ck.integer(raw["nodeSubnetLength"], "cluster.nodeSubnetLength", lo, 30,
                         f"flannel needs room for at least 4 node subnets in podCIDR {pod_cidr}")
        length = got if got is not None else length
    pool: list[IPv4Network] = []
    for i, item in enumerate(ck.sequence(raw.get("loadBalancerPool"), "cluster.loadBalancerPool")):
        if (n := ck.network(item, f"cluster.loadBalancerPool[{i}]")) is not None:
            pool.append(n)
    mtu = d.underlay_mtu
    if "underlayMTU" in raw:
        mtu = ck.integer(raw["underlayMTU"], "cluster.underlayMTU", 1280, 9000) or mtu
    ttl = d.lease_ttl
    if "leaseTTL" in raw:
        ttl = ck.integer(raw["leaseTTL"], "cluster.leaseTTL", 2, 10 * 86400, "etcd grants at least ~2 s") or ttl
    margin = min(d.renew_margin, ttl // 2)
    if "renewMargin" in raw:
        margin = ck.integer(raw["renewMargin"], "cluster.renewMargin", 1, max(ttl - 1, 1),
                            "renewal must come before the lease expires") or margin
    sync = d.min_sync_period
    if "minSyncPeriod" in raw:
        value = raw["minSyncPeriod"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 60:
            ck.error("cluster.minSyncPeriod", f"must be a number of seconds from 0 to 60, got {value!r}",
                     "kube-proxy's default is 1")
        else:
            sync = float(value)
    scheduler = d.ipvs_scheduler
    if "ipvsScheduler" in raw:
        value = raw["ipvsScheduler"]
        if value not in IPVS_SCHEDULERS:
            close = difflib.get_close_matches(str(value), IPVS_SCHEDULERS, n=1)
            ck.error("cluster.ipvsScheduler", f"must be one of {', '.join(IPVS_SCHEDULERS)}; got {value!r}",
                     f"kube-proxy's --ipvs-scheduler; rr (round robin) is the default"
                     + (f"; did you mean '{close[0]}'?" if close else ""))
        else:
            scheduler = value
    direct = d.direct_routing
    if "directRouting" in raw:
        direct = ck.boolean(raw["directRouting"], "cluster.directRouting") or False
    bridge = d.bridge
    if "bridge" in raw:
        bridge = ck.dns_label(raw["bridge"], "cluster.bridge", naming.IFNAMSIZ) or bridge
        if bridge in (naming.UPLINK, "lo"):
            ck.error("cluster.bridge", f"{bridge!r} is already an interface of every node",
                     f"choose another name, such as {d.bridge}")
            bridge = d.bridge
    return Cluster(
        pod_cidr=pod_cidr, service_cidr=net("serviceCIDR", d.service_cidr), node_subnet_length=length,
        underlay_cidr=net("underlayCIDR", d.underlay_cidr), underlay_mtu=mtu,
        proxy_mode=ck.choice(raw.get("proxyMode"), "cluster.proxyMode", PROXY_MODES, d.proxy_mode),
        overlay=ck.choice(raw.get("overlay"), "cluster.overlay", OVERLAYS, d.overlay),
        registry=ck.choice(raw.get("registry"), "cluster.registry", REGISTRIES, d.registry),
        registry_endpoint=_endpoint(raw.get("registryEndpoint"), ck),
        load_balancer_pool=tuple(pool), bridge=bridge,
        iptables_backend=ck.choice(raw.get("iptablesBackend"), "cluster.iptablesBackend",
                                   IPTABLES_BACKENDS, d.iptables_backend),
        direct_routing=direct, lease_ttl=ttl, renew_margin=margin, min_sync_period=sync,
        ipvs_scheduler=scheduler)


def _endpoint(value: Any, ck: Checker) -> str | None:
    """A registry the user runs: an etcd URL netsim's client speaks."""
    url = ck.string(value, "cluster.registryEndpoint")
    if url is not None and not url.startswith(("etcd+http://", "etcd+unix://")):
        ck.error("cluster.registryEndpoint", f"{url!r} is not an etcd endpoint",
                 "write etcd+http://HOST:PORT or etcd+unix:///PATH/etcd.sock:0")
        return None
    return url


def _hosts(raw: Any, key: str, ck: Checker, cls: type, required: bool = False) -> list:
    items = ck.sequence(raw, key, required=required)
    if required and isinstance(raw, list) and not raw:
        ck.error(key, "must list at least one node")
    out = []
    why = f" (the switch-side interface '<name>{naming.UNDERLAY_PORT_SUFFIX}' must fit the 15-byte interface name limit)"
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        item = ck.mapping(item, path)
        known = {"name", "address"} | ({"labels"} if cls is NodeSpec else set())
        ck.fields(item, path, known)
        name = ck.dns_label(item.get("name"), join(path, "name"), naming.HOST_NAME_MAX, why)
        address = ck.address(item["address"], join(path, "address")) if "address" in item else None
        if cls is NodeSpec:
            labels = ck.labels(item.get("labels"), join(path, "labels"))
            labels.setdefault("kubernetes.io/hostname", name or "")
            out.append(NodeSpec(name or f"<{path}>", labels, address))
        else:
            out.append(ExternalSpec(name or f"<{path}>", address))
    return out


def _manifests(raw: Any, base: Path, ck: Checker) -> ManifestSet:
    out = ManifestSet()
    for i, item in enumerate(ck.sequence(raw, "manifests")):
        where = f"manifests[{i}]"
        if isinstance(item, dict):
            read_object(item, where, ck, out)
            continue
        if not isinstance(item, str):
            ck.error(where, "must be a file path or an inline Kubernetes object")
            continue
        path = base / item
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except OSError as exc:
            ck.error(where, f"cannot read {item}: {exc.strerror}", f"paths are relative to {base}")
            continue
        except UnicodeDecodeError as exc:
            ck.error(where, f"cannot read {item}: not UTF-8 text ({exc.reason} at byte {exc.start})")
            continue
        except yaml.YAMLError as exc:
            p = _yaml_problem(str(path), exc)
            ck.error(f"{where} ({p.path})", p.message, p.hint)
            continue
        for j, doc in enumerate(docs):
            read_object(doc, f"{where} ({item}#{j})" if len(docs) > 1 else f"{where} ({item})", ck, out)
    return out


def _cross_check(cluster: Cluster, nodes: list, externals: list, m: ManifestSet, pods: list, ck: Checker) -> None:
    """Checks that span sections: overlaps, duplicates, placement and capacity."""
    cidrs = {"cluster.podCIDR": cluster.pod_cidr, "cluster.serviceCIDR": cluster.service_cidr,
             "cluster.underlayCIDR": cluster.underlay_cidr}
    keys = list(cidrs)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            if cidrs[keys[a]].overlaps(cidrs[keys[b]]):
                ck.error(keys[b], f"{cidrs[keys[b]]} overlaps {keys[a]} {cidrs[keys[a]]}",
                         "pod, service and underlay ranges must be disjoint")
    for i, pool in enumerate(cluster.load_balancer_pool):
        for key in ("cluster.podCIDR", "cluster.serviceCIDR"):
            if pool.overlaps(cidrs[key]):
                ck.error(f"cluster.loadBalancerPool[{i}]", f"{pool} overlaps {key} {cidrs[key]}")
    # Duplicate machine names (nodes and externals share the underlay namespace).
    first_use: dict[str, str] = {}
    for key, group in (("nodes", nodes), ("externals", externals)):
        for i, h in enumerate(group):
            if h.name.startswith("<"):            # no valid name: already reported
                continue
            if h.name in first_use:
                ck.error(f"{key}[{i}].name", f"duplicate name {h.name!r}, already used by {first_use[h.name]}",
                         "node and external names must be unique")
            else:
                first_use[h.name] = f"{key}[{i}]"
    # Underlay addresses: room, explicit ones inside and unique.
    hosts = max(cluster.underlay_cidr.num_addresses - 3, 0)  # network, broadcast, reserved .1 gateway
    if len(nodes) + len(externals) > hosts:
        ck.error("cluster.underlayCIDR", f"{cluster.underlay_cidr} has room for {hosts} machines, "
                 f"{len(nodes) + len(externals)} are declared", "use a larger underlay CIDR")
    seen: dict = {}
    for key, group in (("nodes", nodes), ("externals", externals)):
        for i, h in enumerate(group):
            if h.address is None:
                continue
            if h.address not in cluster.underlay_cidr or h.address in (cluster.underlay_cidr.network_address, cluster.underlay_cidr.broadcast_address):
                ck.error(f"{key}[{i}].address", f"{h.address} is not a host address of underlayCIDR {cluster.underlay_cidr}")
            elif h.address in seen:
                ck.error(f"{key}[{i}].address", f"{h.address} is already used by {seen[h.address]}")
            seen[h.address] = h.name
    # Node subnets: flannel never hands out the first subnet (SubnetMin = network + 1 subnet).
    subnets = 2 ** (cluster.node_subnet_length - cluster.pod_cidr.prefixlen) - 1
    if len(nodes) > subnets:
        ck.error("nodes", f"{len(nodes)} nodes but podCIDR {cluster.pod_cidr} holds only {subnets} "
                 f"/{cluster.node_subnet_length} node subnets", "use a larger podCIDR or longer nodeSubnetLength")
    # Kubernetes object names.
    for kind, objs in (("Pod", pods), ("Deployment", m.deployments), ("Service", m.services),
                       ("EndpointSlice", m.slices)):
        first: dict[tuple[str, str], tuple[str, str | None]] = {}
        for o in objs:
            owner = getattr(o, "owner", None)      # replicas are listed after every Pod
            where = f"{o.source} {owner.replace('/', ' ')}" if owner else f"{o.source} {kind} {o.name}"
            key = (o.namespace, o.name)
            if key not in first:
                first[key] = (where, owner)
            elif owner and first[key][1]:
                continue                            # replicas of a duplicate Deployment: reported above
            elif owner:
                ck.error(where, f"its replica Pod {o.namespace}/{o.name} has the same name as {first[key][0]}",
                         "rename that Pod; replicas are named <deployment>-<template hash>-<suffix>")
            else:
                ck.error(f"{where}: metadata.name", f"duplicate {kind} {o.namespace}/{o.name}",
                         f"{first[key][0]} already defines it; names must be unique in a namespace")
    # Node ports are cluster-wide; ClusterIPs too.
    used_np: dict[tuple[int, str], str] = {}
    used_ip: dict[str, str] = {}
    for svc in m.services:
        where = f"{svc.source} Service {svc.name}: spec"
        for i, port in enumerate(svc.ports):
            if port.node_port is None:
                continue
            key = (port.node_port, port.protocol)
            if key in used_np:
                ck.error(f"{where}.ports[{i}].nodePort", f"{port.node_port}/{port.protocol} is already used by Service {used_np[key]}",
                         "each nodePort can be allocated once")
            used_np[key] = f"{svc.namespace}/{svc.name}"
        ip = svc.cluster_ip
        if ip and ip != "None":
            if IPv4Address(ip) not in cluster.service_cidr:
                ck.error(f"{where}.clusterIP", f"{ip} is not inside serviceCIDR {cluster.service_cidr}",
                         "pick an address in serviceCIDR, or leave clusterIP unset to have one allocated")
            elif ip in used_ip:
                ck.error(f"{where}.clusterIP", f"{ip} is already allocated to Service {used_ip[ip]}",
                         "leave clusterIP unset to have a free one allocated")
            used_ip[ip] = f"{svc.namespace}/{svc.name}"
    # Placement and per-node capacity (host-local: all hosts of the subnet but the gateway).
    known = {n.name for n in nodes if not n.name.startswith("<")}   # "<nodes[i]>": invalid name, reported
    reported: set[tuple[str, str, str]] = set()

    def pod_error(pod, field: str, message: str, hint: str) -> None:
        """Once per Pod, or once per Deployment for all its replicas."""
        owner = pod.owner or f"Pod {pod.name}"
        if (pod.source, owner, field) in reported:
            return
        reported.add((pod.source, owner, field))
        spec = "spec.template.spec" if pod.owner else "spec"
        ck.error(f"{pod.source} {owner.replace('/', ' ')}: {spec}.{field}", message, hint)

    for pod in pods:
        if pod.node_name is not None and pod.node_name not in known:
            pod_error(pod, "nodeName", f"node {pod.node_name!r} does not exist", f"nodes are: {', '.join(sorted(known))}")
    placed, failed = scheduler.schedule([p for p in pods if p.node_name is None or p.node_name in known],
                                        tuple(nodes))
    for f in failed:
        pod_error(f.pod, "nodeSelector", f.reason, "label a node to match, or change the selector")
    capacity = 2 ** (32 - cluster.node_subnet_length) - 3
    for node, count in Counter(placed.values()).items():
        if count > capacity:
            ck.error(f"nodes[{[n.name for n in nodes].index(node)}]",
                     f"{count} pods are scheduled on node {node}, but a /{cluster.node_subnet_length} subnet holds {capacity}",
                     "add nodes, reduce replicas, or lower nodeSubnetLength for bigger node subnets")
