"""The objects netsim adds to every lab with ``cluster.dns: true`` (the default): a
``coredns`` Deployment of two replicas in ``kube-system`` and the ``kube-dns`` Service in
front of it, at the tenth address of serviceCIDR, as kubeadm deploys them.

The replicas run Debian's dnsmasq instead of CoreDNS. They declare only the ``metrics``
port (9153): the pod server answers there, which is the replicas' readiness check, while
port 53 belongs to dnsmasq (the Service's targetPort is the number 53, as in kubeadm's
manifest, so no containerPort is needed for it).
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

NAMESPACE = "kube-system"
SERVICE = "kube-dns"
DEPLOYMENT = "coredns"
LABELS = {"k8s-app": "kube-dns"}
REPLICAS = 2
METRICS_PORT = 9153
DNS_PORT = 53
SOURCE = "cluster.dns"                 # where messages say these objects come from
DOMAIN = "cluster.local"
TENTH = 10


def service_ip(service_cidr: IPv4Network) -> IPv4Address | None:
    """The tenth address of serviceCIDR (10.96.0.10 for 10.96.0.0/12), or None if the
    range has no usable tenth address."""
    if service_cidr.num_addresses < TENTH + 2:           # the tenth host, plus broadcast
        return None
    return service_cidr.network_address + TENTH


def manifests(service_cidr: IPv4Network) -> list[dict]:
    """The Service and Deployment, as Kubernetes YAML would give them."""
    ip = service_ip(service_cidr)
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE,
                     "labels": dict(LABELS, **{"kubernetes.io/name": "CoreDNS"})},
        "spec": {"selector": dict(LABELS), "clusterIP": str(ip),
                 "ports": [{"name": "dns", "port": DNS_PORT, "targetPort": DNS_PORT, "protocol": "UDP"},
                           {"name": "dns-tcp", "port": DNS_PORT, "targetPort": DNS_PORT, "protocol": "TCP"},
                           {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT,
                            "protocol": "TCP"}]}}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE, "labels": dict(LABELS)},
        "spec": {"replicas": REPLICAS, "selector": {"matchLabels": dict(LABELS)},
                 "template": {"metadata": {"labels": dict(LABELS)},
                              "spec": {"containers": [{
                                  "name": "coredns", "image": "debian:bookworm (dnsmasq-base)",
                                  "ports": [{"name": "metrics", "containerPort": METRICS_PORT,
                                             "protocol": "TCP"}]}]}}}}
    return [service, deployment]


def is_dns_port(port) -> bool:
    """A kube-dns Service port that dnsmasq answers (53/UDP, 53/TCP), not the built-in pod
    server: probes that ask a backend its name cannot use it; DNS queries check it instead."""
    return (port.namespace, port.name, port.port) == (NAMESPACE, SERVICE, DNS_PORT)


def is_dns_pod(pod) -> bool:
    """Does this pod (a PodPlan) run the cluster DNS server? The coredns replicas do."""
    return pod.namespace == NAMESPACE and pod.owner == f"Deployment/{DEPLOYMENT}"
