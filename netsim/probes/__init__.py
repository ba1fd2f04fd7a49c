"""Probes, packet traces and path verification on a running lab.

* ``targets``: what FROM and TARGET name (pod, node, external, Service by access path); pure.
* ``dnsname``: a TARGET that is a DNS name (``dns:web``, ``web.default.svc.cluster.local``),
  looked up from the source pod; its trace shows the query's walk before the connection's.
* ``connect``: plain-socket primitives (HTTP over TCP, UDP questions, ICMP echo) run
  inside a namespace; the second opinion every probe asks the built-in server for.
* ``scapyprobe``: a crafted SYN / UDP datagram / ICMP echo sent with scapy from inside
  the source namespace, and what came back.
* ``probe``: both together, as one ``ProbeResult`` (reached, backend, source seen, NAT).
* ``capture``, ``nftrace``, ``conntrack``, ``walk``, ``pcapng``, ``trace``: the packet walk.
* ``verify``: expectations from a topology's ``verify:`` section and the default matrix.
* ``graph``: the running topology as a picture or text.
"""
