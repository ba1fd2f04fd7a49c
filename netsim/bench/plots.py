"""matplotlib plots of a run, PNG and SVG: connect latency vs Services, throughput per path,
rule programming vs Services. Error bars are the bootstrap intervals of the medians."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")                     # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import find, ran, service_counts  # noqa: E402

COLORS = {"iptables-legacy": "tab:blue", "iptables-nft": "tab:red", "nftables": "tab:green", "ipvs": "tab:purple"}


def _err(s: dict, scale: float = 1.0) -> tuple[float, list[float]]:
    m = s["median"] * scale
    return m, [m - s["ci_low"] * scale, s["ci_high"] * scale - m]


def _save(fig, out: Path, stem: str) -> list[Path]:
    files = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(files[0], dpi=120)
    fig.savefig(files[1])
    plt.close(fig)
    return files


def color(variant: str) -> str | None:
    return COLORS.get(variant.split("@")[0])


def connect_latency(result: dict, out: Path, uml: bool = False) -> list[Path]:
    variants = [v for v in ran(result) if v["variant"].endswith("@uml") == uml]
    if not variants:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, field, title in ((axes[0], "p50_us", "median"), (axes[1], "p99_us", "99th percentile")):
        for v in variants:
            name = v["variant"]
            for pos, style in (("last", "-"), ("first", ":")):
                xs, ys, es = [], [], [[], []]
                for n in service_counts(result, name):
                    m = find(result, variant=name, metric="connect", path="clusterip-same-node", services=n, position=pos)
                    if m and field in m["summary"]:
                        y, e = _err(m["summary"][field])
                        xs.append(n), ys.append(y), es[0].append(e[0]), es[1].append(e[1])
                if xs:
                    ax.errorbar(xs, ys, yerr=es, fmt=style + "o", ms=4, capsize=3,
                                color=color(name), label=f"{name}, target {pos}")
            base = find(result, variant=name, metric="connect", path="pod-same-node", services=0)
            if base and field in base["summary"]:
                ax.axhline(base["summary"][field]["median"], color=color(name), lw=0.8, ls="--", alpha=0.6)
        raw = find(result, variant=None, metric="connect", path="raw-veth-uml" if uml else "raw-veth")
        if raw and field in raw["summary"]:
            ax.axhline(raw["summary"][field]["median"], color="black", lw=1, ls="-.", label="raw veth")
        ax.set_xscale("log")
        if field == "p99_us":
            ax.set_yscale("log")                 # tails span decades on a shared machine
        ax.set_xlabel("synthetic Services (2 endpoints each)")
        ax.set_ylabel(f"connect {title} (µs)")
        ax.set_title(f"ClusterIP connect latency, {title}" + (" (UML guest)" if uml else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("dashed lines: the same lab's pod IP with no Services", fontsize=8, y=0.02)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, out, "connect_latency_uml" if uml else "connect_latency")


def throughput(result: dict, out: Path, uml: bool = False) -> list[Path]:
    par = result["profile"]["parallel_streams"]
    variants = [v for v in ran(result) if v["variant"].endswith("@uml") == uml]
    if not variants:
        return []
    paths = ["pod-same-node", "clusterip-same-node", "pod-cross-node", "clusterip-cross-node"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, streams in zip(axes, (1, par)):
        raw = find(result, variant=None, metric="throughput", path="raw-veth-uml" if uml else "raw-veth",
                   streams=streams)
        labels = ["raw veth", "pod IP\nsame node", "ClusterIP\nsame node", "pod IP\nother node",
                  "ClusterIP\nother node"]
        width = 0.8 / max(1, len(variants))
        if raw:
            y, e = _err(raw["summary"]["gbit_s"])
            ax.bar([0], [y], 0.6, yerr=[[e[0]], [e[1]]], color="gray", capsize=3)
        for i, v in enumerate(variants):
            name = v["variant"]
            ns = service_counts(result, name)
            xs, ys, es = [], [], [[], []]
            for j, path in enumerate(paths, start=1):
                n, pos = (0, None) if path.startswith("pod") else ((ns[-1], "last") if ns else (None, None))
                m = find(result, variant=name, metric="throughput", path=path, services=n, position=pos, streams=streams)
                if m:
                    y, e = _err(m["summary"]["gbit_s"])
                    xs.append(j - 0.4 + width * (i + 0.5)), ys.append(y), es[0].append(e[0]), es[1].append(e[1])
            ax.bar(xs, ys, width, yerr=es, capsize=2, color=color(name), label=name)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"iperf3, {streams} stream{'s' if streams > 1 else ''}" + (" (UML guest)" if uml else ""))
        ax.set_ylabel("Gbit/s")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("pod IPs with no Services; ClusterIP at the largest N, target matched last", fontsize=8, y=0.02)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, out, "throughput_uml" if uml else "throughput")


def programming(result: dict, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, field, title in ((axes[0], "full_sync_s", "full sync"), (axes[1], "one_changed_s", "one Service changed")):
        for v in ran(result):
            name = v["variant"]
            xs, ys, es = [], [], [[], []]
            for n in service_counts(result, name):
                m = find(result, variant=name, metric="programming", services=n)
                if m and field in m["summary"]:
                    y, e = _err(m["summary"][field], 1000)
                    xs.append(n), ys.append(y), es[0].append(e[0]), es[1].append(e[1])
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt="--o" if name.endswith("@uml") else "-o", ms=4, capsize=3,
                            color=color(name), label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("synthetic Services (2 endpoints each)")
        ax.set_ylabel("ms")
        ax.set_title(f"rule programming: {title} (mode's Backend)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "programming")


def plot_all(result: dict, out: Path) -> list[Path]:
    return (connect_latency(result, out) + throughput(result, out) + programming(result, out)
            + connect_latency(result, out, uml=True) + throughput(result, out, uml=True))
