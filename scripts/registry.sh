#!/usr/bin/env bash
# Start a throwaway local OCI registry (Debian's docker-registry) for lazyfs development.
#   scripts/registry.sh [DIR] [PORT]     # foreground; prints the URL; Ctrl-C stops it
# Storage lives in DIR/storage (default /var/tmp/lazyfs-registry). Writes its own config:
# Debian's /etc/docker/registry/config.yml turns on password auth.
# Then e.g.:
#   python -m lazyfs convert LAYER_DIR layer.esgz
#   python -m lazyfs push --registry http://127.0.0.1:PORT --name dev/img --tag v1 layer.esgz
#   skopeo inspect --tls-verify=false docker://127.0.0.1:PORT/dev/img:v1
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${RUNTIMED_PYTHON:-/opt/runtimed/venv/bin/python}"
[ -x "$PY" ] || PY=python3
command -v docker-registry >/dev/null || { echo "docker-registry is not installed (apt-get install docker-registry)" >&2; exit 1; }
DIR="${1:-/var/tmp/lazyfs-registry}"
mkdir -p "$DIR"
cd "$REPO"
exec "$PY" -m lazyfs.devregistry "$DIR" ${2:+--port "$2"}
