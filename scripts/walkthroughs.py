#!/usr/bin/env python3
"""Regenerate docs/walkthroughs.md: bring up each teaching scenario of topologies/, trace
and verify it, and put the real output into the page. Needs root; takes about a minute.

    .venv/bin/python scripts/walkthroughs.py        # labs are named wt-<scenario> ($NETSIM_LAB_PREFIX), removed after
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = os.environ.get("NETSIM_LAB_PREFIX", "wt-")
KEY = re.compile(r"KUBE-(SVC|SEP|EXT|SVL|NODEPORTS|MARK-MASQ|POSTROUTING)|masquerade|dnat|drop|reject|FLANNEL-POSTRTG")

# scenario: [(block name, netsim arguments after "--lab LAB")], verify block name
RUNS = {
    "same-node": [("same-node-pod", ["trace", "client", "server"]), ("same-node-svc", ["trace", "client", "svc/server"])],
    "cross-node": [("cross-node", ["trace", "client", "server"])],
    "egress": [("egress", ["trace", "client", "outside"])],
    "nodeport-etp": [("np-cluster", ["trace", "outside", "node-1:30100"]), ("np-local", ["trace", "outside", "node-2:30101"]),
                     ("np-drop", ["trace", "outside", "node-1:30101", "--timeout", "0.5"])],
    "hairpin": [("hairpin", ["trace", "solo", "svc/solo"])],
    "loadbalancer": [("lb-cluster", ["trace", "outside", "192.168.100.241:80"]),
                     ("lb-local", ["trace", "outside", "192.168.100.242:80"])],
    "no-endpoints": [("none", ["trace", "client", "svc/nobody"])],
}
VERIFY = {"same-node": "same-node-verify", "cross-node": "cross-node-verify", "egress": "egress-verify",
          "nodeport-etp": "np-verify", "hairpin": "hairpin-verify", "loadbalancer": "lb-verify",
          "no-endpoints": "none-verify"}

TEMPLATE = '# Walkthroughs: seeing a packet\'s path\n\nSeven small labs in `topologies/`, one per thing people ask about Kubernetes networking.\nEach file is commented and has a `verify:` section; the traces below are what\n`netsim trace` printed on this project\'s machine (addresses, ports and chain hashes come\nfrom the lab, so yours match except the random source ports and IP IDs).\n\nHow to read a trace:\n\n* Each line is one packet seen on one interface, in the order the packet met them:\n  `→` the probe\'s direction, `←` the reply; `in`/`out` is how that interface saw it.\n  Hops are `<namespace owner> <interface>`: a pod\'s `eth0`, the node\'s end of its veth\n  (`vethXXXXXXXX`), the node\'s bridge `cni0`, its VXLAN device `flannel.1`, its uplink\n  `eth0`, and the underlay switch\'s ports (`underlay node-1-eth0`).\n* `**` lines say what changed since the previous sighting of that packet: that is where\n  NAT happened. On the underlay, `VXLAN outer` is the encapsulating header (node to node,\n  UDP 8472, VNI 1); the 5-tuple shown is the inner packet\'s.\n* The probe is a single TCP SYN (or UDP datagram, ICMP echo). The source\'s kernel answers\n  the SYN-ACK with a RST, which the text hides (`--every-packet` shows it; the pcapng\n  and `-o json` always have everything).\n* `netfilter rules matched` comes from `nft monitor trace` in each node; kube-proxy\'s\n  iptables-nft rules appear in nft syntax (`-m statistic` becomes `meta random`, comments\n  are dropped). Below, only the NAT-relevant lines are kept.\n* Every trace writes a pcapng with one interface per hop; open it in Wireshark, or\n  `tshark -r FILE -d udp.port==8472,vxlan` (Wireshark decodes VXLAN on 4789 by default,\n  flannel uses 8472).\n\nTo run one: `netsim up topologies/<name>.yaml`, the `netsim trace` lines in the file\'s\nheader, `netsim verify <name>`, then `netsim down <name>`.\n\n## 1. Same node (`topologies/same-node.yaml`)\n\nPod to pod on one node: the frame crosses the bridge from one veth to the other and is\nnever rewritten. `cni0` does not appear: bridged frames between two ports do not pass the\nbridge\'s own interface.\n\n{same-node-pod}\n\nThe same pod through its Service\'s ClusterIP. The DNAT happens as the frame enters the\nbridge (br_netfilter hands bridged IPv4 to iptables): KUBE-SERVICES matches the\nClusterIP and port, KUBE-SVC-… picks an endpoint, KUBE-SEP-… DNATs. The reply is\nrewritten back by conntrack; the client only ever sees the ClusterIP.\n\n{same-node-svc}\n\n{same-node-verify}\n\n## 2. Across nodes (`topologies/cross-node.yaml`)\n\nnode-1 routes node-2\'s pod subnet via `flannel.1`; the VXLAN device wraps the frame in\nUDP from node-1 to node-2 port 8472, VNI 1. The inner packet keeps both pod addresses.\n\n{cross-node}\n\n`node-to-clusterip` in the table: a node\'s own process has a source outside the pod CIDR,\nso kube-proxy masquerades it (here to node-1\'s `flannel.1` address 10.244.1.0).\n\n{cross-node-verify}\n\n## 3. Pod to outside: masquerade (`topologies/egress.yaml`)\n\nPod addresses mean nothing on the underlay, so flannel\'s FLANNEL-POSTRTG masquerades pod\ntraffic leaving the pod network to the node\'s address. The outside cannot reach a pod IP\nat all (no route): `outside-to-pod-ip` expects failure.\n\n{egress}\n\n{egress-verify}\n\n## 4. NodePort: externalTrafficPolicy Cluster vs Local (`topologies/nodeport-etp.yaml`)\n\nThe only `web` pod runs on node-2. eTP=Cluster on node-1: KUBE-NODEPORTS → KUBE-EXT-…\nmarks the packet for masquerade, KUBE-SEP-… DNATs it to node-2\'s pod, KUBE-POSTROUTING\nmasquerades it to node-1\'s `flannel.1` address, so the reply comes back through node-1\n(which undoes both). The pod never learns the client\'s address.\n\n{np-cluster}\n\neTP=Local on node-2, which has the pod: KUBE-EXT-… goes to KUBE-SVL-… (local endpoints\nonly) without marking; DNAT only, and the pod sees the client 192.168.100.254.\n\n{np-local}\n\neTP=Local on node-1, which has no local pod: the filter table\'s KUBE-EXTERNAL-SERVICES\ndrops the SYN. The walk ends at node-1 `eth0`.\n\n{np-drop}\n\nNote `cluster-via-node-2`: eTP=Cluster is SNATed even when the pod is local (to the\nbridge address 10.244.2.1).\n\n{np-verify}\n\n## 5. Hairpin (`topologies/hairpin.yaml`)\n\n`solo` reaches its own Service. After DNAT the frame must leave by the port it came in\non (the veth has hairpin mode on), and KUBE-SEP-… marks it (`ip saddr <endpoint> jump\nKUBE-MARK-MASQ`) so that KUBE-POSTROUTING masquerades it to the bridge address\n10.244.1.1. Both rewrites happen between the two sightings on the same veth.\n\n{hairpin}\n\n{hairpin-verify}\n\n## 6. LoadBalancer (`topologies/loadbalancer.yaml`)\n\nOne node answers ARP for each LB IP (MetalLB L2 mode); here node-2. eTP=Cluster: DNAT and\nSNAT (to node-2\'s bridge address, since the chosen pod is local). The reply shows both\nhalves of conntrack\'s undoing: the un-SNAT happens as it enters (PREROUTING, seen on\n`cni0 in`), the un-DNAT as it leaves (POSTROUTING, seen on `eth0 out`).\n\n{lb-cluster}\n\neTP=Local: only nodes with a local pod announce the address; the client address survives.\n\n{lb-local}\n\n{lb-verify}\n\n## 7. A Service without endpoints (`topologies/no-endpoints.yaml`)\n\nNo pod matches the selector, so there is nothing to DNAT to. The filter table\'s\nKUBE-SERVICES rejects new connections to the ClusterIP with ICMP port unreachable (sent\nfrom the bridge address), so the client fails at once instead of timing out.\n\n{none}\n\n{none-verify}\n\n## Breaking things on purpose\n\n`tests/integration/test_probes.py` does these on a running lab; try them by hand:\n\n* Delete kube-proxy\'s MASQUERADE rule on node-2 of `nodeport-etp`\n  (`netsim exec node-2 -- iptables -t nat -D KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`):\n  `cluster-via-node-2` fails with `source seen 192.168.100.254`. Via node-1 it still\n  passes, because flannel\'s own rule masquerades traffic from outside the pod network to\n  other nodes\' subnets; `netsim trace outside node-1:30100` shows FLANNEL-POSTRTG doing it.\n* Delete node-1\'s route to node-2\'s pod subnet (`netsim exec node-1 -- ip route del 10.244.2.0/24`):\n  `netsim trace client server` in `cross-node` ends with\n  `node-1 sent the packet for pod 10.244.2.2 out of eth0 without VXLAN encapsulation: it has no route for that pod subnet via flannel.1`.\n* Scale a Deployment down (`netsim scale deployment/web --replicas 1`): probes through the\n  Service are answered only by the replicas left, and `netsim verify` still passes.\n'


def netsim(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "netsim", *args], capture_output=True, text=True, cwd=REPO)
    return done.stdout.rstrip("\n")


def section(text: str, title: str) -> str:
    return text.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0] if f"\n{title}\n" in text else ""


def trace_block(text: str) -> str:
    walk = text.partition("\nnetfilter rules matched")[0].strip()
    rules, current = [], None
    for line in section(text, "netfilter rules matched (nft monitor trace):").splitlines():
        if not line.startswith("      "):
            current = line
        elif KEY.search(line):
            if current:
                rules.append(current)
                current = None
            rules.append(line)
    parts = [walk]
    if rules:
        parts.append("netfilter rules matched (nft monitor trace; the NAT-relevant ones):\n" + "\n".join(rules))
    if (ct := section(text, "conntrack:")):
        parts.append("conntrack:\n" + ct)
    return "```\n" + "\n\n".join(parts) + "\n```"


def main() -> int:
    blocks: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, runs in RUNS.items():
            lab = PREFIX + name
            topo = Path(tmp) / f"{name}.yaml"
            topo.write_text((REPO / "topologies" / f"{name}.yaml").read_text().replace(f"name: {name}\n", f"name: {lab}\n", 1))
            subprocess.run([sys.executable, "-m", "netsim", "up", str(topo)], check=True, capture_output=True, cwd=REPO)
            try:
                for block, args in runs:
                    out = netsim(args[0], "--lab", lab, *args[1:], "-w", str(Path(tmp) / f"{block}.pcapng"))
                    blocks[block] = trace_block(out)
                blocks[VERIFY[name]] = "```\n" + netsim("verify", str(topo)) + "\n```"
            finally:
                subprocess.run([sys.executable, "-m", "netsim", "down", lab], capture_output=True, cwd=REPO)
    (REPO / "docs" / "walkthroughs.md").write_text(TEMPLATE.format(**blocks))
    print("docs/walkthroughs.md written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
