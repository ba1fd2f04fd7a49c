"""Benchmark profiles: how many Services, repetitions and seconds each measurement gets.

Every load generator is bounded twice, by a count and by time; a profile's totals are
what keeps a run inside its budget (quick: under 5 minutes, full: under 45).
"""
from __future__ import annotations

from dataclasses import dataclass

VARIANTS = {                     # name → (proxy mode, iptables backend of the lab)
    "iptables-legacy": ("iptables", "legacy"),
    "iptables-nft": ("iptables", "nft"),
    "nftables": ("nftables", "nft"),
    "ipvs": ("ipvs", "legacy"),  # runs in UML on kernels without IPVS, where nf_tables is missing
}


@dataclass(frozen=True)
class Profile:
    name: str
    services: tuple[int, ...]          # N synthetic Services, ascending
    large: int | None                  # an extra N run only where it fits (see large_budget_s)
    large_budget_s: float              # predicted full-sync time at ``large`` must stay under this
    repeat: int                        # repetitions per connect measurement
    iperf_repeat: int                  # repetitions per throughput measurement
    connections: int                   # per connect repetition (bounded by count...)
    connect_seconds: float             # ...and by time)
    connect_warmup: int                # connections before each repetition, not recorded
    iperf_seconds: float
    iperf_omit: int                    # iperf3 --omit: warm-up seconds not counted
    parallel_streams: int
    programming_repeat: int            # Backend full sync + one change, in a throw-away netns
    programming_budget_s: float        # ...stop repeating after this many seconds (at least one)
    network_repeat: int                # one Service changed through the lab's agents
    deadline_s: float                  # past this, remaining Service counts are skipped
    uml_services: tuple[int, ...] = (1, 1000)   # N for variants run in the UML guest (~4× slower)
    uml_reserve_s: float = 0           # seconds of the deadline kept for the UML guest
    variants: tuple[str, ...] = tuple(VARIANTS)     # ipvs runs in UML when this kernel lacks IPVS


PROFILES = {
    "quick": Profile("quick", services=(1, 100, 1000), large=None, large_budget_s=0, repeat=3, iperf_repeat=1,
                     connections=400, connect_seconds=1.0, connect_warmup=50,
                     iperf_seconds=1, iperf_omit=0, parallel_streams=4,
                     programming_repeat=2, programming_budget_s=10, network_repeat=2, deadline_s=240,
                     variants=("iptables-legacy", "iptables-nft", "nftables")),   # UML would not fit 5 min
    "full": Profile("full", services=(1, 100, 1000, 10000), large=30000, large_budget_s=90, repeat=5, iperf_repeat=3,
                    connections=2000, connect_seconds=2.0, connect_warmup=200,
                    iperf_seconds=1, iperf_omit=1, parallel_streams=4,
                    programming_repeat=5, programming_budget_s=60, network_repeat=5, deadline_s=2450,
                    uml_services=(1, 100, 1000, 10000), uml_reserve_s=1150),
}
