"""The cluster DNS: the kube-dns Service and its objects, the zone data a real dnsmasq
serves, each pod's resolv.conf, and a small stdlib DNS client for checks."""
