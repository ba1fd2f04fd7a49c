"""Kubernetes manifests (Pod, Deployment, Service, EndpointSlice) → model objects.

Fields that shape networking are read; fields Kubernetes has but netsim ignores
(images, commands, probes, volumes, ...) are accepted silently; anything else is a typo
and is reported, as ``kubectl apply --validate=strict`` would.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from .check import Checker, join
from .model import ContainerPort, Deployment, Endpoint, EndpointSlice, Pod, Service, ServicePort, SlicePort

SUPPORTED = {"Pod": "v1", "Service": "v1", "Deployment": "apps/v1", "EndpointSlice": "discovery.k8s.io/v1"}

OBJECT_FIELDS = {"apiVersion", "kind", "metadata", "spec"}
OBJECT_IGNORED = {"status"}
META_FIELDS = {"name", "namespace", "labels"}
META_IGNORED = {"annotations", "generateName", "uid", "resourceVersion", "creationTimestamp",
                "ownerReferences", "finalizers", "managedFields", "generation", "deletionTimestamp",
                "deletionGracePeriodSeconds", "selfLink"}
POD_SPEC_FIELDS = {"containers", "nodeName", "nodeSelector"}
POD_SPEC_IGNORED = {
    "hostNetwork", "initContainers", "ephemeralContainers", "restartPolicy", "terminationGracePeriodSeconds",
    "activeDeadlineSeconds", "dnsPolicy", "dnsConfig", "serviceAccountName", "serviceAccount",
    "automountServiceAccountToken", "securityContext", "imagePullSecrets", "hostname", "subdomain",
    "affinity", "schedulerName", "tolerations", "hostAliases", "priorityClassName", "priority",
    "readinessGates", "runtimeClassName", "enableServiceLinks", "preemptionPolicy", "overhead",
    "topologySpreadConstraints", "setHostnameAsFQDN", "os", "hostUsers", "schedulingGates",
    "resourceClaims", "volumes", "shareProcessNamespace", "hostPID", "hostIPC", "resources"}
CONTAINER_FIELDS = {"name", "ports"}
CONTAINER_IGNORED = {
    "image", "command", "args", "workingDir", "envFrom", "env", "resources", "resizePolicy",
    "restartPolicy", "volumeMounts", "volumeDevices", "livenessProbe", "readinessProbe",
    "startupProbe", "lifecycle", "terminationMessagePath", "terminationMessagePolicy",
    "imagePullPolicy", "securityContext", "stdin", "stdinOnce", "tty"}
CONTAINER_PORT_FIELDS = {"containerPort", "protocol", "name"}
CONTAINER_PORT_IGNORED = {"hostIP"}
DEPLOYMENT_FIELDS = {"replicas", "selector", "template"}
DEPLOYMENT_IGNORED = {"strategy", "minReadySeconds", "revisionHistoryLimit",
                      "progressDeadlineSeconds", "paused"}
SERVICE_FIELDS = {
    "type", "selector", "ports", "clusterIP", "clusterIPs", "externalTrafficPolicy",
    "internalTrafficPolicy", "sessionAffinity", "sessionAffinityConfig",
    "loadBalancerSourceRanges", "externalIPs", "loadBalancerIP", "externalName",
    "publishNotReadyAddresses"}
SERVICE_IGNORED = {"ipFamilies", "ipFamilyPolicy", "allocateLoadBalancerNodePorts",
                   "loadBalancerClass", "healthCheckNodePort", "trafficDistribution"}
SERVICE_PORT_FIELDS = {"name", "port", "targetPort", "protocol", "nodePort"}
SERVICE_PORT_IGNORED = {"appProtocol"}
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PROTOCOLS = ("TCP", "UDP")
NODE_PORT_RANGE = (30000, 32767)
# A Deployment's pod names are <name>-<template hash>-<5 chars>; keep them within 63.
DEPLOYMENT_NAME_MAX = 63 - 17
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"   # Kubernetes' rand.SafeEncodeString alphabet


class ManifestSet:
    """Everything read from the ``manifests`` list, in input order."""

    def __init__(self) -> None:
        self.pods: list[Pod] = []
        self.deployments: list[Deployment] = []
        self.services: list[Service] = []
        self.slices: list[EndpointSlice] = []


def read_object(obj: Any, where: str, ck: Checker, out: ManifestSet) -> None:
    """Validate one Kubernetes object and add it to ``out``. ``where`` is e.g. ``manifests[2]``."""
    if not isinstance(obj, dict):
        ck.error(where, f"a Kubernetes object must be a mapping, got {type(obj).__name__}")
        return
    kind = obj.get("kind")
    name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), dict) else None
    prefix = f"{where} {kind or '<no kind>'} {name or '<no name>'}: "
    if kind == "List":
        for i, item in enumerate(ck.sequence(obj.get("items"), prefix + "items", required=True)):
            read_object(item, f"{where}.items[{i}]", ck, out)
        return
    if not isinstance(kind, str) or kind not in SUPPORTED:
        ck.error(prefix + "kind", f"{kind!r} is not supported" if kind is not None else "is required",
                 f"netsim reads {', '.join(SUPPORTED)}")
        return
    if obj.get("apiVersion") != SUPPORTED[kind]:
        ck.error(prefix + "apiVersion", f"expected {SUPPORTED[kind]!r} for {kind}, got {obj.get('apiVersion')!r}",
                 f"use apiVersion: {SUPPORTED[kind]}")
    known = OBJECT_FIELDS | ({"addressType", "endpoints", "ports"} if kind == "EndpointSlice" else set())
    if kind == "EndpointSlice":
        known.discard("spec")
    ck.fields(obj, prefix, known, OBJECT_IGNORED)
    meta = ck.mapping(obj.get("metadata"), prefix + "metadata", required=True)
    ck.fields(meta, prefix + "metadata", META_FIELDS, META_IGNORED)
    namespace = "default"
    if meta.get("namespace") is not None:
        namespace = ck.dns_label(meta["namespace"], prefix + "metadata.namespace") or "default"
    labels = ck.labels(meta.get("labels"), prefix + "metadata.labels")
    source = where
    if kind == "Pod":
        name = ck.dns_label(meta.get("name"), prefix + "metadata.name")
        spec = _pod_spec(ck.mapping(obj.get("spec"), prefix + "spec", required=True), prefix + "spec", ck)
        if name:
            out.pods.append(Pod(name, namespace, labels, spec["ports"], spec["nodeName"],
                                spec["nodeSelector"], None, source))
    elif kind == "Deployment":
        name = ck.dns_label(meta.get("name"), prefix + "metadata.name", DEPLOYMENT_NAME_MAX,
                            " (its pods are named <name>-<hash>-<suffix>)")
        dep = _deployment(obj.get("spec"), prefix + "spec", ck)
        if name and dep:
            out.deployments.append(Deployment(name, namespace, source=source, **dep))
    elif kind == "Service":
        name = ck.dns_label(meta.get("name"), prefix + "metadata.name", rfc1035=True)
        svc = _service(ck.mapping(obj.get("spec"), prefix + "spec", required=True), prefix + "spec", ck)
        if name and svc is not None:
            out.services.append(Service(name, namespace, source=source, **svc))
    elif kind == "EndpointSlice":
        name = ck.dns_label(meta.get("name"), prefix + "metadata.name")
        eps = _endpoint_slice(obj, labels, prefix, ck)
        if name and eps is not None:
            out.slices.append(EndpointSlice(name, namespace, source=source, **eps))


def expand_deployment(dep: Deployment) -> list[Pod]:
    """The replicas a Deployment asks for, with Kubernetes-shaped deterministic names."""
    labels = dict(dep.template_labels, **{"pod-template-hash": dep.template_hash})
    names: list[str] = []
    used: set[str] = set()
    for i in range(dep.replicas):
        suffix, retry = _suffix(dep, i), 0
        while suffix in used:       # 27**5 suffixes: rare, but Kubernetes would retry too
            retry += 1
            suffix = _suffix(dep, f"{i}/{retry}")
        used.add(suffix)
        names.append(f"{dep.name}-{dep.template_hash}-{suffix}")
    return [Pod(name, dep.namespace, labels, dep.ports, dep.node_name, dep.node_selector,
                f"Deployment/{dep.name}", dep.source) for name in names]


# -- helpers ------------------------------------------------------------------

def _pod_spec(spec: dict, path: str, ck: Checker) -> dict:
    ck.fields(spec, path, POD_SPEC_FIELDS, POD_SPEC_IGNORED)
    if spec.get("hostNetwork"):
        ck.error(join(path, "hostNetwork"), "host-network pods are not supported",
                 "remove hostNetwork; every pod gets its own network namespace")
    ports: list[ContainerPort] = []
    seen_ports: set[tuple[int, str]] = set()
    seen_names: set[str] = set()
    containers = ck.sequence(spec.get("containers"), join(path, "containers"), required=True)
    if "containers" in spec and not containers and isinstance(spec.get("containers"), list):
        ck.error(join(path, "containers"), "must list at least one container")
    container_names: set[str] = set()
    for ci, container in enumerate(containers):
        cpath = f"{join(path, 'containers')}[{ci}]"
        container = ck.mapping(container, cpath)
        ck.fields(container, cpath, CONTAINER_FIELDS, CONTAINER_IGNORED)
        cname = ck.dns_label(container.get("name"), join(cpath, "name"))
        if cname in container_names:
            ck.error(join(cpath, "name"), f"duplicate container name {cname!r}")
        container_names.add(cname or "")
        for pi, port in enumerate(ck.sequence(container.get("ports"), join(cpath, "ports"))):
            ppath = f"{join(cpath, 'ports')}[{pi}]"
            port = ck.mapping(port, ppath)
            ck.fields(port, ppath, CONTAINER_PORT_FIELDS, CONTAINER_PORT_IGNORED | {"hostPort"})
            if "hostPort" in port:
                ck.error(join(ppath, "hostPort"), "hostPort is not supported", "use a NodePort Service")
            number = ck.port(port.get("containerPort"), join(ppath, "containerPort"))
            proto = ck.choice(port.get("protocol"), join(ppath, "protocol"), PROTOCOLS, "TCP")
            pname = ck.port_name(port.get("name"), join(ppath, "name")) if "name" in port else None
            if number is None:
                continue
            if (number, proto) in seen_ports:
                ck.error(join(ppath, "containerPort"), f"{number}/{proto} is declared twice in this pod")
            if pname and pname in seen_names:
                ck.error(join(ppath, "name"), f"port name {pname!r} is declared twice in this pod")
            seen_ports.add((number, proto))
            if pname:
                seen_names.add(pname)
            ports.append(ContainerPort(number, proto, pname))
    node_name = None
    if spec.get("nodeName") is not None:
        node_name = ck.string(spec.get("nodeName"), join(path, "nodeName"))
    selector = ck.labels(spec.get("nodeSelector"), join(path, "nodeSelector"))
    return {"ports": tuple(ports), "nodeName": node_name, "nodeSelector": selector}


def _deployment(spec: Any, path: str, ck: Checker) -> dict | None:
    spec = ck.mapping(spec, path, required=True)
    ck.fields(spec, path, DEPLOYMENT_FIELDS, DEPLOYMENT_IGNORED)
    replicas = 1
    if "replicas" in spec:
        replicas = ck.integer(spec["replicas"], join(path, "replicas"), 0, None,
                              "replicas must be 0 or more")
    selector = ck.mapping(spec.get("selector"), join(path, "selector"), required=True)
    ck.fields(selector, join(path, "selector"), {"matchLabels"}, {"matchExpressions"})
    if selector.get("matchExpressions"):
        ck.error(join(path, "selector.matchExpressions"), "is not supported", "use matchLabels")
    match = ck.labels(selector.get("matchLabels"), join(path, "selector.matchLabels"))
    template = ck.mapping(spec.get("template"), join(path, "template"), required=True)
    ck.fields(template, join(path, "template"), {"metadata", "spec"})
    tmeta = ck.mapping(template.get("metadata"), join(path, "template.metadata"))
    ck.fields(tmeta, join(path, "template.metadata"), {"labels"}, META_IGNORED | {"name", "namespace"})
    tlabels = ck.labels(tmeta.get("labels"), join(path, "template.metadata.labels"))
    if selector and not match:
        ck.error(join(path, "selector.matchLabels"), "is required")
    elif match and any(tlabels.get(k) != v for k, v in match.items()):
        ck.error(join(path, "selector"), "does not match template labels",
                 f"template.metadata.labels must include {match}")
    pod = _pod_spec(ck.mapping(template.get("spec"), join(path, "template.spec"), required=True),
                    join(path, "template.spec"), ck)
    if replicas is None:
        return None
    digest = hashlib.sha256(json.dumps(template, sort_keys=True, default=str).encode()).digest()
    return {"replicas": replicas, "selector": match, "template_labels": tlabels,
            "ports": pod["ports"], "node_name": pod["nodeName"], "node_selector": pod["nodeSelector"],
            "template_hash": _encode(digest, 10)}


def _service(spec: dict, path: str, ck: Checker) -> dict | None:
    ck.fields(spec, path, SERVICE_FIELDS, SERVICE_IGNORED)
    stype = ck.choice(spec.get("type"), join(path, "type"), SERVICE_TYPES, "ClusterIP")
    selector = None
    if spec.get("selector") is not None:
        selector = ck.labels(spec["selector"], join(path, "selector"))
    ports: list[ServicePort] = []
    raw_ports = ck.sequence(spec.get("ports"), join(path, "ports"))
    if not raw_ports and stype != "ExternalName" and spec.get("clusterIP") != "None":
        ck.error(join(path, "ports"), "must list at least one port")
    names: set[str] = set()
    for i, port in enumerate(raw_ports):
        ppath = f"{join(path, 'ports')}[{i}]"
        port = ck.mapping(port, ppath)
        ck.fields(port, ppath, SERVICE_PORT_FIELDS, SERVICE_PORT_IGNORED)
        number = ck.port(port.get("port"), join(ppath, "port"))
        proto = ck.choice(port.get("protocol"), join(ppath, "protocol"), PROTOCOLS, "TCP")
        name = ""
        if port.get("name") is not None:
            name = ck.port_name(port["name"], join(ppath, "name")) or ""
        elif len(raw_ports) > 1:
            ck.error(join(ppath, "name"), "is required when a Service has several ports",
                     "name every port, e.g. name: http")
        if name and name in names:
            ck.error(join(ppath, "name"), f"duplicate port name {name!r}")
        names.add(name)
        target = port.get("targetPort", number)
        if isinstance(target, str) and not (target.isascii() and target.isdigit()):
            target = ck.port_name(target, join(ppath, "targetPort"))
        elif target is not None:
            target = ck.port(int(target) if isinstance(target, str) else target, join(ppath, "targetPort"))
        node_port = None
        if port.get("nodePort") is not None:
            if stype not in ("NodePort", "LoadBalancer"):
                ck.error(join(ppath, "nodePort"), f"is only allowed for NodePort and LoadBalancer services, not {stype}",
                         "set type: NodePort, or remove nodePort")
            node_port = ck.integer(port["nodePort"], join(ppath, "nodePort"), *NODE_PORT_RANGE,
                                   hint="the default --service-node-port-range is 30000-32767")
        if number is not None and target is not None:
            ports.append(ServicePort(number, target, proto, name, node_port))
    cluster_ip = spec.get("clusterIP")
    if cluster_ip not in (None, "", "None"):
        cluster_ip = str(ck.address(cluster_ip, join(path, "clusterIP")) or "") or None
    elif cluster_ip == "":
        cluster_ip = None
    policy_types = ("NodePort", "LoadBalancer")
    etp = ck.choice(spec.get("externalTrafficPolicy"), join(path, "externalTrafficPolicy"),
                    ("Cluster", "Local"), "Cluster")
    if "externalTrafficPolicy" in spec and stype not in policy_types:
        ck.error(join(path, "externalTrafficPolicy"), f"may only be set for NodePort and LoadBalancer services, not {stype}")
    itp = ck.choice(spec.get("internalTrafficPolicy"), join(path, "internalTrafficPolicy"), ("Cluster", "Local"), "Cluster")
    affinity = ck.choice(spec.get("sessionAffinity"), join(path, "sessionAffinity"), ("None", "ClientIP"), "None")
    timeout = 10800
    cfg = ck.mapping(spec.get("sessionAffinityConfig"), join(path, "sessionAffinityConfig"))
    ck.fields(cfg, join(path, "sessionAffinityConfig"), {"clientIP"})
    client_ip = ck.mapping(cfg.get("clientIP"), join(path, "sessionAffinityConfig.clientIP"))
    ck.fields(client_ip, join(path, "sessionAffinityConfig.clientIP"), {"timeoutSeconds"})
    if "timeoutSeconds" in client_ip:
        timeout = ck.integer(client_ip["timeoutSeconds"], join(path, "sessionAffinityConfig.clientIP.timeoutSeconds"), 1, 86400) or timeout
    ranges = tuple(r for i, s in enumerate(ck.sequence(spec.get("loadBalancerSourceRanges"), join(path, "loadBalancerSourceRanges")))
                   if (r := ck.network(s, f"{join(path, 'loadBalancerSourceRanges')}[{i}]")) is not None)
    ext_ips = tuple(a for i, s in enumerate(ck.sequence(spec.get("externalIPs"), join(path, "externalIPs")))
                    if (a := ck.address(s, f"{join(path, 'externalIPs')}[{i}]")) is not None)
    lb_ip = ck.address(spec["loadBalancerIP"], join(path, "loadBalancerIP")) if spec.get("loadBalancerIP") else None
    ext_name = None
    if stype == "ExternalName":
        ext_name = ck.string(spec.get("externalName"), join(path, "externalName"), required=True)
    publish = bool(spec.get("publishNotReadyAddresses", False))
    return {"type": stype, "ports": tuple(ports), "selector": selector, "cluster_ip": cluster_ip,
            "external_traffic_policy": etp, "internal_traffic_policy": itp,
            "session_affinity": affinity, "affinity_timeout": timeout,
            "load_balancer_source_ranges": ranges, "external_ips": ext_ips,
            "load_balancer_ip": lb_ip, "external_name": ext_name, "publish_not_ready": publish}


def _endpoint_slice(obj: dict, labels: dict, prefix: str, ck: Checker) -> dict | None:
    service = labels.get("kubernetes.io/service-name")
    if not service:
        ck.error(prefix + "metadata.labels", "needs the label kubernetes.io/service-name",
                 "name the Service this slice belongs to")
    if obj.get("addressType") != "IPv4":
        ck.error(prefix + "addressType", f"must be IPv4, got {obj.get('addressType')!r}")
    endpoints: list[Endpoint] = []
    for i, ep in enumerate(ck.sequence(obj.get("endpoints"), prefix + "endpoints")):
        epath = f"{prefix}endpoints[{i}]"
        ep = ck.mapping(ep, epath)
        ck.fields(ep, epath, {"addresses", "conditions", "nodeName", "targetRef"},
                  {"zone", "hostname", "hints", "deprecatedTopology"})
        addrs = tuple(a for j, s in enumerate(ck.sequence(ep.get("addresses"), join(epath, "addresses"), required=True))
                      if (a := ck.address(s, f"{join(epath, 'addresses')}[{j}]")) is not None)
        cond = ck.mapping(ep.get("conditions"), join(epath, "conditions"))
        ck.fields(cond, join(epath, "conditions"), {"ready", "serving", "terminating"})
        flags = {k: ck.boolean(cond[k], join(epath, f"conditions.{k}")) for k in ("ready", "serving", "terminating") if k in cond}
        ready = flags.get("ready")
        ready = True if ready is None else ready
        serving = flags.get("serving")
        serving = True if serving is None else serving        # kube-proxy: absent means true
        terminating = bool(flags.get("terminating"))
        ref = ck.mapping(ep.get("targetRef"), join(epath, "targetRef"))
        target = (ck.string(ref.get("name"), join(epath, "targetRef.name"))
                  if ref.get("kind", "Pod") == "Pod" else None)
        node = ck.string(ep.get("nodeName"), join(epath, "nodeName")) if ep.get("nodeName") is not None else None
        endpoints.append(Endpoint(addrs, ready, serving, terminating, node, target))
    ports: list[SlicePort] = []
    for i, port in enumerate(ck.sequence(obj.get("ports"), prefix + "ports")):
        ppath = f"{prefix}ports[{i}]"
        port = ck.mapping(port, ppath)
        ck.fields(port, ppath, {"name", "port", "protocol"}, {"appProtocol"})
        number = ck.port(port.get("port"), join(ppath, "port"))
        proto = ck.choice(port.get("protocol"), join(ppath, "protocol"), PROTOCOLS, "TCP")
        if number is not None:
            ports.append(SlicePort(number, proto, port.get("name") or ""))
    return {"service_name": service or "", "endpoints": tuple(endpoints), "ports": tuple(ports)}


def _encode(digest: bytes, length: int) -> str:
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:length])


def _suffix(dep: Deployment, index: int | str) -> str:
    return _encode(hashlib.sha256(f"{dep.namespace}/{dep.name}/{dep.template_hash}/{index}".encode()).digest(), 5)
