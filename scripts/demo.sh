#!/usr/bin/env bash
# The main job: set everything up, start the embedded runtime (dispatcher + one node,
# SQLite, local blobs) and run the demo's .remote() calls through it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
PY=/opt/runtimed/venv/bin/python
cd "$REPO"
$PY -m runtimed.cli up --detach
echo "== demo: examples/hello.py (image build, cold start, warm calls, map, spawn)"
$PY -m runtimed.cli run examples/hello.py
echo "== demo: examples/snapshot_demo.py (first call takes the snapshot, later cold starts restore it)"
$PY -m runtimed.cli run examples/snapshot_demo.py
echo "== runtimectl ps"
$PY -m runtimed.cli ps
echo "== runtimectl snapshot ls"
$PY -m runtimed.cli snapshot ls || true
echo "(the runtime keeps running: 'runtimectl down' stops it)"
