#!/usr/bin/env bash
# The main job: install what is missing, bring up the demo lab, show it, verify it,
# and tear it down (KEEP=1 leaves it up for you to explore; `netsim down demo` later).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"

TOPO="${1:-topologies/demo.yaml}"
LAB="$(netsim validate "$TOPO" | sed -n 's/.*lab \([^,]*\),.*/\1/p')"
if [ "${KEEP:-0}" != "1" ]; then
  trap 'netsim down "$LAB" >/dev/null 2>&1 || true' EXIT
fi
netsim up "$TOPO"
echo
netsim selftest "$LAB"
echo
netsim verify "$TOPO" --lab "$LAB"                    # the topology's verify: tests and the Service matrix
echo
netsim graph "$LAB"
if [ "$TOPO" = "topologies/demo.yaml" ]; then
  echo; netsim trace --lab "$LAB" client web -w /tmp/netsim-demo-trace.pcapng   # one packet's path: DNAT, VXLAN, the rules that matched (the pcapng outlives the lab)
fi
if [ "${KEEP:-0}" = "1" ]; then
  echo; echo "lab $LAB left up: try 'netsim shell', 'netsim exec <pod> -- curl ...', then 'netsim down $LAB'"
fi
