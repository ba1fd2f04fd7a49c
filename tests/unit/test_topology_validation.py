"""Topology validation: golden error reports, the demo topology, and malformed structure.

Golden cases live in tests/golden/errors/: ``<case>.yaml`` is a small bad topology (any
manifests inline) and ``<case>.log`` holds the problems it must produce, one
``str(problem)`` per line, in order. To regenerate the .log files after an intended
change to the messages, run

    NETSIM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_topology_validation.py

and read every changed .log before committing it (``git diff tests/golden``).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from netsim.errors import Problem, TopologyError
from netsim.topology import Topology, load, load_text

REPO = Path(__file__).resolve().parents[2]
ERRORS = REPO / "tests" / "golden" / "errors"
UPDATE = os.environ.get("NETSIM_UPDATE_GOLDEN") == "1"
CASES = sorted(p.stem for p in ERRORS.glob("*.yaml"))


def user_pods(topo: Topology) -> list:
    """The pods a topology asked for, without the cluster DNS replicas netsim adds."""
    return [p for p in topo.pods if p.source != "cluster.dns"]


def user_services(topo: Topology) -> list:
    return [s for s in topo.services if s.source != "cluster.dns"]


def problems_of(text: str, base_dir: Path | str = ".") -> list[str]:
    """The problem lines ``text`` produces; fails if it loads."""
    with pytest.raises(TopologyError) as info:
        load_text(text, base_dir=base_dir, source="t.yaml")
    return info.value.lines()


# -- golden error reports ------------------------------------------------------

def test_golden_cases_are_complete():
    logs = {p.stem for p in ERRORS.glob("*.log")}
    assert len(CASES) >= 40
    assert not logs - set(CASES), f".log without .yaml: {sorted(logs - set(CASES))}"
    if not UPDATE:
        assert not set(CASES) - logs, (f"no golden .log for {sorted(set(CASES) - logs)}: "
                                       "run with NETSIM_UPDATE_GOLDEN=1 and review the result")


@pytest.mark.parametrize("case", CASES)
def test_golden_errors(case, monkeypatch):
    # Load by a path relative to the repository, as a user would type it, so that file
    # names in the report do not depend on where the checkout lives.
    monkeypatch.chdir(REPO)
    with pytest.raises(TopologyError) as info:
        load(Path("tests/golden/errors") / f"{case}.yaml")
    lines = info.value.lines()
    assert lines, "TopologyError without problems"
    assert all(isinstance(p, Problem) for p in info.value.problems)
    assert str(info.value).startswith(f"{len(lines)} problem")
    assert "nothing was created" in str(info.value)
    log = ERRORS / f"{case}.log"
    if UPDATE:
        log.write_text("".join(f"{line}\n" for line in lines))
    assert lines == log.read_text().splitlines()


# A few properties every golden report must have, checked on the .log files themselves
# so that a careless regeneration cannot slip through.

def _golden_lines() -> list[tuple[str, str]]:
    return [(case, line) for case in CASES if (ERRORS / f"{case}.log").exists()
            for line in (ERRORS / f"{case}.log").read_text().splitlines()]


def test_golden_reports_name_a_place_and_have_no_traceback():
    for case, line in _golden_lines():
        assert ": " in line, f"{case}: no path in {line!r}"
        assert "Traceback" not in line and "Error(" not in line, f"{case}: {line!r}"


def test_golden_reports_name_manifest_objects():
    for case, line in _golden_lines():
        if line.startswith("manifests[") and "cannot read" not in line and "malformed YAML" not in line:
            head = line.split(": ", 1)[0]
            assert len(head.split()) >= 3, f"{case}: {line!r} should name '<entry> <Kind> <name>'"


def test_golden_expectations_for_key_cases():
    """Spot checks that the regenerated goldens still say what the cases are about."""
    def log(case: str) -> str:
        return (ERRORS / f"{case}.log").read_text()

    assert "tests/golden/errors/malformed-yaml.yaml:4:10: malformed YAML" in log("malformed-yaml")
    assert "manifest: unknown field (hint: did you mean 'manifests'?)" in log("unknown-top-level-field")
    assert "cluster.serviceCidr: unknown field (hint: did you mean 'serviceCIDR'?)" in log("unknown-cluster-field")
    assert ("manifests[0] Pod web: spec.contianers: unknown field (hint: did you mean 'containers'?)"
            in log("unknown-object-field"))
    assert "(hint: did you mean 10.244.0.0/16?)" in log("cidr-host-bits")
    assert "not supported" in log("unsupported-kind")
    assert "30000–32767" in log("node-port-outside-range")
    # One line per Deployment, not one per replica.
    assert log("node-name-unknown").count("Deployment web") == 1
    assert log("node-selector-matches-nothing").count("Deployment web") == 1
    assert log("duplicate-deployment").count("\n") == 1


def test_many_errors_are_all_reported_in_one_run():
    lines = (ERRORS / "many-errors.log").read_text().splitlines()
    expected_paths = [
        "clustr:", "name:", "cluster.proxyMode:", "cluster.overlay:", "cluster.serviceCIDR:",
        "nodes[2].name:", "nodes[1].name:", "externals[0].address:",
        "spec.containers[0].ports[0].containerPort:", "ConfigMap cfg: kind:",
        "spec.ports[0].targetPort:", "spec.ports[0].nodePort:", "spec.ports[1].name:",
        "spec.replicas:", "spec.template.spec.containers[0].imagee:", "manifests[4]: cannot read missing.yaml",
        "Pod client: spec.nodeName:",
    ]
    for path in expected_paths:
        assert any(path in line for line in lines), f"nothing reported at {path}"
    assert len(lines) >= len(expected_paths)


# -- problems, errors and direct load_text -------------------------------------

def test_problem_formatting():
    assert str(Problem("a.b", "is wrong", "fix it")) == "a.b: is wrong (hint: fix it)"
    assert str(Problem("a.b", "is wrong")) == "a.b: is wrong"
    assert str(Problem("", "is wrong")) == "is wrong"
    err = TopologyError([Problem("x", "y")], "lab.yaml")
    assert str(err) == "1 problem in lab.yaml; nothing was created"
    assert err.lines() == ["x: y"]


def test_missing_topology_file(tmp_path):
    with pytest.raises(TopologyError) as info:
        load(tmp_path / "nope.yaml")
    assert info.value.lines() == [f"{tmp_path / 'nope.yaml'}: cannot read topology file: No such file or directory"]


def test_topology_and_manifest_files_that_are_not_utf8(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00name: lab\n")
    with pytest.raises(TopologyError) as info:
        load(tmp_path / "bin.yaml")
    assert "not UTF-8 text" in info.value.lines()[0]
    lines = problems_of("name: lab\nnodes: [n1]\nmanifests: [bin.yaml]\n", base_dir=tmp_path)
    assert lines == ["manifests[0]: cannot read bin.yaml: not UTF-8 text (invalid start byte at byte 0)"]


def test_manifest_path_is_relative_to_the_topology(tmp_path):
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n")
    (tmp_path / "lab.yaml").write_text("name: lab\nnodes: [n1]\nmanifests: [apps/pod.yaml]\n")
    assert [p.name for p in user_pods(load(tmp_path / "lab.yaml"))] == ["p"]


def test_nodes_given_as_plain_names_or_mappings():
    topo = load_text("name: lab\nnodes: [n1, {name: n2, labels: {disk: ssd}, address: 192.168.100.9}]\n")
    assert [n.name for n in topo.nodes] == ["n1", "n2"]
    assert topo.nodes[0].labels == {"kubernetes.io/hostname": "n1"}
    assert topo.nodes[1].labels == {"disk": "ssd", "kubernetes.io/hostname": "n2"}
    assert str(topo.nodes[1].address) == "192.168.100.9"


def test_cluster_defaults():
    c = load_text("name: lab\nnodes: [n1]\n").cluster
    assert (str(c.pod_cidr), str(c.service_cidr), str(c.underlay_cidr)) == (
        "10.244.0.0/16", "10.96.0.0/12", "192.168.100.0/24")
    assert (c.node_subnet_length, c.underlay_mtu, c.overlay, c.proxy_mode, c.bridge) == (
        24, 1500, "vxlan", "iptables", "cni0")


def test_small_pod_cidr_gets_flannels_default_subnet_length():
    assert load_text("name: lab\ncluster: {podCIDR: 10.244.0.0/24}\nnodes: [n1]\n").cluster.node_subnet_length == 26


def test_large_deployment_replica_names_are_unique():
    text = """
