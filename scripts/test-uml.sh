#!/usr/bin/env bash
# The kernel tests that need IPVS (pytest -m ipvs), all in ONE user-mode Linux boot: for
# kernels without ip_vs (this machine's, containers, CI runners). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec netsim kernel run --timeout "${NETSIM_UML_TIMEOUT:-1200}" -- \
  python -m pytest -q -p no:cacheprovider -m ipvs "${@:-tests/integration}"
