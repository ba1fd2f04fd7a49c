"""Forwarding to a lab in a UML guest, without a guest: record lookup, the request
directory protocol between host and the in-guest server, and refused interactive shells."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from netsim import cli
from netsim.errors import LabStateError, NetsimError
from netsim.kernel import guestlab, serve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("NETSIM_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    return tmp_path


def record(state, lab="um-a"):
    run = state / f"run-{lab}"
    (run / "req").mkdir(parents=True)
    (run / "out").mkdir()
    rec = guestlab.GuestRecord(lab, 999999, 1, str(run), "/x.yaml", 0.0)
    rec.save()
    return rec


def parse(*argv):
    return cli.parser().parse_args(list(argv))


def test_commands_about_a_uml_lab_are_forwarded_and_host_only_ones_are_not(state):
    record(state)
    assert guestlab.target(parse("status")).lab == "um-a"
    assert guestlab.target(parse("exec", "--lab", "um-a", "node-1", "--", "ip", "r")).lab == "um-a"
    assert guestlab.target(parse("down", "um-a")).lab == "um-a"
    assert guestlab.target(parse("status", "other")) is None
    assert guestlab.target(parse("validate", str(REPO / "topologies" / "demo.yaml"))) is None
    assert guestlab.target(parse("clean")) is None


def test_verify_names_its_lab_by_option_or_by_topology_file(state):
    record(state, "demo")
    record(state, "um-b")
    demo = str(REPO / "topologies" / "demo.yaml")                 # name: demo
    assert guestlab.target(parse("verify", demo)).lab == "demo"
    assert guestlab.target(parse("verify", demo, "--lab", "um-b")).lab == "um-b"
    assert guestlab.target(parse("verify", "--lab", "um-b")).lab == "um-b"
    assert guestlab.target(parse("verify", "um-b", "--no-matrix")).lab == "um-b"
    assert guestlab.target(parse("probe", "--lab", "um-b", "client", "web")).lab == "um-b"
    assert guestlab.target(parse("trace", "--lab", "demo", "client", "web")).lab == "demo"


def test_an_unnamed_lab_is_ambiguous_when_host_labs_are_up_too(state):
    record(state)
    host = state / "state" / "hostlab"
    host.mkdir()
    (host / "state.json").write_text("{}")
    with pytest.raises(LabStateError, match="several labs are up \\(hostlab, um-a\\)"):
        guestlab.target(parse("status"))


def test_interactive_shells_are_refused_with_the_alternative(state):
    rec = record(state)
    for argv in (("shell",), ("exec", "node-1")):
        with pytest.raises(NetsimError, match="netsim exec NODE -- CMD"):
            guestlab.forward(rec, parse(*argv), list(argv))


class Running:
    def poll(self):
        return None


def test_requests_run_in_the_server_and_stream_back_with_their_status(state, capsysbinary, monkeypatch):
    rec = record(state)
    run = Path(rec.run_dir)
    monkeypatch.setattr(serve, "RESCAN", 0.02)
    server = serve.Server(run)
    loop = threading.Thread(target=server.loop, daemon=True)
    loop.start()
    rid = guestlab.submit(rec, ["validate", str(REPO / "topologies" / "demo.yaml")])
    assert guestlab.follow(rec, rid, Running()) == 0
    assert b"ok \xe2\x80\x94 lab demo, 3 nodes" in capsysbinary.readouterr().out
    rid = guestlab.submit(rec, ["validate", "/nonexistent.yaml"])
    assert guestlab.follow(rec, rid, Running()) != 0
    assert b"nonexistent.yaml" in capsysbinary.readouterr().err
    rid = guestlab.submit(rec, ["validate", str(REPO / "topologies" / "demo.yaml")], shutdown_after=True)
    assert guestlab.follow(rec, rid, Running()) == 0
    loop.join(timeout=30)
    assert not loop.is_alive()                   # the server stops after a successful shutdown_after