name: lab
cluster: {podCIDR: 10.0.0.0/8, serviceCIDR: 172.16.0.0/16, nodeSubnetLength: 16}
nodes: [n1]
manifests:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web}
    spec:
      replicas: 6000
      selector: {matchLabels: {app: web}}
      template: {metadata: {labels: {app: web}}, spec: {containers: [{name: c}]}}
"""
    names = [p.name for p in user_pods(load_text(text))]
    assert len(names) == len(set(names)) == 6000


# -- the demo and other valid inputs --------------------------------------------

def test_demo_topology_loads():
    topo = load(REPO / "topologies" / "demo.yaml")
    assert isinstance(topo, Topology)
    assert topo.name == "demo"
    assert [n.name for n in topo.nodes] == ["node-1", "node-2", "node-3"]
    assert [e.name for e in topo.externals] == ["ext-client"]
    assert len(topo.pods) == 14
    assert sorted(s.name for s in topo.services) == ["echo", "kube-dns", "web", "web-lb", "web-nodeport"]
    assert sorted((d.name, d.replicas) for d in topo.deployments) == [("coredns", 2), ("echo", 4), ("web", 6)]
    assert [(p.namespace, p.owner) for p in topo.pods[-2:]] == [("kube-system", "Deployment/coredns")] * 2
    by_owner: dict = {}
    for pod in user_pods(topo):
        by_owner[pod.owner] = by_owner.get(pod.owner, 0) + 1
    assert by_owner == {None: 2, "Deployment/web": 6, "Deployment/echo": 4}
    # Manifests come from a multi-document file plus one inline object.
    assert {p.source for p in user_pods(topo)} == {"manifests[0] (manifests/demo-apps.yaml#0)",
                                             "manifests[0] (manifests/demo-apps.yaml#1)",
                                             "manifests[0] (manifests/demo-apps.yaml#2)",
                                             "manifests[1]"}
    web = next(s for s in topo.services if s.name == "web-nodeport")
    assert (web.type, web.ports[0].node_port, web.ports[0].target_port) == ("NodePort", 30080, 8080)
    echo = next(s for s in topo.services if s.name == "echo")
    assert [(p.protocol, p.target_port) for p in echo.ports] == [("TCP", "tcp-echo"), ("UDP", "udp-echo")]


def test_demo_replicas_are_named_like_kubernetes():
    topo = load(REPO / "topologies" / "demo.yaml")
    for pod in topo.pods:
        if pod.owner == "Deployment/web":
            name, template_hash, suffix = pod.name.rsplit("-", 2)
            assert name == "web" and len(template_hash) == 10 and len(suffix) == 5
            assert pod.labels == {"app": "web", "pod-template-hash": template_hash}
    assert load(REPO / "topologies" / "demo.yaml") == topo      # names are deterministic


def test_multi_document_manifest_file(tmp_path):
    (tmp_path / "apps.yaml").write_text("""\
