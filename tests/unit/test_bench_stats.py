"""netsim bench without root: statistics, result files, the connect loop on loopback, the
target Services' places in KUBE-SERVICES, the benchmark lab's topology."""
from __future__ import annotations

import csv
import io
import json
import socket
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from netsim.bench import connect, report, stats
from netsim.bench.lab import TARGET_IPS, BenchLab, Pod, topology
from netsim.bench.profiles import PROFILES, VARIANTS
from netsim.bench.programming import one_changed
from netsim.bench.run import CONNECT_FIELDS, Measurement
from netsim.proxy.backend import port_key
from netsim.proxy.iptables import render
from netsim.proxy.model import NodeContext
from netsim.proxy.synthetic import synthetic_ports
from netsim.topology import load


# -- statistics -----------------------------------------------------------------------------

def test_percentiles_of_a_known_sample():
    p = stats.percentiles(range(1, 101))
    assert p["p50"] == pytest.approx(50.5)
    assert p["p90"] == pytest.approx(90.1)
    assert p["p99"] == pytest.approx(99.01)


def test_percentiles_refuse_an_empty_sample():
    with pytest.raises(ValueError):
        stats.percentiles([])


def test_bootstrap_interval_holds_the_median_and_is_reproducible():
    rng = np.random.default_rng(1)
    values = rng.normal(100, 5, size=9)
    low, high = stats.bootstrap_ci(values)
    assert low <= np.median(values) <= high
    assert (low, high) == stats.bootstrap_ci(values)          # fixed seed: same interval
    assert low >= values.min() and high <= values.max()       # a median never leaves the sample's range


def test_bootstrap_interval_narrows_with_less_spread():
    wide = stats.bootstrap_ci([80, 90, 100, 110, 120])
    narrow = stats.bootstrap_ci([98, 99, 100, 101, 102])
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_one_value_has_a_zero_width_interval():
    assert stats.bootstrap_ci([7.0]) == (7.0, 7.0)
    s = stats.summarize([7.0])
    assert (s["n"], s["median"], s["ci_low"], s["ci_high"]) == (1, 7.0, 7.0, 7.0)


def test_summary_fields():
    s = stats.summarize([3, 1, 2, 10])
    assert s["n"] == 4 and s["median"] == 2.5 and s["min"] == 1 and s["max"] == 10 and s["mean"] == 4


def test_ratio_of_medians_with_interval():
    r = stats.ratio([20, 22, 18], [10, 11, 9])
    assert r["ratio"] == pytest.approx(2.0)
    assert r["ci_low"] <= 2.0 <= r["ci_high"]


def test_connect_repetition_in_microseconds_and_per_second():
    rep = stats.connect_repetition([10_000, 20_000, 30_000, 40_000], seconds=0.5, errors=1)
    assert rep["p50_us"] == pytest.approx(25.0)
    assert rep["count"] == 4 and rep["errors"] == 1
    assert rep["rate_per_s"] == pytest.approx(8.0)
    assert rep["mean_us"] == pytest.approx(25.0)


# -- the connect loop, on loopback ------------------------------------------------------------

@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t = threading.Thread(target=connect.serve, args=(("127.0.0.1", port), 5.0), daemon=True)
    t.start()
    probe = None
    for _ in range(200):                           # until the listener accepts
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=0.1)
            break
        except OSError:
            threading.Event().wait(0.01)
    assert probe is not None
    probe.close()
    return port


def test_connect_loop_stops_at_its_count(listener):
    out = connect.loop(("127.0.0.1", listener), count=50, seconds=10, warmup=5)
    assert len(out["latencies_ns"]) == 50
    assert out["errors"] == 0
    assert all(x > 0 for x in out["latencies_ns"])


def test_connect_loop_stops_at_its_time(listener):
    out = connect.loop(("127.0.0.1", listener), count=connect.MAX_COUNT * 10, seconds=0.2)
    assert out["seconds"] < 2.0                        # bounded by time, not by the huge count
    assert 0 < len(out["latencies_ns"]) <= connect.MAX_COUNT


def test_connect_loop_reports_refused_connections():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                          # nobody listens there
    out = connect.loop(("127.0.0.1", port), count=20, seconds=5)
    assert out["latencies_ns"] == [] and out["errors"] > 0


# -- what the benchmark loads -------------------------------------------------------------------

def fake_lab() -> BenchLab:
    pods = {"client": Pod("client", "n1", "10.244.1.2", "c"), "near": Pod("near", "n1", "10.244.1.3", "a"),
            "far": Pod("far", "n2", "10.244.2.2", "b")}
    return BenchLab("bz-x", "iptables", "legacy", pods, {"n1": "ns1", "n2": "ns2"})


