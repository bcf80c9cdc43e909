"""The read-only directory bind-mounted at /.runtimed in every container."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cloudpickle

HERE = Path(__file__).parent


def prepare(dest_root: Path) -> Path:
    """Copy agent.py, protocol.py and our cloudpickle into a versioned dir; return it.

    The dir name hashes the sources, so a daemon upgrade never changes files that
    running (or snapshotted) containers already see.
    """
    sources = [HERE / "agent.py", HERE / "protocol.py"]
    cp_dir = Path(cloudpickle.__file__).parent
    h = hashlib.sha256()
    for f in sources + sorted(cp_dir.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    dest = dest_root / f"agent-{h.hexdigest()[:12]}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest_root / f".tmp-{os.getpid()}-{h.hexdigest()[:8]}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "lib").mkdir(parents=True)
    for f in sources:
        shutil.copy2(f, tmp / f.name)
    shutil.copytree(cp_dir, tmp / "lib" / "cloudpickle",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    for p in tmp.parent.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    return dest