apiVersion: v1
kind: Pod
metadata: {name: a}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
---
---
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {selector: {app: a}, ports: [{port: 80}]}
""")
    topo = load_text("name: lab\nnodes: [n1]\nmanifests: [apps.yaml]\n", base_dir=tmp_path)
    assert [p.name for p in user_pods(topo)] == ["a"]
    assert [s.name for s in user_services(topo)] == ["a"]
    assert topo.services[0].ports[0].target_port == 80          # defaults to port


def test_kind_list_is_unpacked():
    text = """
name: lab
nodes: [n1]
manifests:
  - apiVersion: v1
    kind: List
    items:
      - {apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {containers: [{name: c}]}}
      - {apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 80}]}}
"""
    topo = load_text(text)
    assert [p.name for p in user_pods(topo)] == ["a"]
    assert [s.name for s in user_services(topo)] == ["s"]
    assert topo.pods[0].source == "manifests[0].items[0]"


def test_images_commands_and_other_ignored_fields_are_accepted():
    text = """
name: lab
nodes: [n1]
manifests:
  - apiVersion: v1
    kind: Pod
    metadata:
      name: a
      annotations: {note: ignored}
    spec:
      restartPolicy: Always
      containers:
        - name: c
          image: nginx:1.27
          command: [nginx, -g, daemon off;]
          args: [--verbose]
          env: [{name: X, value: "1"}]
          readinessProbe: {httpGet: {port: 80}}
          ports: [{containerPort: 80, name: http}]
    status: {phase: Running}
"""
    (pod,) = user_pods(load_text(text))
    assert [(p.port, p.protocol, p.name) for p in pod.ports] == [(80, "TCP", "http")]


def test_same_pod_name_in_two_namespaces_is_fine():
    text = """
name: lab
nodes: [n1]
manifests:
  - {apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {containers: [{name: c}]}}
  - {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: other}, spec: {containers: [{name: c}]}}
"""
    assert sorted((p.namespace, p.name) for p in user_pods(load_text(text))) == [("default", "a"), ("other", "a")]


def test_node_port_may_repeat_across_protocols():
    text = """
name: lab
nodes: [n1]
manifests:
  - {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {type: NodePort, ports: [{port: 53, nodePort: 30053}]}}
  - {apiVersion: v1, kind: Service, metadata: {name: b}, spec: {type: NodePort, ports: [{port: 53, protocol: UDP, nodePort: 30053}]}}