def test_targets_sort_first_and_last_in_kube_services():
    lab = fake_lab()
    ports = lab.target_ports() + synthetic_ports(50, local_node="n1", namespace="bench")
    text = render(ports, NodeContext("n1", ("192.168.100.2",), "10.244.0.0/16")).text
    order = [line.split("--comment ")[1].split()[0].strip('"') for line in text.splitlines()
             if line.startswith("-A KUBE-SERVICES") and "cluster IP" in line]
    assert len(order) == 8 + 50                                 # 4 targets × 2 ports, 50 synthetic
    assert all(o.startswith("bench/aaa-") for o in order[:4])
    assert all(o.startswith("bench/zzz-") for o in order[-4:])
    assert all(o.startswith("bench/svc") for o in order[4:-4])


def test_targets_lead_to_the_pod_on_the_named_side():
    lab = fake_lab()
    ports = {(p.name, p.port_name): p for p in lab.target_ports()}
    assert ports[("aaa-near", "connect")].endpoints[0].ip == "10.244.1.3"
    assert ports[("zzz-far", "iperf")].endpoints[0].ip == "10.244.2.2"
    assert lab.target("first", "near") == TARGET_IPS["aaa-near"]
    assert lab.target("last", "far") == TARGET_IPS["zzz-far"]
    assert all(len(p.endpoints) == 1 for p in ports.values())


def test_bench_topology_is_valid_for_every_variant(tmp_path):
    for variant, (mode, ipt) in VARIANTS.items():
        f = tmp_path / f"{variant}.yaml"
        f.write_text(topology(f"bz-{variant}", mode, ipt))
        topo = load(str(f))
        assert topo.cluster.proxy_mode == mode and topo.cluster.iptables_backend == ipt
        assert [n.name for n in topo.nodes] == ["n1", "n2"]


def test_one_changed_adds_an_endpoint_to_one_service_only():
    ports = synthetic_ports(10)
    changed, key = one_changed(ports)
    diff = [(a, b) for a, b in zip(ports, changed) if a != b]
    assert len(diff) == 1
    old, new = diff[0]
    assert len(new.endpoints) == len(old.endpoints) + 1 and port_key(new) == key


def test_profiles_are_bounded():
    for p in PROFILES.values():
        assert p.connections <= connect.MAX_COUNT and p.connect_seconds <= connect.MAX_SECONDS
        assert list(p.services) == sorted(p.services)
        assert p.deadline_s < (300 if p.name == "quick" else 2700)


# -- result files --------------------------------------------------------------------------------

def fake_result(counts: tuple[int, ...] = (1, 100)) -> dict:
    """A run's result with made-up repetitions (two variants, N = ``counts``)."""
    ms: list[Measurement] = []

    def conn(variant, path, n, pos, base):
        m = Measurement(variant, "connect", path, services=n, position=pos,
                        repetitions=[stats.connect_repetition([int(base * 1000 * f)] * 10, 0.01) for f in (1, 1.1, 0.9)])
        m.summarize(CONNECT_FIELDS)
        ms.append(m)

    def thr(variant, path, n, pos, streams, g):
        m = Measurement(variant, "throughput", path, services=n, position=pos, streams=streams,
                        repetitions=[{"gbit_s": g * f} for f in (1, 1.05, 0.95)])
        m.summarize(["gbit_s"])
        ms.append(m)

    conn(None, "raw-veth", None, None, 10)
    thr(None, "raw-veth", None, None, 1, 40)
    thr(None, "raw-veth", None, None, 4, 60)
    for v, slope in (("iptables-legacy", 0.1), ("nftables", 0.0)):
        conn(v, "pod-same-node", 0, None, 20)
        conn(v, "pod-cross-node", 0, None, 40)
        for s in (1, 4):
            thr(v, "pod-same-node", 0, None, s, 30)
            thr(v, "pod-cross-node", 0, None, s, 20)
        for n in counts:
            for pos in ("first", "last"):
                conn(v, "clusterip-same-node", n, pos, 20 + (slope * n if pos == "last" else 0))
                conn(v, "clusterip-cross-node", n, pos, 45)
                for s in (1, 4):
                    thr(v, "clusterip-same-node", n, pos, s, 28)
                    thr(v, "clusterip-cross-node", n, pos, s, 18)
            conn(v, "pod-same-node", n, None, 20)
            prog = Measurement(v, "programming", "backend", services=n,
                               repetitions=[{"full_sync_s": 0.01 * n, "one_changed_s": 0.001, "rules": 8 * n}] * 2)
            prog.summarize(["full_sync_s", "one_changed_s"])
            net = Measurement(v, "network_programming", "agents", services=n, repetitions=[{"seconds": 0.03}])
            net.summarize(["seconds"])
            ms += [prog, net]
    env = {"date": "2026-01-01 00:00:00", "seconds": 100.0, "kernel": "6.18", "kernel_kind": "native",
           "cores": 2, "cpu": "test", "loadavg_start": [1.0, 1, 1], "loadavg_end": [1.0, 1, 1],
           "iperf3": "iperf 3.12", "iptables_legacy": "v1.8.9 (legacy)", "iptables_nft": "v1.8.9 (nf_tables)",
           "nft": "nftables v1.0.6"}
    variants = [{"variant": "iptables-legacy", "mode": "iptables", "iptables_backend": "legacy",
                 "kernel_kind": "native", "sysctls": {"net.ipv4.vs.conn_reuse_mode": None}},
                {"variant": "nftables", "mode": "nftables", "iptables_backend": "nft", "kernel_kind": "native",
                 "sysctls": {}},
                {"variant": "ipvs", "mode": "ipvs", "iptables_backend": "legacy", "skipped": "no IPVS here"}]
    return {"benchmark": "proxy_modes", "profile": asdict(PROFILES["quick"]), "environment": env,
            "variants": variants, "measurements": [asdict(m) for m in ms]}


