#!/usr/bin/env bash
# The test suite: unit tests (no root) and kernel tests (root, real namespaces).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not root".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec pytest -q -p no:cacheprovider "$@"
