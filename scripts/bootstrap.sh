#!/usr/bin/env bash
# Install what netsim needs, idempotently: Debian packages (only the missing ones) and a
# Python virtual environment in .venv (rebuilt only when pyproject.toml changes).
# Sourced by demo.sh and test.sh; safe to run on its own. Needs root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "$(id -u)" -ne 0 ]; then
  echo "netsim: run this as root (it creates network namespaces)" >&2
  exit 1
fi

PACKAGES=(
  iproute2 iptables nftables ipset conntrack ipvsadm   # kernel configuration tools
  mininet                                              # Mininet's Python module and mnexec
  iperf3 tcpdump tshark iputils-ping curl procps       # traffic, capture and inspection
  etcd-server etcd-client                              # the real-etcd registry backend
  user-mode-linux kmod                                 # kernel runner for features this kernel lacks (modprobe in the guest)
  dnsmasq-base containernetworking-plugins             # cluster DNS, reference CNI plugins
  python3 python3-venv python3-pip
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "netsim: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3 with system site packages, so the apt-installed mininet module is importable.
VENV="$ROOT/.venv"
STAMP="$VENV/.netsim-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "netsim: installing the Python environment in .venv"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
