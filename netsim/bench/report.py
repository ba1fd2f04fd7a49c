"""Write a run's results: JSON (everything), CSV (one row per summarised value), Markdown.

Pure functions of the result dictionary ``netsim.bench.run`` returns, so they are tested
without root. Ratios are taken against baselines from the same run: the raw veth (the
limit of this box) and, for each mode, its own lab's pod IPs with no Services at all.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from . import stats

CSV_FIELDS = ["variant", "metric", "path", "services", "position", "streams", "field",
              "n", "median", "ci_low", "ci_high", "min", "max", "mean"]
PATH_NAMES = {"raw-veth": "raw veth (two namespaces)", "raw-veth-uml": "raw veth in the UML guest", "pod-same-node": "pod IP, same node",
              "pod-cross-node": "pod IP, other node", "clusterip-same-node": "ClusterIP, backend on the same node",
              "clusterip-cross-node": "ClusterIP, backend on the other node"}
POSITION_MEANING = {
    "iptables": "rule order in KUBE-SERVICES (netsim sorts it by service-port name): `first` matches the "
                "first rule, `last` walks N synthetic Services' rules first",
    "nftables": "none for the lookup: the `service-ips` verdict map is a hash lookup by address, port and protocol",
    "ipvs": "none for the lookup: one `KUBE-CLUSTER-IP` ipset match, then IPVS's hash table of virtual servers",
}


ANCHORS = [
    "Published: the Kubernetes blog on nftables mode (KubeCon NA 2024 data) shows iptables mode adding "
    "about 49 / 63 / 274 µs (p50) to a connection's first packet at 5,000 / 10,000 / 30,000 Services "
    "(≈ 18 ns per rule walked), nftables flat at about iptables' p01; Tigera's comparison sees the "
    "iptables/IPVS difference only beyond about 1,000 Services and only without keep-alive. On this box, "
    "built by hand (box-baselines): connect p50 to the Service matched last 12 / 12 / 41 / 97 µs with "
    "iptables-legacy and 13 / 32 / 166 / 476 µs with iptables-nft at 1 / 1,000 / 10,000 / 30,000 "
    "Services, nft's verdict map flat at 10–13 µs, UML IPVS flat at 52–59 µs.",
    "Our connect loop is Python: its fixed overhead (≈ 15–20 µs here) is in every value, so compare "
    "differences and ratios, not absolute microseconds, with those figures.",
]


def rows(result: dict) -> list[dict]:
    """One CSV row per (measurement, summarised field)."""
    out = []
    for m in result["measurements"]:
        for f, s in m["summary"].items():
            out.append({"variant": m["variant"] or "", "metric": m["metric"], "path": m["path"],
                        "services": "" if m["services"] is None else m["services"],
                        "position": m["position"] or "", "streams": m["streams"] or "", "field": f,
                        **{k: s[k] for k in CSV_FIELDS[7:]}})
    return out


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows(result):
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def find(result: dict, **want) -> dict | None:
    """The one measurement whose keys equal ``want`` (unmentioned keys: any)."""
    for m in result["measurements"]:
        if all(m.get(k) == v for k, v in want.items()):
            return m
    return None


def values(m: dict | None, field: str) -> list[float]:
    return [r[field] for r in m["repetitions"]] if m else []


def fmt(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    """``12.3 [11.9–13.0]``: median and its bootstrap interval."""
    if not s:
        return "–"
    return (f"{s['median'] * scale:.{digits}f} [{s['ci_low'] * scale:.{digits}f}–"
            f"{s['ci_high'] * scale:.{digits}f}]")


def fmt_ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "–"
    r = stats.ratio(a, b)
    return f"{r['ratio']:.2f} [{r['ci_low']:.2f}–{r['ci_high']:.2f}]"


def raw_path(variant: str | None) -> str:
    """The raw veth measured on the variant's kernel: variants run in UML end in ``@uml``."""
    return "raw-veth-uml" if variant and variant.endswith("@uml") else "raw-veth"


