"""`python -m lazyfs convert|inspect` as a user runs them: JSON out, one-line typed errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lazyfs.testing import make_layer

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazyfs", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=False)


def test_convert_then_inspect(tmp_path: Path):
    layer = make_layer(tmp_path / "layer")
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"version": 1, "layer": "x", "opened": ["etc/hello.txt"],
                                  "read": []}))
    r = _run("convert", str(layer), str(tmp_path / "l.esgz"), "--prioritized-from",
             str(record), "--prioritize", "bin/tool")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["prioritized"] == ["etc/hello.txt", "bin/tool"]
    assert made["digest"].startswith("sha256:") and made["diff_id"] != made["digest"]
    r = _run("inspect", str(tmp_path / "l.esgz"), "--toc-digest", made["toc_digest"],
             "--verify", "--list")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["toc_verified"] and info["toc_digest"] == made["toc_digest"]
    assert info["prioritized"] == ["etc/hello.txt", "bin/tool"]
    assert "usr/lib/python3/big.bin" in info["files"] and info["verified_bytes"] > 300_000


def test_errors_are_one_typed_line(tmp_path: Path):
    bad = tmp_path / "bad.esgz"
    bad.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    r = _run("inspect", str(bad))
    assert r.returncode == 1
    assert r.stderr.strip().startswith("lazyfs inspect: error: FormatError:")
    assert len(r.stderr.strip().splitlines()) == 1
