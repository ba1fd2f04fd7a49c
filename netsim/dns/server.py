"""How a cluster DNS replica runs: dnsmasq's command line and the pod's port-53 redirect.
Pure, no root.

dnsmasq reads CNAME and SRV records (``--cname``, ``--srv-host``) only when it starts, so
changing them means a new process. To make that lossless, as CoreDNS's in-process reload
is, dnsmasq listens on one of two high ports and the pod's own nat table sends port 53 to
the current one (``NETSIM-DNS``, a ``REDIRECT``): a new dnsmasq starts on the other port,
answers, the redirect flips in one ``iptables-restore`` commit, the old one drains and
exits. From outside the pod nothing changes: the kube-dns endpoints stay ``<pod IP>:53``.
"""
from __future__ import annotations

from pathlib import Path

from .objects import DNS_PORT, DOMAIN

SERVER_PORTS = (10053, 10054)
CHAIN = "NETSIM-DNS"


def other_port(port: int | None) -> int:
    """The port the next dnsmasq of a replica listens on."""
    return SERVER_PORTS[1] if port == SERVER_PORTS[0] else SERVER_PORTS[0]


def dnsmasq_args(dns_dir: Path, port: int) -> list[str]:
    """No upstream at all (no resolv.conf, no /etc/hosts, no servers): cluster.local is
    answered from the zone files or NXDOMAIN, anything else is refused."""
    return ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
            f"--local=/{DOMAIN}/", "--bogus-priv", "--domain-needed",
            "--interface=eth0", f"--port={port}", "--user=nobody", "--group=nogroup",
            f"--hostsdir={dns_dir / 'hosts'}", f"--conf-file={dns_dir / 'records.conf'}", "--local-ttl=5",
            "--pid-file=", "--log-facility=-", "--log-queries"]


def redirect_rules(port: int, first: bool) -> str:
    """iptables-restore --noflush input sending the pod's port 53 (UDP and TCP) to
    ``port``, marking each flow's conntrack entry with that port (so the flows of a
    retired dnsmasq can be flushed in one netlink request); ``first`` also installs the
    jumps from PREROUTING (once per pod)."""
    lines = ["*nat", f":{CHAIN} - [0:0]"]
    if first:
        lines += [f"-A PREROUTING -p {proto} -m {proto} --dport {DNS_PORT} -m comment "
                  f"--comment \"cluster DNS: port {DNS_PORT} to the serving dnsmasq\" -j {CHAIN}"
                  for proto in ("udp", "tcp")]
    lines.append(f"-A {CHAIN} -j CONNMARK --set-xmark {port:#x}/0xffffffff")   # flows know their dnsmasq
    lines += [f"-A {CHAIN} -p {proto} -j REDIRECT --to-ports {port}" for proto in ("udp", "tcp")]
    return "\n".join(lines + ["COMMIT"]) + "\n"