def service_counts(result: dict, variant: str) -> list[int]:
    return sorted({m["services"] for m in result["measurements"]
                   if m["variant"] == variant and m["metric"] == "connect" and m["services"]})


def ran(result: dict) -> list[dict]:
    return [v for v in result["variants"] if not v.get("skipped")]


def markdown(result: dict, plots: list[str] = ()) -> str:
    env, prof = result["environment"], result["profile"]
    L = [f"# kube-proxy modes on this machine ({prof['name']} profile)", ""]
    guest = env.get("uml_guest")
    L += [f"Run {env['date']}, {env['seconds']:.0f} s; kernel {env['kernel']} ({env['kernel_kind']}), "
          f"{env['cores']} cores ({env['cpu']}), load average {env['loadavg_start'][0]:.1f} at the start and "
          f"{env['loadavg_end'][0]:.1f} at the end. Tools: {env['iperf3']}; {env['iptables_legacy']}; "
          f"{env['iptables_nft']}; {env['nft']}."
          + (f" Variants marked `@uml` ran in a user-mode Linux guest: kernel {guest['kernel']}, "
             f"{guest['cores']} core, compared with the raw veth measured inside that guest." if guest else ""), ""]
    L += ["Values are medians over repetitions with a 95 % bootstrap interval in brackets "
          f"(connect: {prof['repeat']} repetitions of up to {prof['connections']} connections or "
          f"{prof['connect_seconds']:g} s, after {prof['connect_warmup']} unrecorded; iperf3: "
          f"{prof['iperf_repeat']} × {prof['iperf_seconds']:g} s after {prof['iperf_omit']} s omitted). "
          "N counts the synthetic Services (2 endpoints each) loaded besides the four target Services. "
          "Ratios are to the baselines measured in the same run.", ""]
    for p in plots:
        L += [f"![{p}]({p})", ""]

    L += ["## Variants", "", "| variant | proxy mode | iptables back end | kernel | where first/last matters | notes |",
          "|---|---|---|---|---|---|"]
    for v in result["variants"]:
        note = v.get("skipped", "")
        skipped = v.get("skipped_services", [])
        if v.get("large") and v["large"]["services"] not in skipped:
            lg = v["large"]
            note += (f"N={lg['services']} {'run' if lg['run'] else 'skipped'} (full sync predicted "
                     f"{lg['predicted_full_sync_s']:.0f} s)")
        if skipped:
            note += " N=" + ", ".join(f"{n:,}" for n in skipped) + " skipped (the run's deadline)"
        L.append(f"| {v['variant']} | {v['mode']} | {v['iptables_backend']} | {v.get('kernel_kind', '–')} | "
                 f"{POSITION_MEANING.get(v['mode'], '')} | {note.strip() or '–'} |")
    L.append("")

    # connect latency
    L += ["## New connections: connect latency (µs) and rate", "",
          "ClusterIP with the backend on the client's node; `last` is the target matched after every "
          "synthetic Service in iptables mode. Ratio: p50 to the same lab's pod IP with no Services, "
          "and to the raw veth.", "",
          "| variant | N | first p50 | last p50 | last p90 | last p99 | last, other node p50 | pod IP p50 | "
          "rate, last (conn/s) | last ÷ pod IP, no Services | last ÷ raw veth |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in ran(result):
        name = v["variant"]
        raw_c = find(result, variant=None, metric="connect", path=raw_path(name))
        base = find(result, variant=name, metric="connect", path="pod-same-node", services=0)
        if base:
            L.append(f"| {name} | no Services | – | – | – | – | – | {fmt(base['summary']['p50_us'])} | "
                     f"{fmt(base['summary']['rate_per_s'], digits=0)} | 1 | "
                     f"{fmt_ratio(values(base, 'p50_us'), values(raw_c, 'p50_us'))} |")
        for n in service_counts(result, name):
            first = find(result, variant=name, metric="connect", path="clusterip-same-node", services=n, position="first")
            last = find(result, variant=name, metric="connect", path="clusterip-same-node", services=n, position="last")
            far = find(result, variant=name, metric="connect", path="clusterip-cross-node", services=n, position="last")
            pod = find(result, variant=name, metric="connect", path="pod-same-node", services=n)
            s = (lambda m, f: m["summary"].get(f) if m else None)
            L.append(f"| {name} | {n:,} | {fmt(s(first, 'p50_us'))} | {fmt(s(last, 'p50_us'))} | "
                     f"{fmt(s(last, 'p90_us'))} | {fmt(s(last, 'p99_us'))} | {fmt(s(far, 'p50_us'))} | "
                     f"{fmt(s(pod, 'p50_us'))} | {fmt(s(last, 'rate_per_s'), digits=0)} | "
                     f"{fmt_ratio(values(last, 'p50_us'), values(base, 'p50_us'))} | "
                     f"{fmt_ratio(values(last, 'p50_us'), values(raw_c, 'p50_us'))} |")
    for path in ("raw-veth", "raw-veth-uml"):
        raw_c = find(result, variant=None, metric="connect", path=path)
        if raw_c:
            L.append(f"| {PATH_NAMES[path]} | – | – | – | – | – | – | {fmt(raw_c['summary']['p50_us'])} | "
                     f"{fmt(raw_c['summary']['rate_per_s'], digits=0)} | – | 1 |")
    L.append("")

    # throughput
    L += ["## Throughput (iperf3 TCP, Gbit/s)", "",
          "At the largest N each variant ran, target matched last; ratio to the raw veth with the same "
          "number of streams.", "",
          "| variant | path | N | 1 stream | ÷ raw veth | parallel | ÷ raw veth |", "|---|---|---|---|---|---|---|"]
    par = prof["parallel_streams"]
    for path in ("raw-veth", "raw-veth-uml"):
        raw1 = find(result, variant=None, metric="throughput", path=path, streams=1)
        rawp = find(result, variant=None, metric="throughput", path=path, streams=par)
        if raw1:
            L.append(f"| – | {PATH_NAMES[path]} | – | {fmt(raw1['summary']['gbit_s'])} | 1 | "
                     f"{fmt(rawp['summary']['gbit_s']) if rawp else '–'} | 1 |")
    for v in ran(result):
        name = v["variant"]
        raw1 = find(result, variant=None, metric="throughput", path=raw_path(name), streams=1)
        rawp = find(result, variant=None, metric="throughput", path=raw_path(name), streams=par)
        ns = service_counts(result, name)
        cells = [("pod-same-node", 0, None), ("pod-cross-node", 0, None)]
        if ns:
            cells += [("clusterip-same-node", ns[-1], "last"), ("clusterip-cross-node", ns[-1], "last")]
        for path, n, pos in cells:
            one = find(result, variant=name, metric="throughput", path=path, services=n, position=pos, streams=1)
            many = find(result, variant=name, metric="throughput", path=path, services=n, position=pos, streams=par)
            if not one:
                continue
            L.append(f"| {name} | {PATH_NAMES[path]} | {n:,} | {fmt(one['summary']['gbit_s'])} | "
                     f"{fmt_ratio(values(one, 'gbit_s'), values(raw1, 'gbit_s'))} | "
                     f"{fmt(many['summary']['gbit_s']) if many else '–'} | "
                     f"{fmt_ratio(values(many, 'gbit_s'), values(rawp, 'gbit_s'))} |")
    L.append("")

    # programming
    L += ["## Rule programming (ms)", "",
          "Backend: the mode's kernel programmer alone in a throw-away namespace (full sync from empty; "
          "one Service gains an endpoint with N loaded). Agents: one Service changed in the lab, from the "
          "registry write until both nodes' agents have it in the kernel (minSyncPeriod 0).", "",
          "| variant | N | rules | full sync | one Service changed | one changed, through the agents | "
          "loading N into the lab |", "|---|---|---|---|---|---|---|"]
    for v in ran(result):
        name = v["variant"]
        for n in service_counts(result, name):
            prog = find(result, variant=name, metric="programming", services=n)
            net = find(result, variant=name, metric="network_programming", services=n)
            load = find(result, variant=name, metric="lab_load", services=n)
            rules = prog["repetitions"][0]["rules"] if prog and prog["repetitions"] else "–"
            L.append(f"| {name} | {n:,} | {rules:,} | {fmt(prog and prog['summary'].get('full_sync_s'), 1000)} | "
                     f"{fmt(prog and prog['summary'].get('one_changed_s'), 1000)} | "
                     f"{fmt(net and net['summary'].get('seconds'), 1000)} | "
                     f"{fmt(load and load['summary'].get('seconds'), 1000, 0)} |")
    L.append("")

    L += ["## Beside the published figures", "",
          "The cost of walking the rules: `last` minus `first` (connect p50, backend on the same node), "
          "and that difference per synthetic Service (one KUBE-SERVICES rule each in iptables mode).", "",
          "| variant | N | last − first (µs) | per Service (ns) |", "|---|---|---|---|"]
    for v in ran(result):
        name = v["variant"]
        for n in service_counts(result, name):
            first = find(result, variant=name, metric="connect", path="clusterip-same-node", services=n, position="first")
            last = find(result, variant=name, metric="connect", path="clusterip-same-node", services=n, position="last")
            if first and last:
                d = last["summary"]["p50_us"]["median"] - first["summary"]["p50_us"]["median"]
                per = f"{d * 1000 / n:+.0f}" if n >= 100 else "–"       # at small N noise is all there is
                L.append(f"| {name} | {n:,} | {d:+.1f} | {per} |")
    L += ["", *ANCHORS, ""]
    L += explanations(result)
    L += ["## Sysctls in the lab nodes", "", "| variant | " + " | ".join(_sysctl_names(result)) + " |",
          "|---|" + "---|" * len(_sysctl_names(result))]
    for v in ran(result):
        sc = v.get("sysctls", {})
        L.append(f"| {v['variant']} | " + " | ".join(str(sc.get(k) if sc.get(k) is not None else "–").replace("\t", " ")
                                                   for k in _sysctl_names(result)) + " |")
    L.append("")
    return "\n".join(L)


def _p50(result: dict, variant: str, n: int, path: str, position: str | None) -> float | None:
    m = find(result, variant=variant, metric="connect", path=path, services=n, position=position)
    return m["summary"]["p50_us"]["median"] if m else None


def _full_sync(result: dict, variant: str, n: int) -> float | None:
    m = find(result, variant=variant, metric="programming", path="backend", services=n)
    return m["summary"]["full_sync_s"]["median"] if m and "full_sync_s" in m["summary"] else None


def explanations(result: dict) -> list[str]:
    """Where this run differs from the published figures, and why: each point is written
    only when the variants it is about ran, with this run's own numbers."""
    names = {v["variant"] for v in ran(result)}
    out = []

    def largest(variant: str, at_least: int) -> int | None:
        ns = service_counts(result, variant) if variant in names else []
        return ns[-1] if ns and ns[-1] >= at_least else None

    def last_minus_first(variant: str, n: int) -> float | None:
        first = _p50(result, variant, n, "clusterip-same-node", "first")
        last = _p50(result, variant, n, "clusterip-same-node", "last")
        return last - first if first is not None and last is not None else None

    parts = [f"{v} {last_minus_first(v, n) * 1000 / n:.0f} ns per Service at N = {n:,}"
             for v in ("iptables-legacy", "iptables-nft")
             if (n := largest(v, 1000)) and last_minus_first(v, n) is not None]
    if parts:
        out.append("- **Cost per Service walked** (" + "; ".join(parts) + "; published ≈ 18 ns). The published "
                   "figure comes from clusters on the iptables-nft back end (the default of current distributions), "
                   "which runs each rule as nf_tables bytecode; iptables-legacy walks x_tables' compact rule blob "
                   "several times faster. Same shape, different slope.")
    cross = next(((v, n) for v in ("iptables-nft", "iptables-legacy") if (n := largest(v, 1000))), None)
    if cross:
        v, n = cross
        same, other = _p50(result, v, n, "clusterip-same-node", "last"), _p50(result, v, n, "clusterip-cross-node", "last")
        if same and other:
            out.append(f"- **Across nodes the walk is paid several times** ({v}, N = {n:,}: {other:.0f} µs to the other "
                       f"node's backend against {same:.0f} µs on the same node). flannel's VXLAN takes the outer UDP source "
                       "port from the inner flow's hash, so each new connection opens new outer UDP flows, whose first "
                       "packets walk the nat chains on the sender (OUTPUT) and the receiver (PREROUTING) too. The "
                       "published figures are for one node's first packet.")
    slow = [(v, n, t) for v in ("iptables-nft", "nftables")
            if (n := largest(v, 10000)) and (t := _full_sync(result, v, n))]
    if slow:
        out.append("- **Full syncs are slow at scale with nf_tables back ends** (" + "; ".join(
            f"{v} {t:.1f} s at N = {n:,}" for v, n, t in slow) + "). iptables-nft-restore 1.8.9 with `--noflush` "
            "(which kube-proxy always uses) grows quadratically with the number of chains; `nft -f` 1.0.6 loading "
            "tens of thousands of chains in one transaction is the collapse upstream reports in kubernetes issue "
            "135639. Single-Service changes stay small in both, which is what a running cluster mostly does.")
    if any(v.endswith("@uml") for v in names):
        raw = find(result, variant=None, metric="connect", path="raw-veth-uml")
        raw_p50 = raw["summary"]["p50_us"]["median"] if raw else None
        ipvs = service_counts(result, "ipvs@uml") if "ipvs@uml" in names else []
        sync = _full_sync(result, "ipvs@uml", ipvs[-1]) if ipvs else None
        diffs = [(n, d) for n in ipvs if (d := last_minus_first("ipvs@uml", n)) is not None]
        out.append("- **IPVS runs in a user-mode Linux guest** (this kernel has no ip_vs), where every syscall and "
                   "page fault traps to the host and one CPU runs client, listener and kernel alike: absolute "
                   "latencies are several times the host's, and about 1 % of connections wait for the next tick "
                   "of the guest's 100 Hz clock (the p99 near 10 ms)"
                   + (f". The guest's raw veth (connect p50 {raw_p50:.0f} µs) uses a plain Python accept loop as its "
                      "listener, which on that one CPU runs inside the timed window more often than the pods' "
                      "server does, so ratios to it fall below 1" if raw_p50 else "")
                   + ". Compare `ipvs@uml` with `iptables-legacy@uml` and with the guest's raw veth, not with the "
                   "host rows; what should carry over is the shape, `last` − `first` not growing with N"
                   + (" (here " + " / ".join(f"{d:+.0f}" for _, d in diffs) + " µs at N = "
                      + " / ".join(f"{n:,}" for n, _ in diffs) + ")" if diffs else "") + "."
                   + (f" A full IPVS sync of {ipvs[-1]:,} Services took {sync:.1f} s in the guest (virtual servers, "
                      "real servers and kube-ipvs0 addresses go in netlink batches; the ipsets in one `ipset restore`)."
                      if sync else ""))
    if out:
        return ["## Where it differs from the published figures, and why", "", *out, ""]
    return []


def _sysctl_names(result: dict) -> list[str]:
    names: list[str] = []
    for v in result["variants"]:
        for k in v.get("sysctls", {}):
            if k not in names:
                names.append(k)
    return names


def write(result: dict, out: Path, plots: bool = True) -> list[Path]:
    """Write results.json, results.csv, the plots and summary.md into ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.csv"]
    files[0].write_text(json.dumps(result, indent=1))
    files[1].write_text(to_csv(result))
    names: list[str] = []
    if plots:
        from .plots import plot_all
        made = plot_all(result, out)
        files += made
        names = [p.name for p in made if p.suffix == ".png"]
    md = out / "summary.md"
    md.write_text(markdown(result, names))
    files.append(md)
    return files
