#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit + integration against real
# runc, CRIU, overlayfs). Exit code 5 (no tests collected) is a failure, not a pass.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh" || exit 1
cd "$REPO"
/opt/runtimed/venv/bin/python -m pytest -q -ra "$@" tests/
rc=$?
if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
