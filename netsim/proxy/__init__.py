"""The kube-proxy clone: cluster state → per-node rules (iptables, IPVS, nftables)."""
