#!/usr/bin/env bash
# Set up a fresh Debian 12 machine to run TunnelMesh, its demo and its tests.
#
#   sudo ./tools/setup.sh
#
# Idempotent and non-interactive (no stdin needed). Installs the missing system packages
# (always --no-install-recommends: otherwise wireguard-tools pulls in a kernel image),
# then creates .venv in the project root and installs the project with its test extra,
# its bench extra (matplotlib, for `python -m tools.bench --chart`) and its postgresql
# extra (asyncpg, for coordinators on PostgreSQL).
# Services shipped by those packages are not started during the install: the lab runs
# its own daemons inside network namespaces.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

packages=(
  wireguard-go wireguard-tools   # interop peer and its `wg` tool
  iperf3                         # benchmarks
  nftables iproute2              # the netns lab: namespaces, veth, bridges, NAT, faults
  conntrack                      # NAT lab: flush a router's mappings (conntrack -F) to expire them mid-test
  openssh-client openssh-server  # SSH transport rung (and its forced-command bridge); host keys as identities
  tinyproxy nginx openssl        # relay rung tests: HTTP CONNECT proxy, TLS-terminating proxy, test certificates
  nebula                         # benchmark peer
  coturn                         # NAT lab: an independent STUN server (RFC 5780 NAT behaviour discovery)
  miniupnpd miniupnpd-nftables   # NAT lab: a real UPnP IGD / NAT-PMP / PCP gateway in a router namespace
  systemd                        # systemd-analyze for the unit-file test
  procps iputils-ping            # sysctl, ps; ping in e2e tests
  python3-venv                   # .venv (pulls python3)
  postgresql                     # several coordinators on one database: tests start a throwaway server (tools/pgserver.py)
)

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$pkg")
done

made_policy=""
apt_log=""
finish() {
  [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
  [[ -n $apt_log ]] && rm -f "$apt_log"
  return 0
}
trap finish EXIT

if ((${#missing[@]})); then
  ((EUID == 0)) || die "missing packages (${missing[*]}); run as root to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_opts=(-q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  # Keep package scripts from starting services (sshd, ...) on this machine.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt_log=$(mktemp)
  if ! apt-get "${apt_opts[@]}" update </dev/null >"$apt_log" 2>&1 ||
     ! apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" </dev/null >>"$apt_log" 2>&1; then
    tail -n 40 "$apt_log" >&2
    die "apt-get failed"
  fi
  for pkg in "${missing[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || die "package $pkg did not install"
  done
  say "installed ${#missing[@]} package(s)"
else
  say "system packages already installed"
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$python is older than 3.11"

venv="$root/.venv"
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
  say "creating $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi

# Reinstall only when pyproject.toml changed since the last successful install
# (the install is editable, so code changes need none).
stamp="$venv/.tunnelmesh-setup"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && "$venv/bin/python" -c 'import tunnelmesh, pytest, xdist, matplotlib, asyncpg' 2>/dev/null; then
  say "python environment up to date"
else
  say "installing tunnelmesh[test,bench,postgresql] into .venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,bench,postgresql]' </dev/null
  printf '%s\n' "$want" >"$stamp"
fi

say "ready: $("$venv/bin/python" --version), tunnelmesh at $venv/bin/tunnelmesh"
