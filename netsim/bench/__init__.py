"""``netsim bench``: kube-proxy modes compared on this machine's kernel.

One small lab per proxy mode (two nodes, a client pod, a backend pod on each node), N
synthetic Services published through the registry so the real node agents program them,
and in the same run the baselines this box sets (raw veth, pod IPs, no Services).
``run`` orchestrates; ``stats`` and ``report`` are pure (no root); ``connect`` and
``programming`` are the small programs that run inside the benchmark's namespaces.
"""