def test_csv_has_one_row_per_summarised_value():
    result = fake_result()
    rows = list(csv.DictReader(io.StringIO(report.to_csv(result))))
    want = sum(len(m["summary"]) for m in result["measurements"])
    assert len(rows) == want
    raw = [r for r in rows if r["path"] == "raw-veth" and r["field"] == "p50_us"]
    assert len(raw) == 1 and raw[0]["variant"] == "" and float(raw[0]["median"]) == pytest.approx(10.0)
    assert set(rows[0]) == set(report.CSV_FIELDS)


def test_markdown_puts_ratios_to_the_baselines():
    md = report.markdown(fake_result())
    # iptables-legacy N=100, target last: 30 µs against the pod IP's 20 µs and the raw veth's 10 µs
    row = next(l for l in md.splitlines() if l.startswith("| iptables-legacy | 100 |") and "µs" not in l)
    assert "| 1.50 [" in row and "| 3.00 [" in row
    flat = next(l for l in md.splitlines() if l.startswith("| nftables | 100 |"))
    assert "| 1.00 [" in flat
    assert "no IPVS here" in md                                   # a skipped variant says why
    assert "conn_reuse_mode" in md                                # sysctls are recorded


def test_write_makes_json_csv_markdown_and_plots(tmp_path: Path):
    result = fake_result()
    files = report.write(result, tmp_path)
    names = {f.name for f in files}
    assert {"results.json", "results.csv", "summary.md", "connect_latency.png", "connect_latency.svg",
            "throughput.png", "throughput.svg", "programming.png", "programming.svg"} <= names
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "connect_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "throughput.svg").read_text()
    assert "![connect_latency.png](connect_latency.png)" in (tmp_path / "summary.md").read_text()


def test_predict_extrapolates_between_linear_and_quadratic():
    from netsim.bench.run import predict
    assert predict([(1000, 1.0), (10000, 10.0)], 30000) == pytest.approx(30.0)        # linear
    assert predict([(1000, 1.0), (10000, 100.0)], 30000) == pytest.approx(900.0)      # quadratic
    assert predict([(1000, 1.0), (10000, 1000.0)], 30000) == pytest.approx(9000.0)    # held at quadratic
    assert predict([(1000, 1.0), (10000, 1.0)], 30000) == pytest.approx(3.0)          # at least linear
    assert predict([(100, 2.0)], 1000) == pytest.approx(20.0)
    assert predict([(1, 0.08)], 1000) == pytest.approx(0.08)     # N=1 is fixed cost: no extrapolation


def test_uml_variants_compare_with_the_guests_raw_veth():
    assert report.raw_path("ipvs@uml") == "raw-veth-uml"
    assert report.raw_path("nftables") == "raw-veth" and report.raw_path(None) == "raw-veth"


def test_the_report_explains_differences_with_its_own_numbers():
    md = report.markdown(fake_result((1, 1000, 10000)))
    why = md[md.index("## Where it differs from the published figures, and why"):]
    # made-up slope: 0.1 µs more per Service for the target matched last = 100 ns per Service
    assert "iptables-legacy 100 ns per Service at N = 10,000" in why
    assert "nftables 100.0 s at N = 10,000" in why               # full sync 0.01 s × N
    assert "user-mode Linux" not in why                          # no variant ran in UML
    assert "iptables-nft" not in why.split("published ≈ 18 ns")[0]   # only variants that ran


def test_a_small_run_claims_no_differences():
    assert "## Where it differs" not in report.markdown(fake_result())
