#!/usr/bin/env bash
# The test suite: unit tests (no root) and kernel tests (root, real namespaces).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not root".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
pytest -q -p no:cacheprovider "$@"
# Without IPVS here, the tests marked ipvs were skipped: run them all in one UML boot.
if [ "$#" -eq 0 ] && ! python -c 'import sys; from netsim.kernel.features import host_features as h; sys.exit(0 if h().have["ip_vs"] else 1)'; then
  "$ROOT/scripts/test-uml.sh"
fi