"""
    assert len(user_services(load_text(text))) == 2


# -- structurally wrong input never escapes as another exception ------------------

STRUCTURAL = {
    "nodes is a number": "name: lab\nnodes: 3\n",
    "nodes is a mapping": "name: lab\nnodes: {n1: {}}\n",
    "nodes hold lists": "name: lab\nnodes: [[n1]]\n",
    "node names are numbers": "name: lab\nnodes: [1, {name: 2}]\n",
    "lab name is a number": "name: 42\nnodes: [n1]\n",
    "lab name is a date": "name: 2024-01-01\nnodes: [n1]\n",
    "cluster is a list": "name: lab\ncluster: [podCIDR]\nnodes: [n1]\n",
    "CIDRs of the wrong type": "name: lab\ncluster: {podCIDR: 10, serviceCIDR: [a], underlayCIDR: {a: 1}}\nnodes: [n1]\n",
    "manifests is a mapping": "name: lab\nnodes: [n1]\nmanifests: {a: 1}\n",
    "manifests hold null and numbers": "name: lab\nnodes: [n1]\nmanifests: [null, 5, [a]]\n",
    "null document": "null\n",
    "empty document": "",
    "document is a list": "- name: lab\n",
    "document is a string": "just text\n",
    "kind is a list": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: v1, kind: [Pod]}]\n",
    "kind is a mapping": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: v1, kind: {a: 1}}]\n",
    "metadata is a list": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: v1, kind: Pod, metadata: [a], spec: {containers: [{name: c}]}}]\n",
    "name is a list": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: v1, kind: Pod, metadata: {name: [a]}, spec: {containers: [{name: c}]}}]\n",
    "spec is a list": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: v1, kind: Service, metadata: {name: s}, spec: [1]}]\n",
    "targetPort is a list": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 80, targetPort: [1]}]}}]\n",
    "targetPort is a non-ASCII digit": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 80, targetPort: '²'}]}}]\n",
    "List items is a number": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: v1, kind: List, items: 5}]\n",
    "slice targetRef name is a list": "name: lab\nnodes: [n1]\nmanifests: [{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: e, labels: {kubernetes.io/service-name: s}}, addressType: IPv4, endpoints: [{addresses: [10.0.0.1], targetRef: {name: [a]}}]}]\n",
    "python tag": "name: !!python/object/apply:os.system [true]\nnodes: [n1]\n",
    "tab indentation": "name: lab\n\tnodes: [n1]\n",
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_structurally_wrong_input_raises_topology_error(case):
    lines = problems_of(STRUCTURAL[case])
    assert lines and all(isinstance(line, str) and line for line in lines)


FUZZ_BASE = """
name: lab
cluster: {podCIDR: 10.244.0.0/16, nodeSubnetLength: 24, loadBalancerPool: [192.168.100.240/28]}
nodes:
  - {name: n1, labels: {zone: a}, address: 192.168.100.2}
externals: [ext]
manifests:
  - apiVersion: v1
    kind: Pod
    metadata: {name: p, labels: {app: p}}
    spec:
      nodeSelector: {zone: a}
      containers: [{name: c, ports: [{containerPort: 80, name: http}]}]
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: d}
    spec:
      replicas: 2
      selector: {matchLabels: {app: d}}
      template: {metadata: {labels: {app: d}}, spec: {containers: [{name: c}]}}
  - apiVersion: v1
    kind: Service
    metadata: {name: s}
    spec:
      type: NodePort
      selector: {app: p}
      ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
      sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
    addressType: IPv4
    endpoints: [{addresses: [10.244.1.2], conditions: {ready: true}, targetRef: {kind: Pod, name: p}}]
    ports: [{name: http, port: 80}]
"""
WRONG_VALUES = (None, 7, "x", [1], {"k": 1})


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, path + (i,))


def test_fuzz_every_value_replaced_by_a_wrong_type(monkeypatch):
    """Replace each value of a valid topology in turn by values of the wrong shape:
    the result either loads or raises TopologyError, never anything else."""
    if getattr(yaml, "CSafeLoader", None):      # same documents, parsed by libyaml: 10x faster
        monkeypatch.setattr(yaml, "safe_load", lambda text: yaml.load(text, Loader=yaml.CSafeLoader))
    base = yaml.safe_load(FUZZ_BASE)
    load_text(FUZZ_BASE)                       # the base itself is valid
    rejected = 0
    for path in _paths(base):
        if not path:
            continue
        for wrong in WRONG_VALUES:
            doc = copy.deepcopy(base)
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = wrong
            try:
                load_text(yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)))
            except TopologyError as err:
                rejected += 1
                assert err.problems, f"{path}={wrong!r}: TopologyError without problems"
            except Exception as exc:           # pragma: no cover - reported as a failure
                pytest.fail(f"{'.'.join(map(str, path))} = {wrong!r} raised {exc!r}")
    assert rejected > 100
