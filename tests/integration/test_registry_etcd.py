"""Our etcd client and the real etcdctl see the same flannel keys (no root needed)."""
from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from netsim.registry import EtcdRegistry, Unavailable, open_registry
from netsim.registry.flannel import (CONFIG_KEY, SUBNETS_PREFIX, FIRST_FREE, LeaseAttrs,
                                     NetworkConfig, acquire_lease, read_config, write_config)
from netsim.registry.server import ETCD_BINARY, start_etcd

ETCDCTL = "/usr/bin/etcdctl"
pytestmark = pytest.mark.skipif(not (os.access(ETCD_BINARY, os.X_OK) and os.access(ETCDCTL, os.X_OK)),
                                reason="etcd-server / etcd-client not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_etcd(str(tmp_path_factory.mktemp("etcd")), listen=f"127.0.0.1:{free_port()}")
    yield srv
    srv.stop()


def etcdctl(server, *args: str) -> str:
    endpoint = server.url.replace("etcd+unix://", "unix://")
    out = subprocess.run([ETCDCTL, f"--endpoints={endpoint}", *args], env={**os.environ, "ETCDCTL_API": "3"},
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout


def test_etcdctl_sees_what_our_client_wrote(server):
    config = NetworkConfig.create("10.244.0.0/16")
    attrs = LeaseAttrs.vxlan("192.168.64.3", "c6:d2:32:6f:8f:44")
    with open_registry(server.url) as reg:
        write_config(reg, config)
        lease = acquire_lease(reg, config, "192.168.64.3", attrs, ttl=600, rng=FIRST_FREE)
    lines = etcdctl(server, "get", "--prefix", "/coreos.com/network/").splitlines()
    assert lines == [CONFIG_KEY, config.to_json(), lease.key, attrs.to_json()]
    assert lease.key == SUBNETS_PREFIX + "10.244.1.0-24"
    ttl = etcdctl(server, "lease", "timetolive", "--keys", format(lease.lease_id, "x"))
    assert "granted with TTL(600s)" in ttl and lease.key in ttl


def test_our_client_reads_what_etcdctl_wrote_over_tcp(server):
    etcdctl(server, "put", CONFIG_KEY, '{"Network":"10.50.0.0/16","Backend":{"Type":"vxlan","VNI":4}}')
    tcp = [u for u in server.urls if u.startswith("etcd+http://")][0]
    with open_registry(tcp) as reg:
        config = read_config(reg)
    assert (str(config.network), config.backend.vni) == ("10.50.0.0/16", 4)


def test_stopped_server_is_unavailable_to_calls_and_watches(tmp_path):
    srv = start_etcd(str(tmp_path))
    reg = EtcdRegistry(srv.url, watch_reconnect_timeout=0.5)
    watcher = reg.watch("/gone/")
    reg.put("/gone/a", "1")
    assert watcher.next_batch(5).events[0].kv.value == "1"
    srv.stop()
    assert not srv.alive() and not os.path.exists(srv.data_dir)
    endpoint = re.escape(srv.url.replace("etcd+unix://", "unix://"))
    with pytest.raises(Unavailable, match=endpoint):
        reg.get("/gone/a")
    with pytest.raises(Unavailable, match="watch stream lost"):
        watcher.next_batch(10)
    reg.close()
