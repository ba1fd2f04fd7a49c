"""The agent finds each proxy mode's kernel backend through netsim.proxy.backend alone."""
from __future__ import annotations

import pytest

from netsim.agents.kubeproxy import parser
from netsim.proxy import backend
from netsim.proxy.model import NodeContext

NODE = NodeContext("test-node", ("192.168.0.2",), "10.0.0.0/8", service_cidrs=("172.30.0.0/16",))


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_each_mode_has_a_backend_the_agent_can_build(mode):
    b = backend.backend_class(mode)(NODE, "nft", extra="ignored")
    assert b.mode == mode
    assert all(callable(getattr(b, m)) for m in ("setup", "sync", "cleanup"))


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown proxy mode 'userspace'"):
        backend.backend_class("userspace")


def test_agent_takes_the_mode_and_backend_options():
    args = parser().parse_args(["--registry", "sqlite:///x", "--node", "n1", "--node-ip", "192.168.0.2",
                                "--pod-cidr", "10.0.0.0/8", "--service-cidr", "172.30.0.0/16",
                                "--mode", "nftables", "--backend-opt", "scheduler=rr"])
    assert args.mode == "nftables" and args.backend_opt == ["scheduler=rr"] and args.service_cidr == ["172.30.0.0/16"]
    with pytest.raises(SystemExit):
        parser().parse_args(["--registry", "x", "--node", "n", "--node-ip", "1.2.3.4", "--pod-cidr", "10.0.0.0/8",
                             "--mode", "userspace"])
