"""Kernel feature detection, what a topology needs, and the host/UML decision (probes mocked)."""
from __future__ import annotations

import dataclasses
import gzip
import subprocess
from pathlib import Path

import pytest

from netsim.errors import KernelError
from netsim.kernel import commands, decide, features
from netsim.kernel.features import Features
from netsim.topology import load

REPO = Path(__file__).resolve().parents[2]
ALL = list(features.FEATURES)


@pytest.fixture(autouse=True)
def not_in_guest(monkeypatch):
    monkeypatch.delenv(decide.IN_GUEST_ENV, raising=False)


def topo(**cluster):
    t = load(str(REPO / "topologies" / "demo.yaml"))
    return dataclasses.replace(t, cluster=dataclasses.replace(t.cluster, **cluster))


def kernel(label, missing=()):
    return Features(label, {n: n not in missing for n in ALL}, "test")


THIS_HOST = kernel("host 6.18", missing=("ip_vs", "dummy", "netem", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_sh"))
UML = kernel("uml 6.1", missing=("nf_tables",))


def test_probe_output_parsed_per_feature_and_missing_lines_count_as_absent():
    have = features.parse_probe_output("veth 0\ndummy 1\nip_vs 2\ngarbage\n", ["veth", "dummy", "ip_vs", "netem"])
    assert have == {"veth": True, "dummy": False, "ip_vs": False, "netem": False}


def test_probe_script_runs_every_probe_and_reports_its_status(tmp_path):
    script = features.probe_script(["dummy", "ip_vs_sh"])
    assert "ip link add d0 type dummy" in script and "ipvsadm -A -t 10.0.0.2:84 -s sh" in script
    # every scheduler probe adds its own virtual server (the probes share one namespace)
    ports = [features.FEATURES[f"ip_vs_{s}"][2].split()[3] for s in features.IPVS_SCHEDULERS]
    assert len(set(ports)) == len(ports)
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool, rc in (("ip", 0), ("ipvsadm", 3)):
        (fake / tool).write_text(f"#!/bin/sh\nexit {rc}\n")
        (fake / tool).chmod(0o755)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={"PATH": f"{fake}:/usr/bin:/bin"}).stdout
    assert features.parse_probe_output(out, ["dummy", "ip_vs_sh"]) == {"dummy": True, "ip_vs_sh": False}


def test_host_features_use_the_probe_runner(monkeypatch):
    monkeypatch.setattr(features.os, "geteuid", lambda: 0)
    seen = []
    def runner(script):
        seen.append(script)
        return "veth 0\nip_vs 1\n"
    f = features.host_features(runner)
    assert seen and f.have["veth"] and not f.have["ip_vs"] and not f.have["dummy"]
    assert f.kernel.startswith("host ")


def test_host_features_without_root_are_not_probed(monkeypatch):
    monkeypatch.setattr(features.os, "geteuid", lambda: 1000)
    f = features.host_features(lambda s: pytest.fail("probed without root"))
    assert not any(f.have.values()) and "root" in f.detail


def test_uml_features_come_from_its_kernel_config(tmp_path):
    config = tmp_path / "config.gz"
    config.write_bytes(gzip.compress(b"CONFIG_IP_VS=m\nCONFIG_IP_VS_RR=m\nCONFIG_NF_TABLES=m\n"
                                     b"# CONFIG_NF_TABLES_IPV4 is not set\nCONFIG_DUMMY=y\nCONFIG_VETH=n\n"))
    (tmp_path / "modules" / "6.1.9").mkdir(parents=True)
    (tmp_path / "modules" / "6.1.9" / "modules.dep").write_text("")
    f = features.uml_features("/bin/true", config, tmp_path / "modules")
    assert f.kernel == "uml 6.1.9"
    assert f.have["ip_vs"] and f.have["ip_vs_rr"] and f.have["dummy"]
    assert not f.have["nf_tables"] and not f.have["veth"] and not f.have["ip_vs_sh"]


def test_uml_features_none_when_not_installed(tmp_path):
    assert features.uml_features("/bin/true", tmp_path / "config.gz", tmp_path / "no-modules") is None


def test_needs_follow_the_topology():
    base = {n.feature for n in features.needs(topo())}
    assert {"veth", "bridge", "vxlan", "br_netfilter", "nf_tables"} <= base and "ip_vs" not in base
    legacy_hostgw = {n.feature for n in features.needs(topo(iptables_backend="legacy", overlay="host-gw"))}
    assert "iptables_legacy" in legacy_hostgw and "nf_tables" not in legacy_hostgw and "vxlan" not in legacy_hostgw
    ipvs = {n.feature: n.why for n in features.needs(topo(proxy_mode="ipvs", iptables_backend="legacy"))}
    assert {"ip_vs", "dummy", "ipset", "ip_vs_rr"} <= set(ipvs) and ipvs["ip_vs"] == "proxyMode: ipvs"
    assert "nf_tables" in {n.feature for n in features.needs(topo(proxy_mode="nftables", iptables_backend="legacy"))}


def test_needs_the_scheduler_the_topology_names():
    t = topo(proxy_mode="ipvs")
    assert features.ipvs_scheduler(t) == "rr"
    named = type("Cluster", (), {**{f.name: getattr(t.cluster, f.name) for f in dataclasses.fields(t.cluster)},
                                 "ipvs_scheduler": "sh"})()
    with_sh = dataclasses.replace(t, cluster=named)
    assert features.ipvs_scheduler(with_sh) == "sh"
    assert "ip_vs_sh" in {n.feature for n in features.needs(with_sh)}


def test_auto_stays_on_a_host_that_has_everything():
    d = decide.decide("auto", features.needs(topo()), THIS_HOST, UML)
    assert d.kernel == "host" and "everything" in d.reason


def test_auto_moves_an_ipvs_topology_into_uml_and_says_why():
    d = decide.decide("auto", features.needs(topo(proxy_mode="ipvs", iptables_backend="legacy")), THIS_HOST, UML)
    assert d.kernel == "uml" and "IPVS (ip_vs)" in d.reason and "user-mode Linux" in d.reason


def test_uml_refuses_the_nft_backend_with_a_hint():
    with pytest.raises(KernelError, match="iptablesBackend: legacy"):
        decide.decide("uml", features.needs(topo()), THIS_HOST, UML)
    with pytest.raises(KernelError, match="nftables mode needs"):
        decide.decide("auto", features.needs(topo(proxy_mode="nftables", iptables_backend="legacy")),
                      kernel("host", missing=("nf_tables",)), UML)


def test_neither_kernel_works_says_what_to_install():
    with pytest.raises(KernelError, match="apt-get install user-mode-linux") as err:
        decide.decide("auto", features.needs(topo(proxy_mode="ipvs")), THIS_HOST, None)
    assert "IPVS (ip_vs)" in str(err.value)
    with pytest.raises(KernelError, match="apt-get install user-mode-linux"):
        decide.decide("uml", features.needs(topo(iptables_backend="legacy")), THIS_HOST, None)


def test_host_forced_without_ipvs_points_at_uml():
    with pytest.raises(KernelError, match="--kernel uml"):
        decide.decide("host", features.needs(topo(proxy_mode="ipvs")), THIS_HOST, UML)


def test_inside_the_guest_its_kernel_is_the_host(monkeypatch):
    monkeypatch.setenv(decide.IN_GUEST_ENV, "1")
    needs = features.needs(topo(proxy_mode="ipvs", iptables_backend="legacy"))
    assert decide.decide("auto", needs, UML, None).kernel == "host"
    with pytest.raises(KernelError, match="already inside"):
        decide.decide("uml", needs, UML, None)


def test_check_text_lists_features_needs_and_verdict():
    text, rc = commands.check_text(topo(proxy_mode="ipvs", iptables_backend="legacy"), THIS_HOST, UML)
    assert rc == 0 and "IPVS (ip_vs)" in text and "proxyMode: ipvs" in text and "UML kernel" in text
    text, rc = commands.check_text(topo(proxy_mode="ipvs"), THIS_HOST, None)
    assert rc == 1 and "apt-get install user-mode-linux" in text


def test_up_on_the_host_kernel_without_ipvs_says_how_to_run_it(monkeypatch, capsys):
    from netsim import cli
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(features, "host_features", lambda: THIS_HOST)
    monkeypatch.setattr(features, "uml_features", lambda: UML)
    monkeypatch.setattr(features, "needs", lambda t: [features.Need("ip_vs", "proxyMode: ipvs")])
    assert cli.main(["up", str(REPO / "topologies" / "demo.yaml"), "--kernel", "host"]) == 1
    err = capsys.readouterr().err
    assert "has no IPVS (ip_vs) [proxyMode: ipvs]" in err and "--kernel uml" in err
