#!/usr/bin/env bash
# Idempotent machine setup for runtimed (run as root). Each slow step leaves a
# stamp under $RUNTIMED_CACHE so a second run takes seconds.
#   apt packages, CRIU 4.x in a private prefix, the base rootfs, the Python venv.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${RUNTIMED_CACHE:-/var/cache/runtimed}"
CRIU_PREFIX="${RUNTIMED_CRIU_PREFIX:-/opt/runtimed/criu}"
VENV="${RUNTIMED_VENV:-/opt/runtimed/venv}"
BASE="$CACHE/base/bookworm-py311"
PY="${RUNTIMED_HOST_PYTHON:-python3}"
mkdir -p "$CACHE"
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root" >&2; exit 1; }

APT_PKGS=(runc iptables fuse3 libfuse3-dev pkg-config build-essential debootstrap
          zlib1g-dev zstd iproute2 redis-server docker-registry skopeo containerd stargz-snapshotter
          erofs-utils)   # fsck.erofs checks the meta images in the tests

apt_stamp="$CACHE/apt.$(echo "${APT_PKGS[*]}" | sha256sum | cut -c1-12)"
if [ ! -e "$apt_stamp" ]; then
  log "apt: installing ${APT_PKGS[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${APT_PKGS[@]}" >/dev/null
  # The Debian registry/redis packages start services we do not want; we start our own.
  systemctl disable --now docker-registry redis-server containerd >/dev/null 2>&1 || true
  touch "$apt_stamp"
fi

# --- CRIU 4.x from trixie, unpacked into a private prefix (bookworm's 3.17 fails on this kernel).
if [ ! -x "$CRIU_PREFIX/criu" ] || ! "$CRIU_PREFIX/criu" --version >/dev/null 2>&1; then
  log "criu: fetching trixie's criu into $CRIU_PREFIX"
  src=/etc/apt/sources.list.d/runtimed-trixie.sources
  if [ ! -e "$src" ]; then
    cat > "$src" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat > /etc/apt/preferences.d/runtimed-trixie <<PIN
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
    apt-get update -qq
  fi
  tmp="$(mktemp -d)"; chmod 755 "$tmp"   # apt downloads as _apt
  ( cd "$tmp"
    for p in criu libcompel1 libc6 libbsd0 libmd0 libgnutls30t64 libnet1 libnftables1 \
             libnl-3-200 libprotobuf-c1 libuuid1 libp11-kit0 libidn2-0 libunistring5 \
             libtasn1-6 libnettle8t64 libhogweed6t64 libgmp10 libffi8 libmnl0 libnftnl11 \
             libxtables12 libjansson4 libedit2 libtinfo6 libncursesw6; do
      apt-get download -qq "$p/trixie"
    done )
  rm -rf "$CRIU_PREFIX.tmp"; mkdir -p "$CRIU_PREFIX.tmp"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$CRIU_PREFIX.tmp"; done
  cat > "$CRIU_PREFIX.tmp/criu" <<WRAP
#!/bin/sh
P=$CRIU_PREFIX
exec "\$P/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$P/usr/lib/x86_64-linux-gnu" "\$P/usr/sbin/criu" "\$@"
WRAP
  chmod 755 "$CRIU_PREFIX.tmp/criu"
  rm -rf "$CRIU_PREFIX"; mv "$CRIU_PREFIX.tmp" "$CRIU_PREFIX"; rm -rf "$tmp"
  "$CRIU_PREFIX/criu" --version >&2
fi

# --- Base rootfs: debootstrap minbase + python3 (+pip for Image.pip_install). ~1 min, cached.
if [ ! -e "$BASE/.runtimed-complete" ]; then
  log "base rootfs: debootstrap bookworm into $BASE (about a minute)"
  rm -rf "$BASE.tmp"; mkdir -p "$(dirname "$BASE")"
  debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
    bookworm "$BASE.tmp" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # Images are single-tenant: let pip install into the system interpreter.
  rm -f "$BASE.tmp"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$BASE.tmp"/var/cache/apt/archives/*.deb "$BASE.tmp"/var/lib/apt/lists/*
  mkdir -p "$BASE.tmp/.runtimed"
  chroot "$BASE.tmp" python3 -c 'import sys; print(sys.version)' > "$BASE.tmp/.runtimed/python-version"
  touch "$BASE.tmp/.runtimed-complete"
  rm -rf "$BASE"; mv "$BASE.tmp" "$BASE"
fi

# --- Python environment with the project installed (editable, so a fresh clone re-points it).
if [ ! -x "$VENV/bin/python" ]; then
  log "venv: creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
venv_stamp="$VENV/.runtimed-$(cat "$REPO/pyproject.toml" | sha256sum | cut -c1-12)-$(echo "$REPO" | sha256sum | cut -c1-8)"
if [ ! -e "$venv_stamp" ]; then
  log "venv: installing runtimed (editable) with test extras"
  "$VENV/bin/pip" install -q -e "$REPO[test,bench]"
  rm -f "$VENV"/.runtimed-*; touch "$venv_stamp"
fi

sysctl -qw net.ipv4.ip_forward=1
log "ready: venv=$VENV criu=$CRIU_PREFIX/criu base=$BASE"
