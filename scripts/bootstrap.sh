#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine (run as root, Python 3.11 as `python3`):
# system packages the tests need, then .venv with keysteward installed editable with [test] extras.
# A second run only checks: no apt-get update, no pip, when nothing changed.
set -euo pipefail

# System packages the tests and benches need. Extend this list; nothing else needs to change.
APT_PACKAGES="postgresql patroni etcd-server curl jq iproute2 softhsm2 wrk ca-certificates cryptsetup-bin qemu-utils libssl-dev libgcrypt20-dev swtpm swtpm-tools tpm2-tools nbdkit libnbd-bin nbdfuse fuse3 e2fsprogs gdb qemu-system-x86 busybox-static cpio"

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
export DEBIAN_FRONTEND=noninteractive
PYTHON="${PYTHON:-python3}"

is_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Debian's own python3 has no ensurepip (so no `python3 -m venv`) until python3-venv is installed.
packages="$APT_PACKAGES"
if ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
  packages="$packages python3-venv"
fi

missing=""
for pkg in $packages; do
  is_installed "$pkg" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "bootstrap: apt-get install$missing"
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
  echo "bootstrap: system packages present"
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.keysteward-bootstrap
# what the install depends on: the project metadata and the native extension's build script
want="$(cat pyproject.toml setup.py src/keysteward/crypto/_xts_build.py src/keysteward/crypto/native/*.c src/keysteward/proxy/*.c 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
  echo "bootstrap: .venv up to date"
else
  echo "bootstrap: pip install -e '.[test]'"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  echo "$want" >"$stamp"
fi
